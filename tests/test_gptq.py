"""GPTQ and RTN: oracles written from the paper and the reference's stated conventions.

The exact-code comparison with AutoGPTQ 0.7.1's GPTQ class runs in the interop environment
(interop/tests/test_autogptq.py, `make interop`); here the oracles are a hand-computed quantizer case, a
naive OBS loop that inverts H restricted to the remaining columns at every step (no Cholesky, no blocks),
and the model-level properties (sequential walk, kernels, errors).
"""

import copy
import warnings

import pytest
import torch

import qlab as ql
from qlab import gptq


def _layer(N=32, K=64, n=512, seed=0, outlier=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, K, generator=g)
    if outlier:
        X[:, 3] *= 20  # an outlier channel: what makes error feedback matter
    X = X @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g))  # correlated inputs
    W = torch.randn(N, K, generator=g) * 0.05
    return W, X


def naive_gptq(W, H, bits, group_size, damp, symmetric):
    """OBS column by column in float64, from the paper's equations: at step j the inverse of H restricted to
    the not-yet-quantized columns F gives d = [H_F^-1]_jj and the update of every remaining column."""
    W = W.double().clone()
    H = H.double().clone()
    K = W.shape[1]
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=torch.float64)
    maxq = 2**bits - 1
    codes = torch.zeros_like(W)
    scale = zero = None
    for j in range(K):
        if j % group_size == 0:
            scale, zero = gptq.find_params(W[:, j:j + group_size], bits, symmetric)
        q = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, maxq)
        codes[:, j] = q
        Hinv = torch.linalg.inv(H[j:, j:])  # F = columns j..K-1
        err = (W[:, j] - scale * (q - zero)) / Hinv[0, 0]
        W[:, j:] -= err[:, None] * Hinv[0][None, :]
    return codes


def unsigned_codes(qt):
    q = qt.int_repr().to(torch.int32)
    return q + 2 ** (qt.qtype.bits - 1) if qt.symmetric else q


def test_find_params_hand_case_all_positive_symmetric():
    # AutoGPTQ#293: an all-positive tensor with sym keeps xmin = 0, so scale = xmax / 15 with zero 8
    x = torch.tensor([[0.83, 0.46], [0.44, 0.20]])
    scale, zero = gptq.find_params(x.reshape(1, -1), 4, symmetric=True)
    assert torch.allclose(scale, torch.tensor([0.83 / 15])) and zero.item() == 8
    q = torch.clamp(torch.round(x.reshape(1, -1) / scale) + zero, 0, 15)
    w_hat = (scale * (q - zero)).reshape(2, 2)
    assert torch.allclose(w_hat, torch.tensor([[0.3873, 0.3873], [0.3873, 0.2213]]), atol=1e-4)


def test_find_params_zero_in_range_and_zero_rows():
    x = torch.tensor([[1.0, 2.0, 3.0], [-4.0, -1.0, -2.0], [0.0, 0.0, 0.0]])
    scale, zero = gptq.find_params(x, 4)
    assert torch.allclose(scale, torch.tensor([3 / 15, 4 / 15, 2 / 15]))  # [0, 3], [-4, 0], [-1, 1]
    # the zero row: 1 / (2/15) is 7.4999995 in float32, so round() gives 7, as in the reference
    assert zero.tolist() == [0.0, 15.0, 7.0]


def test_hessian_is_two_over_n_sum_xxT():
    X = torch.randn(3, 10, 6)
    H = gptq.hessian(X)
    assert torch.allclose(H, 2 / 3 * X.reshape(-1, 6).t() @ X.reshape(-1, 6), atol=1e-5)
    H2 = gptq.hessian([X[:1], X[1:]])  # batches of 1 and 2 sequences: the same running average
    assert torch.allclose(H, H2, atol=1e-5)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 64, False), (3, 16, False), (4, 32, True)])
def test_codes_match_naive_obs_loop(bits, group_size, symmetric):
    W, X = _layer()
    H = gptq.hessian(X)
    ref = naive_gptq(W, H, bits, group_size, 0.01, symmetric)
    # block_size = K: with groups inside one block the reference reads un-updated weights for the group
    # qparams; block_size = group_size makes every group start a block, where both agree
    qt = gptq.quantize_weight(W, H, bits, group_size=group_size, block_size=group_size, symmetric=symmetric)
    same = (unsigned_codes(qt).double() == ref).float().mean().item()
    assert same > 0.995, same  # float32 Cholesky vs float64 inverses: a handful of ties may flip


def test_gptq_beats_rtn_on_the_layer_objective():
    W, X = _layer()
    H = gptq.hessian(X)
    for bits in (3, 4):
        err_g = gptq.layer_error(W, gptq.quantize_weight(W, H, bits, group_size=32).dequantize(), H)
        err_r = gptq.layer_error(W, gptq.rtn(W, bits, group_size=32).dequantize(), H)
        assert err_g < 0.7 * err_r, (bits, err_g, err_r)


def test_block_size_does_not_change_aligned_groups():
    W, X = _layer()
    H = gptq.hessian(X)
    a = gptq.quantize_weight(W, H, 4, group_size=32, block_size=32)
    b = gptq.quantize_weight(W, H, 4, group_size=32, block_size=64)  # groups at 32 start inside a block
    c = gptq.quantize_weight(W, H, 4, group_size=32, block_size=16)
    assert (unsigned_codes(a) == unsigned_codes(c)).float().mean() > 0.995
    # b reads un-updated weights for the second group of every block: allowed to differ, but still GPTQ-good
    assert gptq.layer_error(W, b.dequantize(), H) < 1.2 * gptq.layer_error(W, a.dequantize(), H)


def test_act_order_g_idx_and_static_groups():
    W, X = _layer()
    H = gptq.hessian(X)
    qt = gptq.quantize_weight(W, H, 4, group_size=16, act_order=True)
    perm = torch.argsort(torch.diag(H), descending=True)
    expected = torch.empty(64, dtype=torch.int32)
    expected[perm] = torch.arange(64, dtype=torch.int32) // 16  # position in processing order // group
    assert torch.equal(qt.g_idx, expected)
    assert qt.g_idx[3] == 0  # the outlier channel is processed first
    st = gptq.quantize_weight(W, H, 4, group_size=16, act_order=True, static_groups=True)
    assert st.g_idx is None  # static groups keep column k in group k // 16
    # static qparams come from the original weights, group by group
    s_ref, _ = gptq.find_params(W[:, 16:32], 4)
    assert torch.allclose(st.scale[:, 1], s_ref)


def test_dead_columns_are_zero_and_finite():
    W, X = _layer()
    X[:, 5] = 0
    H = gptq.hessian(X)
    assert H[5, 5] == 0
    qt = gptq.quantize_weight(W, H, 4, group_size=-1)
    w_hat = qt.dequantize()
    assert torch.isfinite(w_hat).all() and torch.all(w_hat[:, 5] == 0)
    # group_size = -1: one pair per row, from the weights before the dead column is zeroed
    s_ref, z_ref = gptq.find_params(W, 4)
    assert torch.allclose(qt.scale[:, 0], s_ref) and torch.equal(qt.zero_point[:, 0], z_ref.to(torch.int32))


def test_near_singular_and_non_pd_hessians():
    W, _ = _layer(K=64)
    X = torch.randn(8, 64)  # rank 8 << 64: near-singular, damping makes it definite
    H = gptq.hessian(X)
    qt = gptq.quantize_weight(W, H, 4, group_size=32)
    assert torch.isfinite(qt.dequantize()).all()
    bad = -torch.eye(64)  # not PSD: damp of 1% of a negative mean cannot fix it ...
    bad[0, 0] = 100.0
    with pytest.raises(ValueError, match="not positive definite"):
        gptq.quantize_weight(W, bad, 4, group_size=32)
    # ... but a slightly indefinite H (rank 8, eigenvalues down to -5% of the mean diagonal: what float16
    # accumulation can produce) is rescued by retrying with damp 0.1
    tricky = H - 0.05 * H.diagonal().mean() * torch.eye(64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qt = gptq.quantize_weight(W, tricky, 4, group_size=32, name="blocks.0.mlp.c_fc")
    assert any("blocks.0.mlp.c_fc" in str(w.message) and "damp=" in str(w.message) for w in caught)
    assert torch.isfinite(qt.dequantize()).all()


def test_bad_inputs_teach():
    W, X = _layer()
    H = gptq.hessian(X)
    with pytest.raises(ValueError, match="must divide in_features=64"):
        gptq.quantize_weight(W, H, 4, group_size=48)
    with pytest.raises(ValueError, match="all zero"):
        gptq.quantize_weight(W, torch.zeros(64, 64), 4, group_size=32)
    with pytest.raises(ValueError, match=r"H must be \(64, 64\)"):
        gptq.quantize_weight(W, H[:10, :10], 4, group_size=32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq.quantize_weight(W, H * float("nan"), 4, group_size=32)
    with pytest.raises(ValueError, match="2..8-bit"):
        ql.GPTQConfig(qtype=1)


def test_rtn_config_quantizes_the_layers_gptq_does():
    model = ql.quantize_(ql.models.tiny_gpt(), ql.RTNConfig(qtype=3, group_size=128))
    assert isinstance(model.blocks[2].attn.c_proj, ql.WeightOnlyLinear)
    assert type(model.lm_head) is torch.nn.Linear  # outside the blocks, as in GPTQ
    mlp = ql.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 64)), ql.RTNConfig(qtype=4, group_size=32))
    assert isinstance(mlp[0], ql.Int4WeightOnlyLinear)  # no blocks: every selected linear


def test_rtn_matches_int4_weight_only_config_asymmetric():
    lin = torch.nn.Linear(64, 32)
    a = gptq.rtn(lin.weight.detach(), 4, group_size=32)
    b = ql.Int4WeightOnlyLinear.from_float(lin, 32).qweight()
    assert torch.equal(a.int_repr(), b.int_repr())  # both widen the range to include 0
    assert torch.allclose(a.dequantize(), b.dequantize(), atol=1e-6)


@pytest.fixture(scope="module")
def calib():
    return ql.data.lm_calibration_batches(n_batches=4, batch_size=4, seq_len=128, seed=0)


def test_gptq_on_tiny_gpt_sequential(calib):
    model = ql.models.tiny_gpt()
    ref = ql.models.tiny_gpt()
    cfg = ql.GPTQConfig(qtype=ql.uint4, group_size=128)
    report = gptq.apply(model, cfg, calib, progress=False)
    names = [r.name for r in report.layers]
    assert names[:4] == ["blocks.0.attn.c_attn", "blocks.0.attn.c_proj", "blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj"]
    assert len(names) == 16 and all(r.error < r.rtn_error for r in report.layers)
    assert isinstance(model.blocks[0].mlp.c_fc, ql.Int4WeightOnlyLinear)
    assert not isinstance(model.lm_head, ql.WeightOnlyLinear)  # outside the blocks: left alone
    x = calib[0]
    with torch.no_grad():
        y, y_ref = model(x), ref(x)
    assert torch.isfinite(y).all() and (y - y_ref).abs().mean() < 0.2 * y_ref.abs().mean()


def test_student_function_runs_through_the_glue(calib):
    model = ql.models.tiny_gpt()
    calls = []

    def student(W, H, **options):
        calls.append(options)
        return gptq.rtn(W, options["qtype"], options["group_size"], options["symmetric"])

    gptq.apply(model, ql.GPTQConfig(qtype=3, group_size=64), calib[:1], quantize_weight_fn=student, progress=False)
    assert len(calls) == 16 and calls[0]["group_size"] == 64 and calls[0]["qtype"] == 3
    assert isinstance(model.blocks[3].mlp.c_proj, ql.WeightOnlyLinear)

    def broken(W, H, **options):
        return W

    with pytest.raises(ValueError, match="must return a QTensor"):
        gptq.apply(ql.models.tiny_gpt(), ql.GPTQConfig(), calib[:1], quantize_weight_fn=broken, progress=False)


def test_quantize_needs_calibration_of_full_length():
    model = ql.models.tiny_gpt()
    with pytest.raises(ValueError, match="needs calib_data"):
        ql.quantize_(model, ql.GPTQConfig(act_order=True, static_groups=True))
    short = [torch.randint(0, 256, (2, 32))]
    with pytest.raises(ValueError, match="context is 128"):
        ql.quantize_(model, ql.GPTQConfig(), calib_data=short)


def test_act_order_model_runs_on_fast_kernels(calib):
    model = ql.models.tiny_gpt()
    ql.quantize_(model, ql.GPTQConfig(group_size=64, act_order=True), calib_data=calib[:1])
    lin = model.blocks[0].mlp.c_fc
    assert lin.weight_g_idx is not None
    x = torch.randn(2, 256)
    with ql.kernels.trace() as used:
        y = lin(x)
    y_ref = x @ lin.dequantize_weight().t() + lin.bias
    assert torch.allclose(y, y_ref, atol=2e-2 * y_ref.abs().max().item())
    assert "reference" not in used, used  # columns reordered once, then a fast int4 kernel


def test_gptq_walks_a_hugging_face_decoder():
    """The walker on a transformers model it has no mapping for: OPT's decoder layers (found as the largest
    ModuleList), their keyword arguments (attention mask, ...) captured with the first layer's input."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=64)
    model = transformers.OPTForCausalLM(cfg).eval()
    ref = copy.deepcopy(model)
    calib = [torch.randint(0, 256, (2, 32)) for _ in range(2)]
    name, blocks = gptq.transformer_blocks(model)
    assert name == "model.decoder.layers"
    report = gptq.apply(model, ql.GPTQConfig(qtype=4, group_size=32), calib, progress=False)
    assert len(report.layers) == 12  # q, k, v, out_proj, fc1, fc2 in each of 2 layers
    assert isinstance(model.model.decoder.layers[1].fc2, ql.Int4WeightOnlyLinear)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        y, y_ref = model(x).logits, ref(x).logits
    assert torch.isfinite(y).all() and float((y - y_ref).abs().mean()) < 0.1 * float(y_ref.abs().mean())
