"""Grading spec of lab 5 (GPTQ's quantizer, GPTQ on one layer and on the tiny GPT, AWQ's scale search and AWQ
on the tiny GPT): the checks of each test cell of labs/source/lab5/lab5.ipynb.

Each part makes the checks of the test cell with its grade_id, visible and hidden, on the same seeds and with
the same tolerances. The students' functions run in the sandbox through the notebook's locked helpers
(`find_params_result`, `gptq_result`, `gptq_model_result`, `awq_scales_result`, `mlp_scales_result`,
`awq_model_result`); every expected value is computed here, in the grading process, with qlab's gptq (AutoGPTQ
0.7.1's exact codes) and awq (llm-awq's conventions) on the lab's own tiny GPT and calibration data.

qlab's `gptq.find_params` stays enabled: `ql.gptq.apply` (the notebook's glue) measures RTN's layer error with
`gptq.rtn`, which calls it.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import cache

import torch
from torch import nn

import qlab as ql
from autograder.spec import Check, Part, call, close, expect, labels, letter, returned, tensor

DISABLED = ql.labs.DISABLED["lab5"]  # qlab functions the lab switches off (qlab/labs.py)
BITS, GROUP = 3, 128


def hidden_labels():
    """hidden("symmetric") -> "hidden check 1 (symmetric)": the category of a hidden check's inputs, by hand."""
    count = labels("hidden check")
    return lambda category: f"{count()} ({category})"


@cache
def setup():
    """The tiny GPT, the calibration batches and the validation bytes, as the setup cell makes them."""
    return ql.models.tiny_gpt(), ql.data.lm_calibration_batches(2, 8, seq_len=128, seed=0), ql.data.pydoc_corpus("val")


def bits_per_byte(model: nn.Module) -> float:
    return ql.eval.perplexity(model, setup()[2], max_tokens=4096, batch_size=32, progress=False)["bits_per_token"]


@cache
def fp32_bpb() -> float:
    return bits_per_byte(setup()[0])


@cache
def rtn_bpb() -> float:
    return bits_per_byte(ql.quantize_(copy.deepcopy(setup()[0]), ql.RTNConfig(qtype=BITS, group_size=GROUP)))


@cache
def method_bpb(method: str) -> float:
    """Bits per byte of the tiny GPT after qlab's "gptq" or "awq" walker, the lab's setting."""
    gpt, calib, _ = setup()
    model = copy.deepcopy(gpt)
    module, config = (ql.gptq, ql.GPTQConfig) if method == "gptq" else (ql.awq, ql.AWQConfig)
    module.apply(model, config(qtype=BITS, group_size=GROUP), calib, progress=False)
    return bits_per_byte(model)


# -- Part 1: find_params -----------------------------------------------------------------------------------


def near_tie(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Where -min(x, 0) / scale is within 1e-4 of a rounding tie (there the last bit of float arithmetic decides)."""
    v = -x.float().min(dim=1).values.clamp(max=0) / scale
    return ((v % 1) - 0.5).abs() < 1e-4


def fp_check(x: torch.Tensor, bits: int, symmetric: bool, label: str, expected=None) -> Check:
    s_ref, z_ref = ql.gptq.find_params(x, bits, symmetric) if expected is None else expected
    ok = ~near_tie(x, s_ref)

    def judge(out):
        scale, zero = returned(out, 2, "find_params")
        scale = tensor(scale, torch.float32, (x.shape[0],), "scale")
        zero = tensor(zero, torch.float32, (x.shape[0],), "zero")
        expect(torch.allclose(scale, s_ref, rtol=1e-6), "scale differs (the range contains 0, and symmetric widens it only "
               "where the min is negative; an all-zero row gets [-1, 1])")
        expect(torch.equal(zero[ok], z_ref[ok]), "zero differs (round(-min / scale); symmetric: (2^bits) / 2)")

    return Check(call("find_params_result", x, bits, symmetric), judge, label)


def find_params_part() -> Part:
    X = torch.tensor([[-1.0, 0.5, 2.0], [0.25, 0.5, 1.0]])
    checks = [fp_check(X, 2, False, "the worked example", (torch.tensor([1.0, 1 / 3]), torch.tensor([1.0, 0.0]))),
              fp_check(X, 2, True, "the worked example, symmetric", (torch.tensor([4 / 3, 1 / 3]), torch.tensor([2.0, 2.0])))]
    g = torch.Generator().manual_seed(1)
    checks.append(fp_check(torch.randn(32, 128, generator=g) * torch.rand(32, 1, generator=g), 4, False, "random rows, 4 bits"))
    g, hidden = torch.Generator().manual_seed(501), hidden_labels()
    for shape, bits, symmetric, label in [((16, 128), 3, False, "small weights"), ((16, 128), 3, True, "small weights, symmetric"),
                                          ((7, 32), 2, False, "the lowest bit width"), ((64, 16), 8, False, "the highest bit width"),
                                          ((5, 300), 4, True, "long rows, symmetric")]:
        checks.append(fp_check(torch.randn(*shape, generator=g) * 0.05, bits, symmetric, hidden(label)))
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 1.0, 2.0, 0.25], [-0.5, -1.0, -3.0, -0.25]])
    checks += [fp_check(x, 4, symmetric, hidden(f"an all-zero, an all-positive and an all-negative row{kind}"))
               for symmetric, kind in ((False, ""), (True, ", symmetric"))]
    return Part("test_find_params", 15, tuple(checks))


# -- Part 2: GPTQ ------------------------------------------------------------------------------------------


def dequantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    gs = codes.shape[1] // scale.shape[1]
    return (codes.float() - zero.repeat_interleave(gs, dim=1)) * scale.repeat_interleave(gs, dim=1)


def gptq_check(W, H, bits, group_size, block_size, label, rtn_factor=None, rtn_codes=False) -> Check:
    N, K = W.shape
    G = 1 if group_size == -1 else K // group_size
    ref = ql.gptq.quantize_weight(W, H, bits, group_size=group_size, block_size=block_size)
    ref_error = ql.gptq.layer_error(W, ref.dequantize(), H)
    rtn = ql.gptq.rtn(W, bits, group_size)

    def judge(out):
        codes, scale, zero, unchanged = returned(out, 4, "gptq_quantize")
        codes = tensor(codes, torch.int64, (N, K), "the codes")
        scale = tensor(scale, torch.float32, (N, G), "scale")
        zero = tensor(zero, torch.float32, (N, G), "zero")
        expect(unchanged is True, "gptq_quantize must not modify W or H: work on copies")
        expect(int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1, f"{bits}-bit codes must lie in [0, {2**bits - 1}]")
        if rtn_codes:  # GPTQ's codes are RTN's here; 99 %, as for GPTQ's codes: a rounding tie may go either way
            expect(float((codes == rtn.int_repr().long()).float().mean()) >= 0.99, "H = I: GPTQ's codes must be RTN's")
        expect(float((codes == ref.int_repr()).float().mean()) >= 0.99, "fewer than 99 % of the codes match GPTQ's")
        error = ql.gptq.layer_error(W, dequantized(codes, scale, zero), H)
        expect(error <= 1.01 * ref_error, "the layer error is more than 1 % above GPTQ's")
        if rtn_factor is not None:
            expect(error < rtn_factor * ql.gptq.layer_error(W, rtn.dequantize(), H),
                   f"group_size {group_size}: GPTQ's layer error must be well below RTN's")

    return Check(call("gptq_result", W, H, bits, group_size, block_size), judge, label)


def gptq_layer() -> Part:
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 64, generator=g)
    checks = [gptq_check(W, torch.eye(64), 4, 32, 128, "H = I", rtn_codes=True)]
    X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    H = 2 / 512 * X.T @ X
    checks += [gptq_check(W, H, 3, gs, bs, f"correlated inputs, group_size {gs}, block_size {bs}", rtn_factor=0.8)
               for gs, bs in [(-1, 128), (32, 128), (32, 16)]]
    g, hidden = torch.Generator().manual_seed(502), hidden_labels()
    for N, K, bits, group_size, block_size, dead, label in [
            (24, 96, 4, -1, 128, False, "one group per row"), (32, 128, 3, 32, 128, False, "several groups in a block"),
            (16, 128, 4, 32, 16, False, "blocks smaller than a group"), (20, 64, 3, 16, 128, True, "dead input channels"),
            (8, 256, 2, 128, 128, False, "the lowest bit width, several blocks")]:
        W = torch.randn(N, K, generator=g) * 0.1
        X = torch.randn(4 * K, K, generator=g) @ torch.randn(K, K, generator=g) * torch.rand(K, generator=g)
        if dead:
            X[:, [0, 7, 40]] = 0
        checks.append(gptq_check(W, ql.gptq.hessian(X), bits, group_size, block_size, hidden(label)))
    return Part("test_gptq_layer", 20, tuple(checks))


def model_layers(layers, what: str) -> None:
    n_linears = 4 * len(setup()[0].blocks)
    expect(isinstance(layers, tuple) and len(layers) == n_linears and set(layers) == {"WeightOnlyLinear"},
           f"every linear of {what}'s blocks must be a 3-bit WeightOnlyLinear")


def gptq_model() -> Part:
    def judge(out):
        layers, bpb = returned(out, 2, "gptq_model_result")
        model_layers(layers, "gptq_model")
        expect(type(bpb) is float, "bits_per_byte must be a float")
        expect(rtn_bpb() - bpb >= 0.5 * (rtn_bpb() - fp32_bpb()), "GPTQ must close at least half of RTN's gap to FP32")
        expect(close(bpb, method_bpb("gptq"), atol=0.01), "gptq_model's bits per byte differ from qlab's GPTQ by more than 0.01")

    return Part("test_gptq_model", 20, (Check(call("gptq_model_result"), judge, "GPTQ on the tiny GPT"),))


# -- Part 3: AWQ -------------------------------------------------------------------------------------------


class Fanout(nn.Module):
    """The notebook's Fanout: linears that read the same input, outputs side by side."""

    def __init__(self, weights) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights)
        with torch.no_grad():
            for lin, w in zip(self.linears, weights):
                lin.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([lin(x) for lin in self.linears], dim=-1)


def check_scales(s, expected: torch.Tensor, what: str) -> None:
    s = tensor(s, torch.float32, tuple(expected.shape), "s")
    expect(bool(torch.isfinite(s).all() and (s > 0).all()), "s must be finite and positive")
    expect(torch.allclose(s, expected, rtol=1e-4), "s differs from AWQ's (mean|x|^r, normalised, for the best r "
           "of the grid, r = 1 excluded)")


def awq_check(W, x, bits, group_size, n_grid, parts, label, expected=None) -> Check:
    if expected is None:
        block = Fanout(W.chunk(parts))
        expected = ql.awq.search_scales(block, x, list(block.linears), bits, group_size, n_grid)

    def judge(out):
        s, restored = returned(out, 2, "search_scales")
        expect(restored is True, "search_scales must restore every linear's weights before it returns")
        check_scales(s, expected, label)

    return Check(call("awq_scales_result", W, x, bits, group_size, n_grid, parts), judge, label)


@cache
def mlp_reference() -> torch.Tensor:
    gpt, calib, _ = setup()
    seen = []
    handle = gpt.get_submodule("blocks.0.mlp").register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            gpt(calib[0])
    finally:
        handle.remove()
    mlp = copy.deepcopy(gpt.get_submodule("blocks.0.mlp"))
    return ql.awq.search_scales(mlp, seen[0], [mlp.c_fc], BITS, GROUP)


def awq_scales() -> Part:
    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, 64, generator=g)
    x = torch.randn(4, 32, 64, generator=g) * torch.rand(64, generator=g) ** 3 * 5
    checks = [awq_check(W, x, 4, 32, 20, 2, "two linears reading x"),
              awq_check(W, torch.ones(2, 10, 64), 4, 32, 20, 2, "equal channels", torch.ones(64))]
    g, hidden = torch.Generator().manual_seed(503), hidden_labels()
    for K, N, parts, bits, group_size, n_grid, label in [(128, 32, 1, 3, 64, 20, "one linear"),
                                                         (64, 48, 3, 4, 32, 20, "three linears reading x"),
                                                         (96, 24, 1, 3, -1, 10, "one group per row, a shorter grid")]:
        W = torch.randn(N, K, generator=g)
        x = torch.randn(2, 48, K, generator=g) * torch.rand(K, generator=g) ** 4 * 10
        checks.append(awq_check(W, x, bits, group_size, n_grid, parts, hidden(label)))
    important = torch.arange(64) % 2 == 0  # the loss falls all the way to r = 0.95: r = 1 would win if it were in the grid
    W = torch.randn(16, 64, generator=g) * torch.where(important, 0.01, 3.0)
    x = torch.randn(96, 64, generator=g) * torch.where(important, 1.0, 0.01)
    checks.append(awq_check(W, x, 4, 32, 20, 1, hidden("a loss that falls to the end of the grid")))

    def judge_mlp(out):
        check_scales(returned(out, None, "search_scales"), mlp_reference(), "the first block's MLP")

    checks.append(Check(call("mlp_scales_result"), judge_mlp, hidden("the first block's MLP")))
    return Part("test_awq_scales", 20, tuple(checks))


def awq_model() -> Part:
    def judge(out):
        layers, bpb = returned(out, 2, "awq_model_result")
        model_layers(layers, "awq_model")
        expect(type(bpb) is float, "bits_per_byte must be a float")
        expect(bpb < rtn_bpb(), "AWQ must beat RTN")
        expect(close(bpb, method_bpb("awq"), atol=0.01), "awq_model's bits per byte differ from qlab's AWQ by more than 0.01")

    return Part("test_awq_model", 15, (Check(call("awq_model_result"), judge, "AWQ on the tiny GPT"),))


# -- Part 4: analysis --------------------------------------------------------------------------------------


def analysis_answers() -> Part:
    return Part("test_analysis_answers", 10, (dataclasses.replace(letter("why_identity", "b"), points=5),
                                              dataclasses.replace(letter("why_scale", "d"), points=5)))


def parts() -> list[Part]:
    """The graded parts of lab 5, in notebook order."""
    return [find_params_part(), gptq_layer(), gptq_model(), awq_scales(), awq_model(), analysis_answers()]
