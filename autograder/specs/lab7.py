"""Grading spec of lab 7 (FP8: tensorwise and rowwise quantization, delayed scaling, the scaled FP8 linear and
FP8 on the tiny GPT, analysis): the checks of each test cell of labs/source/lab7/lab7.ipynb.

Each part makes the checks of the test cell with its grade_id, visible and hidden, on the same seeds and with
the same tolerances. The students' functions run in the sandbox through the notebook's locked helpers
(`fp8_quantize_result`, `fp8_rowwise_result`, `delayed_scales_result`, `delayed_quantize_result`,
`fp8_linear_result`, `fp8_model_result`), which send FP8 codes back as their raw bytes (uint8: plain data has
no FP8 dtype); every expected value is computed here, in the grading process, with qlab's fp8 (Transformer
Engine's scaling rules, clamp before the cast, `scaled_mm` emulating torch._scaled_mm) on the lab's own tiny GPT
and validation bytes.

Codes are compared bit for bit with qlab's, for qlab's scale and for the scales up to two float32 steps from it
(`qlab_references`): the last bits of fp8_max / amax depend on how the division is written (torch computes
`float / tensor` as a reciprocal times the float; a Python-float or a tensor division rounds once), and a
student who writes it another way has still quantized correctly. The model's bits per byte must be within 0.001
of qlab's FP8Config: equivalent implementations differ by about 1e-4 (a float32 rounding upstream can flip an FP8
rounding downstream), and the FP32 model, 0.0018 away, must not pass.

Disabled: every qlab function that computes what the students write: a scale (`fp8.amax_to_scale`), codes
(`fp8.quantize`), values from codes (`fp8.dequantize`), the scaled matmul (`fp8.scaled_mm`) and the amax history
(`fp8.AmaxHistory.update`, `fp8.AmaxHistory.scale_for`). `FP8Linear` and `FP8Config` need no entry of their own:
they call `quantize` and `scaled_mm`, so they fail in the sandbox too. The notebook's locked cells need none of
these: the setup cell builds its format tables with torch.finfo, and the glue's `YourFP8Linear` calls the
student's `fp8_linear`, not qlab's layer. `fp8.fp8_dtype` and `fp8.fp8_max` stay enabled: they are the format
table (`FP8_DTYPE`, `FP8_MAX`) the setup cell hands out anyway.
"""

from __future__ import annotations

import copy
from functools import cache

import torch
from torch import nn

import qlab as ql
from autograder.spec import Check, Outcome, Part, call, close, expect, labels, letter, returned, tensor

DISABLED = ql.labs.DISABLED["lab7"]  # qlab functions the lab switches off (qlab/labs.py)
FP8_DTYPE = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {fmt: torch.finfo(dtype).max for fmt, dtype in FP8_DTYPE.items()}
MANTISSA_BITS = {"e4m3": 3, "e5m2": 2}
INF, NAN = float("inf"), float("nan")


def hidden_labels():
    """hidden("an all-zero tensor") -> "hidden check 1 (an all-zero tensor)": the category of a hidden check's inputs."""
    count = labels("hidden check")
    return lambda category: f"{count()} ({category})"


@cache
def setup():
    """The tiny GPT and the validation bytes, as the setup cell makes them."""
    return ql.models.tiny_gpt(), ql.data.pydoc_corpus("val")


def bits_per_byte(model: nn.Module) -> float:
    return ql.eval.perplexity(model, setup()[1], max_tokens=4096, batch_size=32, progress=False)["bits_per_token"]


@cache
def fp32_bpb() -> float:
    return bits_per_byte(setup()[0])


@cache
def fp8_bpb() -> float:
    """qlab's E4M3 tensorwise recipe on the block linears: the model the student's fp8_linear must reproduce."""
    config = ql.FP8Config(fmt="e4m3", recipe="tensorwise", include=("blocks.*",))
    return bits_per_byte(ql.quantize_(copy.deepcopy(setup()[0]), config))


# -- what the helpers send back --------------------------------------------------------------------------------


def decoded(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """FP8 codes given as bytes (uint8) as float32 values."""
    return codes.view(FP8_DTYPE[fmt]).float()


def fp8_codes(dtype, codes, fmt: str, shape: tuple) -> torch.Tensor:
    """The codes (bytes) of a helper's answer, after checking that they were FP8 codes of the right format."""
    expect(dtype == str(FP8_DTYPE[fmt]), f"{fmt.upper()} codes must be {FP8_DTYPE[fmt]}")
    return tensor(codes, torch.uint8, shape, "the tensor of codes")


def qlab_references(x: torch.Tensor, fmt: str, scale: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """qlab's (codes, dequant scale) of x for the QUANTIZE scale `scale` (() or one per row), then for the scales one
    and two float32 steps either side: writing fp8_max / amax another way can change the scale's last bit."""
    return [ql.fp8.quantize(x, fmt, scale=(scale.view(torch.int32) + k).view(torch.float32)) for k in (0, -1, 1, -2, 2)]


def same_codes(codes: torch.Tensor, references: list, by_row: bool) -> bool:
    """Bit for bit equal to one of the references: as a whole, or row by row (a scale per row or per step)."""
    if not by_row:
        return any(torch.equal(codes, c.view(torch.uint8)) for c, _ in references)
    rows_ok = torch.stack([(codes == c.view(torch.uint8)).all(dim=-1) for c, _ in references]).any(dim=0)
    return bool(rows_ok.all())


# -- Part 1: one scale per tensor -----------------------------------------------------------------------------


def quantize_answer(out: Outcome, x: torch.Tensor, fmt: str, name: str = "fp8_quantize",
                    scale_shape: tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as bytes, dequant scale) of a helper that returned (dtype text, codes as bytes, dequant scale)."""
    dtype, codes, dequant_scale = returned(out, 3, name)
    codes = fp8_codes(dtype, codes, fmt, tuple(x.shape))
    return codes, tensor(dequant_scale, torch.float32, scale_shape, "the dequant scale")


def reference_check(x: torch.Tensor, fmt: str, label: str) -> Check:
    """A hidden check: codes bit for bit and the dequant scale to 1e-6 against ql.fp8.quantize."""
    references = qlab_references(x, fmt, ql.fp8.amax_to_scale(x.abs().amax(), fmt))
    dequant_ref = references[0][1]

    def judge(out):
        codes, dequant_scale = quantize_answer(out, x, fmt)
        expect(same_codes(codes, references, by_row=False), f"{fmt}: the codes differ from qlab's (amax, scale = fp8_max / "
               "amax or 1.0, clamp, then cast)")
        expect(torch.allclose(dequant_scale, dequant_ref, rtol=1e-6), f"{fmt}: the dequant scale differs")

    return Check(call("fp8_quantize_result", x, fmt), judge, label)


def exact_check(x: torch.Tensor, fmt: str, values: list, dequant: float, label: str, message: str) -> Check:
    """A visible check with values worked out by hand (NaN compared as NaN)."""
    expected = torch.tensor(values)

    def judge(out):
        codes, dequant_scale = quantize_answer(out, x, fmt)
        got = decoded(codes, fmt)
        same_nans = torch.equal(torch.isnan(got), torch.isnan(expected))
        expect(same_nans and torch.equal(got.nan_to_num(0), expected.nan_to_num(0)), message)
        if dequant == 1.0:  # an unscaled tensor: exactly 1.0
            expect(float(dequant_scale) == 1.0, "the dequant scale must be 1.0")
        else:
            expect(torch.allclose(dequant_scale, torch.tensor(dequant), rtol=1e-6), "the dequant scale differs")

    return Check(call("fp8_quantize_result", x, fmt), judge, label)


def rounding_check(x: torch.Tensor, fmt: str, label: str) -> Check:
    """The visible random tensor: the amax lands on fp8_max, and every normal value is rounded to the nearest."""

    def judge(out):
        codes, dequant_scale = quantize_answer(out, x, fmt)
        values = decoded(codes, fmt)
        expect(float(values.abs().max()) == FP8_MAX[fmt], f"the amax must land on {FP8_MAX[fmt]:g}")
        normal = x.abs() / float(dequant_scale) >= torch.finfo(FP8_DTYPE[fmt]).smallest_normal
        error = ((values * dequant_scale - x).abs() / x.abs())[normal].max()
        expect(bool(error <= 2.0 ** -(MANTISSA_BITS[fmt] + 1) * (1 + 1e-5)), "round to the nearest FP8 value")

    return Check(call("fp8_quantize_result", x, fmt), judge, label)


def fp8_quantize_part() -> Part:
    checks = [
        exact_check(torch.tensor([0.5, -1.0, 2.0, 0.3]), "e4m3", [112.0, -224.0, 448.0, 64.0], 1 / 224,
                    "the worked example", "expected the codes [112, -224, 448, 64]"),
        exact_check(torch.tensor([1e5, -INF, 3.0]), "e5m2", [57344.0, -57344.0, 3.0], 1.0, "values beyond E5M2's max",
                    "an amax of Inf leaves the tensor unscaled, and values beyond the max saturate (clamp before the cast)"),
        exact_check(torch.tensor([1.0, NAN, -2.0]), "e4m3", [1.0, NAN, -2.0], 1.0, "NaN",
                    "NaN stays NaN, and an amax of NaN leaves the tensor unscaled"),
        exact_check(torch.zeros(3, 4), "e4m3", [[0.0] * 4] * 3, 1.0, "an all-zero tensor", "codes 0 and dequant scale 1.0"),
    ]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 128, generator=g)
    checks += [rounding_check(x, fmt, f"a random tensor, {fmt}") for fmt in ("e4m3", "e5m2")]
    g, hidden = torch.Generator().manual_seed(701), hidden_labels()
    for x, kind in [(torch.randn(64, 96, generator=g) * 3, "values of a few units"),
                    (torch.randn(48, 80, generator=g) * 10 ** (torch.rand(48, 80, generator=g) * 8 - 4),
                     "values spanning eight powers of ten"),
                    (torch.randn(4, 16, 32, generator=g) * 1e-3, "a 3-D tensor of tiny values"),
                    (torch.zeros(5, 7), "an all-zero tensor"),
                    (torch.tensor([[2e5, -3.0, 0.5], [INF, 1e-3, -7.0]]), "an Inf and a value beyond E4M3's max"),
                    (torch.tensor([NAN, 2.0, -1e6, 0.0]), "a NaN and a value beyond both formats' max")]:
        checks += [reference_check(x, fmt, hidden(f"{kind}, {fmt.upper()}")) for fmt in ("e4m3", "e5m2")]
    return Part("test_fp8_quantize", 20, tuple(checks))


# -- Part 2: one scale per row ---------------------------------------------------------------------------------


def rowwise_reference_check(x: torch.Tensor, fmt: str, label: str) -> Check:
    references = qlab_references(x, fmt, ql.fp8.amax_to_scale(x.abs().amax(dim=1, keepdim=True), fmt))  # ql.PerToken()
    dequant_ref = references[0][1]

    def judge(out):
        codes, dequant_scale = quantize_answer(out, x, fmt, "fp8_quantize_rowwise", (x.shape[0], 1))
        expect(same_codes(codes, references, by_row=True), f"{fmt}: the codes differ from qlab's (one amax and one scale "
               "per row, 1.0 where a row's amax is 0, Inf or NaN; clamp, then cast)")
        expect(torch.allclose(dequant_scale, dequant_ref, rtol=1e-6), f"{fmt}: the dequant scales differ")

    return Check(call("fp8_rowwise_result", x, fmt), judge, label)


def rowwise_exact_check(x: torch.Tensor, fmt: str, values: list, dequant: list | None, label: str, message: str) -> Check:
    def judge(out):
        codes, dequant_scale = quantize_answer(out, x, fmt, "fp8_quantize_rowwise", (x.shape[0], 1))
        expect(decoded(codes, fmt).tolist() == values, message)
        if dequant is not None:
            expect(torch.allclose(dequant_scale, torch.tensor(dequant), rtol=1e-6), "the dequant scales differ")

    return Check(call("fp8_rowwise_result", x, fmt), judge, label)


def rows_apart_checks(x: torch.Tensor) -> list[Check]:
    """The visible rows six powers of ten apart: every row precise with its own scale; with one scale for the
    whole tensor (x as a single row), the smallest row is lost."""

    def judge_rows(out):
        codes, dequant_scale = quantize_answer(out, x, "e4m3", "fp8_quantize_rowwise", (x.shape[0], 1))
        errors = (decoded(codes, "e4m3") * dequant_scale - x).norm(dim=1) / x.norm(dim=1)
        expect(bool((errors < 0.05).all()), "with one scale per row, every row keeps E4M3's relative precision (a few %)")

    def judge_one_row(out):
        whole = x.reshape(1, -1)
        codes, dequant_scale = quantize_answer(out, whole, "e4m3", "fp8_quantize_rowwise", (1, 1))
        x_hat = (decoded(codes, "e4m3") * dequant_scale).reshape(x.shape)
        expect(float(((x_hat - x).norm(dim=1) / x.norm(dim=1))[0]) > 0.5,
               "with one scale for the whole tensor, the smallest row must fall below E4M3's range")

    return [Check(call("fp8_rowwise_result", x, "e4m3"), judge_rows, "rows far apart"),
            Check(call("fp8_rowwise_result", x.reshape(1, -1), "e4m3"), judge_one_row, "one scale for the whole tensor")]


def fp8_rowwise_part() -> Part:
    checks = [
        rowwise_exact_check(torch.tensor([[1.0, -2.0, 4.0], [0.0, 0.0, 0.0], [0.5, 0.25, -0.125]]), "e4m3",
                            [[112.0, -224.0, 448.0], [0.0, 0.0, 0.0], [448.0, 224.0, -112.0]], [[1 / 112], [1.0], [1 / 896]],
                            "the worked example", "the codes differ from the worked example's"),
        rowwise_exact_check(torch.tensor([[1e5, -INF], [2.0, -1.0]]), "e5m2", [[57344.0, -57344.0], [57344.0, -28672.0]],
                            None, "a row with an Inf", "a row whose amax is Inf is left unscaled, and saturates at "
                            "±57344 (clamp before the cast)"),
    ]
    g = torch.Generator().manual_seed(2)
    checks += rows_apart_checks(torch.randn(4, 256, generator=g) * torch.tensor([[1e-4], [1e-2], [1.0], [1e2]]))
    g, hidden = torch.Generator().manual_seed(702), hidden_labels()
    nasty = torch.tensor([[0.0, 0.0, 0.0, 0.0], [INF, 1.0, -1e6, 2.0], [NAN, 3.0, -1.0, 0.5],
                          [1e-30, -3e-31, 0.0, 1e-31], [2e5, -7.0, 0.25, 1.0]])
    for x, kind in [(torch.randn(32, 96, generator=g) * 10 ** (torch.rand(32, 1, generator=g) * 6 - 3),
                     "rows six powers of ten apart"),
                    (torch.randn(7, 300, generator=g) * 10 ** (torch.rand(7, 300, generator=g) * 4 - 2),
                     "values spanning four powers of ten"),
                    (nasty, "rows of zeros, with an Inf, with a NaN, of tiny values, beyond the max")]:
        checks += [rowwise_reference_check(x, fmt, hidden(f"{kind}, {fmt.upper()}")) for fmt in ("e4m3", "e5m2")]
    return Part("test_fp8_rowwise", 15, tuple(checks))


# -- Part 3: delayed scaling -----------------------------------------------------------------------------------


def scales_check(xs: torch.Tensor, history_len: int, fmt: str, expected: torch.Tensor, label: str, message: str) -> Check:
    def judge(out):
        scales = tensor(returned(out, None, "DelayedScaler"), torch.float32, (xs.shape[0],), "the scales")
        expect(torch.allclose(scales, expected, rtol=1e-6), message)

    return Check(call("delayed_scales_result", xs, history_len, fmt), judge, label)


def amax_history_scales(xs: torch.Tensor, history_len: int, fmt: str) -> torch.Tensor:
    """qlab's delayed scaling over the steps xs: the scale of each step (from the previous ones), (T,)."""
    history, scales = ql.fp8.AmaxHistory(history_len), []
    for x in xs:
        scales.append(history.scale_for(fmt))
        history.update(x)
    return torch.stack(scales)


def delayed_scaler_part() -> Part:
    xs = torch.tensor([[2.0, -1.0], [-4.0, 0.0], [1.0, 0.5], [1.0, 1.0], [-1.0, 0.0], [0.5, 0.0], [0.25, -0.5]])
    checks = [
        scales_check(xs, 3, "e4m3", torch.tensor([1.0, 224, 112, 112, 112, 448, 448]), "the worked example",
                     "the scales differ from the worked example's"),
        scales_check(xs, 3, "e5m2", torch.tensor([1.0, 28672, 14336, 14336, 14336, 57344, 57344]),
                     "the worked example in E5M2", "every scale but the first (1.0) is 57344 / 448 = 128 times larger"),
        scales_check(xs, 1, "e4m3", torch.tensor([1.0, 224, 112, 448, 448, 448, 896]), "history_len = 1",
                     "the scale comes from the previous step alone"),
        scales_check(torch.tensor([[0.0], [8.0], [0.0], [0.0], [0.0]]), 2, "e4m3",
                     torch.tensor([1.0, 1.0, 56.0, 56.0, 56.0]), "zeros",
                     "where the history holds only zeros, the previous scale is kept (1.0 at first)"),
        scales_check(torch.tensor([[2.0], [INF], [1.0], [1.0], [1.0]]), 2, "e4m3",
                     torch.tensor([1.0, 224.0, 224.0, 224.0, 448.0]), "an Inf",
                     "while an Inf is in the history, the previous scale is kept"),
    ]
    g, hidden = torch.Generator().manual_seed(703), hidden_labels()
    for history_len, fmt, spike, zero, inf, kind in [
            (4, "e4m3", 12, 0, None, "a spike, an all-zero first step, E4M3"),
            (1, "e5m2", 7, 20, None, "a history of one step, a spike, an all-zero step, E5M2"),
            (16, "e4m3", 3, 0, 25, "a long history, a spike, an all-zero first step, an Inf, E4M3"),
            (3, "e5m2", 15, 16, 5, "an Inf, a spike, an all-zero step, E5M2")]:
        xs = torch.randn(30, 64, generator=g) * (0.5 + torch.rand(30, 1, generator=g))
        xs[spike] *= 20
        xs[zero] = 0.0
        if inf is not None:
            xs[inf, 3] = INF
        checks.append(scales_check(xs, history_len, fmt, amax_history_scales(xs, history_len, fmt), hidden(kind),
                                   "the scales differ from delayed scaling's (the max of the last history_len amaxes; "
                                   "the previous scale where that max is 0 or not finite)"))
    return Part("test_delayed_scaler", 12, tuple(checks))


def delayed_answer(out: Outcome, xs: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as bytes (T, n), dequant scales (T,)) of delayed_quantize_result."""
    dtype, codes, dequant_scales = returned(out, 3, "fp8_quantize_delayed")
    codes = fp8_codes(dtype, codes, fmt, tuple(xs.shape))
    return codes, tensor(dequant_scales, torch.float32, (xs.shape[0],), "the dequant scales")


def own_scales(out: Outcome, xs: torch.Tensor) -> torch.Tensor | None:
    """The scales the student's own DelayedScaler gives on the steps xs (Part 3's first half), if it gave usable ones:
    fp8_quantize_delayed is judged with them as well, so that a mistake in the scaler is not counted twice."""
    try:
        scales = tensor(returned(out, None, "DelayedScaler"), torch.float32, (xs.shape[0],), "the scales")
    except Exception:
        return None
    return scales if bool((torch.isfinite(scales) & (scales > 0)).all()) else None


def spike_check(xs: torch.Tensor) -> Check:
    """The visible spike at step 5 (history_len 3, E4M3): the scales of the previous steps (as the text computes
    them, or as the student's own DelayedScaler gives them), the spike clipped."""
    amaxes = xs.abs().amax(dim=1)  # (T,)
    expected = torch.tensor([1.0] + [448 / float(amaxes[max(0, t - 3):t].max()) for t in range(1, len(xs))])

    def judge(out, own):
        codes, dequant_scales = delayed_answer(out, xs, "e4m3")
        own = own_scales(own, xs)
        expect(torch.allclose(1 / dequant_scales, expected, rtol=1e-5) or
               (own is not None and torch.allclose(1 / dequant_scales, own, rtol=1e-5)),
               "step t must be quantized with the scale your DelayedScaler gives before it records step t (that of steps "
               "t-3 .. t-1; the first step: 1.0), never with its own amax")
        values = decoded(codes, "e4m3")
        expect(int((values[5].abs() == 448).sum()) > 10, "at the spike, the values beyond the history's amax must saturate "
               "at ±448")
        expect(float(values[6:].abs().max()) < 448 / 2, "after the spike, its amax sets the scale: the next steps stay far "
               "below 448")

    return Check(call("delayed_quantize_result", xs, 3, "e4m3"), judge, "a spike",
                 context=(call("delayed_scales_result", xs, 3, "e4m3"),))


def delayed_quantize_part() -> Part:
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(8, 64, generator=g)
    xs[5] *= 6
    checks = [spike_check(xs)]
    g, hidden = torch.Generator().manual_seed(704), hidden_labels()
    for history_len, fmt, spike, kind in [(4, "e4m3", 10.0, "a spike, E4M3"), (2, "e5m2", 1e6, "a huge spike, E5M2"),
                                          (16, "e4m3", 3.0, "a long history, a small spike, E4M3"),
                                          (1, "e5m2", 0.01, "a history of one step, a dip, E5M2")]:
        xs = torch.randn(20, 48, generator=g) * (0.5 + torch.rand(20, 1, generator=g))
        xs[9] *= spike
        scale = amax_history_scales(xs, history_len, fmt)[:, None]  # (T, 1): each step's scale, from the steps before it
        checks.append(delayed_reference_check(xs, history_len, fmt, qlab_references(xs, fmt, scale), hidden(kind)))
    return Part("test_delayed_quantize", 8, tuple(checks))


def delayed_reference_check(xs, history_len, fmt, references, label) -> Check:
    dequant_ref = references[0][1].flatten()  # (T,)

    def judge(out, own):
        codes, dequant_scales = delayed_answer(out, xs, fmt)
        if same_codes(codes, references, by_row=True) and torch.allclose(dequant_scales, dequant_ref, rtol=1e-6):
            return
        own = own_scales(own, xs)  # errors carried forward: the codes your own DelayedScaler's scales give
        theirs = None if own is None else qlab_references(xs, fmt, own[:, None])
        expect(same_codes(codes, references, by_row=True) or (theirs is not None and same_codes(codes, theirs, by_row=True)),
               f"{fmt}: the codes differ from delayed scaling's (the scale your DelayedScaler gives before it records "
               "the step; clamp, then cast)")
        expect(torch.allclose(dequant_scales, dequant_ref, rtol=1e-6) or
               (theirs is not None and torch.allclose(dequant_scales, theirs[0][1].flatten(), rtol=1e-6)),
               f"{fmt}: the dequant scales differ")

    return Check(call("delayed_quantize_result", xs, history_len, fmt), judge, label,
                 context=(call("delayed_scales_result", xs, history_len, fmt),))


# -- Part 4: the FP8 linear layer ------------------------------------------------------------------------------


def linear_output(out: Outcome, shape: tuple) -> torch.Tensor:
    return tensor(returned(out, None, "fp8_linear"), torch.float32, shape, "y")


def fp8_linear_part() -> Part:
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-14, 15, (8, 32), generator=g) / 4
    w = torch.randint(-14, 15, (16, 32), generator=g) / 4
    x[0, 0], w[0, 0] = 3.5, -3.5
    bias = torch.randn(16, generator=g)
    exact = x @ w.T + bias

    def judge_exact(out):
        y = linear_output(out, (8, 16))
        expect(torch.allclose(y, exact, rtol=1e-6, atol=1e-5), "operands that E4M3 holds exactly once scaled: the FP8 "
               "linear must give x w^T + bias exactly")

    checks = [Check(call("fp8_linear_result", x, w, bias, "e4m3"), judge_exact, "exact operands")]
    x = torch.randn(64, 256, generator=g)
    w = torch.randn(128, 256, generator=g) * 0.05
    for fmt, largest in (("e4m3", 0.05), ("e5m2", 0.1)):
        checks.append(rounding_linear_check(x, w, fmt, largest))
    g, hidden = torch.Generator().manual_seed(705), hidden_labels()
    for M, K, N, fmt, with_bias, kind in [(16, 64, 32, "e4m3", True, "a bias, E4M3"), (33, 128, 48, "e5m2", False, "no bias, E5M2"),
                                          (8, 256, 1024, "e4m3", False, "many outputs, no bias, E4M3"),
                                          (40, 96, 24, "e5m2", True, "a bias, E5M2")]:
        x = torch.randn(M, K, generator=g) * torch.rand(K, generator=g) ** 4 * 10
        w = torch.randn(N, K, generator=g) * 0.05
        bias = torch.randn(N, generator=g) if with_bias else None
        checks.append(scaled_mm_check(x, w, bias, fmt, hidden(f"a few large input channels, {kind}")))
    return Part("test_fp8_linear", 15, tuple(checks))


def rounding_linear_check(x, w, fmt: str, largest: float) -> Check:
    label = f"random operands, {fmt}"

    def judge(out):
        y = linear_output(out, (x.shape[0], w.shape[0]))
        error = float((y - x @ w.T).norm() / (x @ w.T).norm())
        expect(1e-4 < error < largest, "y must be x w^T up to FP8's rounding of x and w")

    return Check(call("fp8_linear_result", x, w, None, fmt), judge, label)


def scaled_mm_check(x, w, bias, fmt: str, label: str) -> Check:
    """A hidden check: y against ql.fp8.scaled_mm on qlab's codes of x and w (each with qlab's scale or a scale up to
    two float32 steps away, as in Part 1), to float32 rounding."""
    w_references = qlab_references(w, fmt, ql.fp8.amax_to_scale(w.abs().amax(), fmt))
    y_refs = [ql.fp8.scaled_mm(x8, w8.t(), x_scale, w_scale, bias=bias)
              for x8, x_scale in qlab_references(x, fmt, ql.fp8.amax_to_scale(x.abs().amax(), fmt))
              for w8, w_scale in w_references]
    bound = 1e-5 * float(y_refs[0].abs().max())

    def judge(out, x_out, w_out):
        y = linear_output(out, tuple(y_refs[0].shape))
        if min(float((y - y_ref).abs().max()) for y_ref in y_refs) <= bound:
            return
        y_own = own_linear(x_out, w_out, x, w, bias, fmt)  # errors carried forward: the matmul of your own codes
        expect(y_own is not None and float((y - y_own).abs().max()) <= 1e-5 * float(y_own.abs().max()),
               f"{fmt}: y differs from the scaled FP8 matmul's (codes of x and w with one scale each, made by your "
               "fp8_quantize, multiplied as float32, both dequant scales at the end, then the bias)")

    context = (call("fp8_quantize_result", x, fmt), call("fp8_quantize_result", w, fmt))
    return Check(call("fp8_linear_result", x, w, bias, fmt), judge, label, context=context)


def own_linear(x_out, w_out, x, w, bias, fmt: str) -> torch.Tensor | None:
    """qlab's emulation of torch._scaled_mm on the codes and dequant scales of the student's own fp8_quantize (None
    where those are unusable): Part 4 asks for the matmul of "your fp8_quantize"'s codes."""
    try:
        x8, x_scale = quantize_answer(x_out, x, fmt)
        w8, w_scale = quantize_answer(w_out, w, fmt)
        y = ql.fp8.scaled_mm(x8.view(FP8_DTYPE[fmt]), w8.view(FP8_DTYPE[fmt]).t(), x_scale, w_scale, bias=bias)
    except Exception:
        return None
    return y if bool(torch.isfinite(y).all()) else None


def fp8_model_part() -> Part:
    def judge(out):
        layers, bpb = returned(out, 2, "fp8_model_result")
        n_linears = 4 * len(setup()[0].blocks)
        expect(isinstance(layers, tuple) and len(layers) == n_linears and set(layers) == {"YourFP8Linear"},
               "every linear of fp8_model's blocks must be a YourFP8Linear")
        expect(type(bpb) is float, "bits_per_byte must be a float")
        expect(close(bpb, fp32_bpb(), atol=0.01), "E4M3 with one scale per tensor must stay within 0.01 bits/byte of FP32")
        expect(close(bpb, fp8_bpb(), atol=0.001), "fp8_model's bits per byte differ from qlab's FP8Config(recipe="
               "'tensorwise') by more than 0.001")

    return Part("test_fp8_model", 10, (Check(call("fp8_model_result"), judge, "FP8 on the tiny GPT"),))


# -- Part 5: analysis ------------------------------------------------------------------------------------------


def analysis_parts() -> list[Part]:
    answers = {"why_e5m2": "c", "no_zero_point": "a", "at_spike": "d", "int8_wins": "b"}
    return [Part(f"test_{name}", 5, (letter(name, right),)) for name, right in answers.items()]


def parts() -> list[Part]:
    """The graded parts of lab 7, in notebook order."""
    return [fp8_quantize_part(), fp8_rowwise_part(), delayed_scaler_part(), delayed_quantize_part(), fp8_linear_part(),
            fp8_model_part(), *analysis_parts()]
