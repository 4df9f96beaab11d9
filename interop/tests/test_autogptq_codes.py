"""qlab's GPTQ against AutoGPTQ 0.7.1's own GPTQ class, on CPU, on the same weight and Hessian: the codes,
scales, zero points and g_idx must be identical (not close) for every option the reference has.

Runs in .venv-interop (make interop), never in the main environment."""

import itertools

import pytest
import torch
from torch import nn

import qlab as ql
from auto_gptq.quantization.gptq import GPTQ

torch.cuda.synchronize = lambda *args, **kwargs: None  # fasterquant calls it unconditionally; a no-op on CPU


def make_problem(N=64, K=256, n=1024, seed=0, dead=(), rank=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n if rank is None else rank, K, generator=g)
    X[:, 7] *= 15
    X = X @ (torch.eye(K) + 0.2 * torch.randn(K, K, generator=g))
    for d in dead:
        X[:, d] = 0
    W = torch.randn(N, K, generator=g) * 0.04
    W[:, 11] += 0.3  # a column of large weights
    return W, X


def reference(W, H, bits, group_size, act_order, static_groups, sym, blocksize=128, damp=0.01):
    layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = W.clone()
    g = GPTQ(layer)
    g.H = H.clone()
    g.nsamples = 1
    g.quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
    scale, zero, g_idx = g.fasterquant(blocksize=blocksize, percdamp=damp, group_size=group_size,
                                       actorder=act_order, static_groups=static_groups)
    Q = layer.weight.data
    gi = g_idx.long()
    codes = torch.round(Q / scale[:, gi] + zero[:, gi]).to(torch.int32)  # AutoGPTQ's pack() recovers codes so
    return codes, scale, zero, g_idx


def ours(W, H, bits, group_size, act_order, static_groups, sym, blocksize=128, damp=0.01):
    qt = ql.gptq.quantize_weight(W, H, bits, group_size=group_size, block_size=blocksize, damp=damp,
                                 act_order=act_order, static_groups=static_groups, symmetric=sym)
    codes = qt.int_repr().to(torch.int32)
    zero = qt.zero_point.float()
    if qt.symmetric:
        codes, zero = codes + 2 ** (bits - 1), zero + 2 ** (bits - 1)
    K = W.shape[1]
    gs = K if group_size == -1 else group_size
    g_idx = qt.g_idx if qt.g_idx is not None else (torch.arange(K) // gs).to(torch.int32)
    return codes, qt.scale, zero, g_idx


def hessian_of(X):
    layer = nn.Linear(X.shape[1], 4)
    g = GPTQ(layer)
    for chunk in X.reshape(8, -1, X.shape[1]):  # 8 sequences, added one batch of one at a time
        g.add_batch(chunk.unsqueeze(0), None)
    return g.H


def test_hessian_matches_add_batch():
    _, X = make_problem(K=64)
    H_ref = hessian_of(X)
    H = ql.gptq.hessian([c.unsqueeze(0) for c in X.reshape(8, -1, 64)])
    assert torch.allclose(H, H_ref, rtol=1e-5, atol=1e-5)


CASES = [(bits, gs, ao, st, sym) for bits, gs, ao, st, sym in
         itertools.product([4, 3], [-1, 32, 128], [False, True], [False, True], [False, True])
         if not (st and gs == -1) and not (bits == 3 and (st or not ao))]


@pytest.mark.parametrize("bits,group_size,act_order,static_groups,sym", CASES)
def test_identical_codes(bits, group_size, act_order, static_groups, sym):
    W, X = make_problem()
    H = hessian_of(X)
    ref = reference(W, H, bits, group_size, act_order, static_groups, sym)
    got = ours(W, H, bits, group_size, act_order, static_groups, sym)
    for what, a, b in zip(("codes", "scale", "zero", "g_idx"), got, ref):
        assert a.shape == b.shape, what
        assert torch.equal(a.to(b.dtype), b), f"{what}: {(a.to(b.dtype) != b).sum()} of {b.numel()} differ"


@pytest.mark.parametrize("act_order", [False, True])
def test_identical_codes_dead_columns_and_near_singular(act_order):
    W, X = make_problem(dead=(0, 5, 200))
    H = hessian_of(X)
    assert (torch.diag(H)[[0, 5, 200]] == 0).all()
    for a, b in zip(ours(W, H, 4, 32, act_order, False, False), reference(W, H, 4, 32, act_order, False, False)):
        assert torch.equal(a.to(b.dtype), b)
    W, X = make_problem(n=None, rank=64)  # 64 samples for 256 inputs: rank-deficient H, rescued by damp
    H = hessian_of(X)
    for a, b in zip(ours(W, H, 4, 128, act_order, False, True), reference(W, H, 4, 128, act_order, False, True)):
        assert torch.equal(a.to(b.dtype), b)


def test_block_size_variants():
    W, X = make_problem()
    H = hessian_of(X)
    for bs in (32, 64):
        for a, b in zip(ours(W, H, 4, 128, False, False, False, blocksize=bs),
                        reference(W, H, 4, 128, False, False, False, blocksize=bs)):
            assert torch.equal(a.to(b.dtype), b)
