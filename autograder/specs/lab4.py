"""Grading spec of lab 4 (outliers: vector-wise quantization with the outlier split, the decomposed matmul,
SmoothQuant's factors, SmoothQuant W8A8 on MiniLM): the checks of each test cell of labs/source/lab4/lab4.ipynb.

Each part makes the checks of the test cell with its grade_id, visible and hidden, on the same seeds and with
the same tolerances. The students' functions run in the sandbox through the notebook's locked helpers
(`matmul_outliers_result`, `scales_result`, `raises_value_error`, `llm_int8_embeddings`, `sq_embeddings`,
`sq_layers`, `sweep_values`); every expected value is computed here, in the grading process, with qlab's
llm_int8 and smoothquant (tested against bitsandbytes and the paper's formulas) on the lab's own MiniLM data.
"""

from __future__ import annotations

import copy
from functools import cache

import torch
import torch.nn.functional as F

import qlab as ql
from autograder.spec import Check, Part, call, close, expect, labels, letter, read, returned, tensor
from qlab.llm_int8 import int8_matmul_outliers, vectorwise_quant
from qlab.smoothquant import smoothing_scales

DISABLED = ("llm_int8.vectorwise_quant", "llm_int8.int8_matmul_outliers", "smoothquant.smoothing_scales")
SENTENCES = [
    "The cat sat on the mat.", "A cat was sitting on the rug.",
    "Stock markets fell sharply on Monday.", "Share prices dropped steeply at the start of the week.",
    "How do I bake sourdough bread?", "What is a good recipe for sourdough?",
    "The train to Paris leaves at noon.", "Our Paris train departs at 12 o'clock.",
    "She plays the violin in an orchestra.", "He is a violinist in a symphony orchestra.",
    "Quantization stores weights in fewer bits.", "Low-precision formats shrink model weights.",
    "It rained all weekend in Seattle.", "Seattle had a wet weekend.",
    "The patient was given antibiotics.", "Doctors prescribed an antibiotic to the patient.",
]
ALPHAS = (0.25, 0.5, 0.75)
A = torch.tensor([[1.0, -2.0, 6.0, 0.5], [0.3, 0.1, 0.2, -0.4]])


@cache
def setup():
    """MiniLM, the evaluation batch, the calibration batches and the FP32 embeddings, as the setup cell makes them."""
    mini = ql.models.minilm()
    batch = dict(mini.tokenize(SENTENCES))
    calib = [dict(mini.tokenize(ql.data.sentences(32)))]
    with torch.no_grad():
        fp32 = mini(**batch)
    return mini, batch, calib, fp32


def embeddings(model) -> torch.Tensor:
    _, batch, _, _ = setup()
    with torch.no_grad():
        return model(**batch)


def cosine_mean(emb: torch.Tensor) -> float:
    return float(F.cosine_similarity(emb, setup()[3], dim=-1).mean())


@cache
def smoothquant_embeddings(alpha: float) -> torch.Tensor:
    """qlab's SmoothQuant + static W8A8 MiniLM at alpha (8-bit activations), as the notebook builds it."""
    mini, _, calib, _ = setup()
    model = ql.quantize_(copy.deepcopy(mini), [ql.SmoothQuantConfig(alpha=alpha), ql.Int8StaticConfig(reduce_range=False)],
                         calib_data=calib)
    return embeddings(model)


@cache
def llm_int8_reference() -> torch.Tensor:
    mini = setup()[0]
    return embeddings(ql.quantize_(copy.deepcopy(mini), ql.LLMInt8Config(threshold=6.0)))


# -- Part 1: vectorwise_quant ------------------------------------------------------------------------------


def near_tie(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Where x * 127 / absmax is within 1e-3 of a rounding tie (there the last bit of float arithmetic decides)."""
    v = (x.float() * (127 / absmax.clamp(min=1e-30)[:, None])).abs()
    return ((v % 1) - 0.5).abs() < 1e-3


def vq_check(x: torch.Tensor, threshold: float, label: str, expected_codes=None) -> Check:
    q_ref, absmax_ref, cols_ref = vectorwise_quant(x, threshold)
    ok = ~near_tie(x, absmax_ref)

    def judge(out):
        q, absmax, cols = returned(out, 3, "vectorwise_quant")
        q = tensor(q, torch.int8, tuple(x.shape), "the codes")
        absmax = tensor(absmax, torch.float32, (x.shape[0],), "the row absmax")
        cols = tensor(cols, torch.int64, None, "the outlier columns")
        expect(cols.dim() == 1 and torch.equal(cols, cols_ref), "the outlier columns differ (|x| >= threshold in any row; sorted)")
        expect(torch.equal(absmax, absmax_ref), "the row absmax differs (only the outlier values are left out)")
        if expected_codes is not None:
            expect(q.tolist() == expected_codes, "the codes differ")
        expect(torch.equal(q[ok], q_ref[ok]), "the codes differ: round(x * 127 / absmax), clamped, outlier columns zeroed")

    return Check(call("vectorwise_quant", x, threshold), judge, label)


def vectorwise_plain() -> Part:
    checks = [vq_check(A, 0.0, "the worked example, threshold 0", [[21, -42, 127, 11], [95, 32, 64, -127]])]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 48, generator=g) * torch.rand(64, 1, generator=g) * 3
    checks.append(vq_check(x, 0.0, "random rows"))
    g, hidden = torch.Generator().manual_seed(401), labels("hidden check")
    for shape in [(1, 7), (33, 5), (8, 256)]:
        checks.append(vq_check(torch.randn(*shape, generator=g) * 4, 0.0, hidden()))
    checks.append(vq_check(torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]]), 0.0, hidden(), [[0, 0, 0], [127, -127, 64]]))
    checks.append(vq_check(torch.tensor([[2.0, -0.5, 0.25]], dtype=torch.float64), 0.0, hidden(), [[127, -32, 16]]))
    return Part("test_vectorwise_plain", 10, tuple(checks))


def vectorwise_outliers() -> Part:
    checks = [vq_check(A, 6.0, "the worked example, threshold 6", [[64, -127, 0, 32], [95, 32, 0, -127]])]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 64, generator=g)
    x[3, 10], x[7, 10], x[20, 41], x[0, 5] = 9.0, -7.5, 6.0, -6.0
    checks.append(vq_check(x, 6.0, "injected outliers"))
    g, hidden = torch.Generator().manual_seed(402), labels("hidden check")
    for shape, threshold, scale in [((16, 32), 6.0, 3.0), ((5, 100), 2.5, 1.0), ((64, 16), 6.0, 0.5), ((1, 20), 1.0, 2.0)]:
        checks.append(vq_check(torch.randn(*shape, generator=g) * scale, threshold, hidden()))
    checks.append(vq_check(torch.tensor([[7.0, -8.0, 0.0], [0.5, 1.0, -0.25]]), 6.0, hidden(), [[0, 0, 0], [0, 0, -32]]))
    checks.append(vq_check(torch.randn(4, 4, generator=g), 100.0, hidden()))
    return Part("test_vectorwise_outliers", 15, tuple(checks))


# -- Part 2: the decomposed matmul -------------------------------------------------------------------------


def exact_reference(x, w_q, w_absmax, threshold) -> torch.Tensor:
    """The lab's formula in float64 with int64 sums, written from the paper and bitsandbytes' conventions."""
    x = x.double()
    outliers = (x.abs() >= threshold) if threshold > 0 else torch.zeros_like(x, dtype=torch.bool)
    cols = outliers.any(dim=0)
    a = (x * ~outliers).abs().amax(dim=1)
    q = torch.round(x.float() * (127 / a.float().clamp(min=1e-30)[:, None])).clamp(-127, 127) * ~cols
    int8_part = (q.long() @ w_q.long().T).double() * (a[:, None] * w_absmax.double()[None, :]) / 127**2
    float_part = x[:, cols] @ (w_q[:, cols].double() * w_absmax.double()[:, None] / 127).T
    return (int8_part + float_part).float()


def quantized_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = w.abs().amax(dim=1)
    return torch.round(w * (127 / absmax[:, None])).clamp(-127, 127).to(torch.int8), absmax


def mm_check(x, w_q, w_absmax, threshold, label, rtol=1e-4, atol=None) -> Check:
    expected = exact_reference(x, w_q, w_absmax, threshold)
    ours, _ = int8_matmul_outliers(x, w_q, w_absmax, threshold)
    atol = 1e-4 if atol is None else atol

    def judge(out):
        y = tensor(returned(out, None, "int8_matmul_outliers"), torch.float32, tuple(expected.shape), "the result")
        expect(torch.allclose(y, expected, rtol=rtol, atol=atol) or torch.allclose(y, ours, rtol=rtol, atol=atol),
               "the result differs from the decomposed matmul (int8 part + float part of the outlier columns)")

    return Check(call("matmul_outliers_result", x, w_q, w_absmax, threshold), judge, label)


def matmul_outliers() -> Part:
    W = torch.tensor([[0.5, -1.0, 0.25, 2.0], [1.0, 1.0, -1.0, 0.0], [-0.2, 0.4, 0.1, 0.3]])
    w_q, w_absmax = quantized_weight(W)
    checks = [mm_check(A, w_q, w_absmax, 6.0, "the worked example", rtol=1e-5, atol=1e-6)]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 96, generator=g)
    x[:, 17] *= 12.0
    w = torch.randn(24, 96, generator=g) * 0.05
    w_q, w_absmax = quantized_weight(w)
    checks += [mm_check(x, w_q, w_absmax, t, f"an outlier channel, threshold {t}") for t in (6.0, 0.0)]
    g, hidden = torch.Generator().manual_seed(403), labels("hidden check")
    for M, K, N, threshold in [(1, 64, 8, 6.0), (17, 33, 5, 3.0), (64, 128, 32, 6.0), (9, 300, 7, 0.0)]:
        x = torch.randn(M, K, generator=g) * 2
        x[:, torch.randint(0, K, (3,), generator=g)] *= 8
        w_q, w_absmax = quantized_weight(torch.randn(N, K, generator=g))
        expected_scale = float(exact_reference(x, w_q, w_absmax, threshold).abs().max())
        checks.append(mm_check(x, w_q, w_absmax, threshold, hidden(), atol=1e-3 * expected_scale))
    x = torch.randn(3, 4096, generator=g) * 4
    w_q = torch.randint(-127, 128, (5, 4096), generator=g, dtype=torch.int8)
    checks.append(mm_check(x, w_q, torch.ones(5), 6.0, hidden(), rtol=1e-5, atol=1e-3))
    return Part("test_matmul_outliers", 15, tuple(checks))


def llm_int8_minilm() -> Part:
    def judge(out):
        emb = tensor(returned(out, None, "llm_int8_embeddings"), torch.float32, (16, 384), "the embeddings")
        expect(cosine_mean(emb) >= 0.999, "LLM.int8() MiniLM must keep a mean cosine of at least 0.999 to FP32")
        agree = float(F.cosine_similarity(emb, llm_int8_reference(), dim=-1).min())
        expect(agree >= 0.9995, "int8_mini's embeddings differ from LLM.int8()'s")

    return Part("test_llm_int8_minilm", 10, (Check(call("llm_int8_embeddings"), judge, "LLM.int8() MiniLM"),))


# -- Part 3: smoothing_scales ------------------------------------------------------------------------------


def scales_check(act, w, alpha, label, expected=None) -> Check:
    expected = smoothing_scales(act, w, alpha) if expected is None else expected

    def judge(out):
        s = tensor(returned(out, None, "smoothing_scales"), torch.float32, tuple(act.shape), "s")
        expect(bool(torch.isfinite(s).all() and (s > 0).all()), "s must be finite and positive (clamp at 1e-5)")
        expect(torch.allclose(s, expected, rtol=1e-5), f"alpha {alpha}: s differs from max|X|^alpha / max|W|^(1 - alpha)")

    return Check(call("scales_result", act, w, alpha), judge, label)


def raises_check(alpha: float, should_raise: bool, label: str) -> Check:
    def judge(out):
        raised = returned(out, None, "raises_value_error")
        expect(raised is should_raise, f"alpha = {alpha} must {'raise' if should_raise else 'not raise'} a ValueError")

    return Check(call("raises_value_error", alpha), judge, label)


def smoothing() -> Part:
    act, w = torch.tensor([16.0, 1.0, 0.0]), torch.tensor([0.25, 1.0, 4.0])
    checks = [scales_check(act, w, 0.5, "the worked example", torch.tensor([8.0, 1.0, 1e-5 ** 0.5 / 2])),
              scales_check(act, w, 1.0, "alpha = 1", torch.tensor([16.0, 1.0, 1e-5])),
              scales_check(act, w, 0.0, "alpha = 0", torch.tensor([4.0, 1.0, 0.25])),
              raises_check(1.5, True, "alpha = 1.5"), raises_check(-0.1, True, "alpha = -0.1"),
              raises_check(0.0, False, "alpha = 0"), raises_check(1.0, False, "alpha = 1")]
    g = torch.Generator().manual_seed(4)
    act, w = torch.rand(384, generator=g) * 20, torch.rand(384, generator=g)
    checks += [scales_check(act, w, alpha, f"random statistics, alpha {alpha}", act ** alpha / w ** (1 - alpha))
               for alpha in (0.25, 0.5, 0.85)]
    g, hidden = torch.Generator().manual_seed(404), labels("hidden check")
    for K, alpha in [(1, 0.5), (1536, 0.75), (64, 0.0), (64, 1.0), (100, 0.3)]:
        act, w = torch.rand(K, generator=g) * 50, torch.rand(K, generator=g) * 0.2
        act[0] = 0.0
        if K > 2:
            w[1] = 0.0
        checks.append(scales_check(act, w, alpha, hidden()))
    checks.append(scales_check(torch.tensor([1e-9, 2.0]), torch.tensor([1e-9, 1e-9]), 0.5, hidden()))
    checks += [raises_check(1.0001, True, hidden()), raises_check(-1e-6, True, hidden())]
    return Part("test_smoothing_scales", 15, tuple(checks))


# -- Part 4: SmoothQuant on MiniLM -------------------------------------------------------------------------


def sq_sweep() -> Part:
    def judge(out):
        alphas, values, best = returned(out, 3, "sweep_values")
        expect(isinstance(alphas, tuple) and tuple(alphas) == ALPHAS, "sweep must have the keys 0.25, 0.5 and 0.75")
        expect(isinstance(values, tuple) and len(values) == 3 and all(type(v) is float and 0.0 < v <= 1.0 for v in values),
               "sweep's values must be mean cosines")
        expect(type(best) is float and best in ALPHAS and values[ALPHAS.index(best)] == max(values),
               "best_alpha must be the alpha with the highest mean cosine")
        for alpha, value in zip(ALPHAS, values):
            expect(close(value, cosine_mean(smoothquant_embeddings(alpha)), atol=5e-4),
                   f"sweep[{alpha}] differs from the mean cosine of SmoothQuant W8A8 at alpha {alpha}")

    return Part("test_sq_sweep", 10, (Check(call("sweep_values"), judge, "the alpha sweep"),))


def sq_fidelity() -> Part:
    seen = {}

    def judge_alpha(out):
        seen.clear()  # judged one submission at a time
        best = returned(out, None, "best_alpha")
        expect(type(best) is float and 0.0 <= best <= 1.0, "best_alpha must be an alpha in [0, 1] (a Python float)")
        seen["alpha"] = best

    def judge_layers(out):
        layers = returned(out, None, "sq_layers")
        expect(isinstance(layers, tuple) and len(layers) == 36 and all(isinstance(t, tuple) and len(t) == 2 for t in layers),
               "sq_layers must describe 36 layers")
        expect(all(kind == "QuantLinear" for kind, _ in layers), "every linear of sq_model must be a W8A8 QuantLinear")
        expect(sum(smoothed is True for _, smoothed in layers) == 24,
               "sq_model must be smoothed (query/key/value and the first FFN linear of each layer): build it with smoothquant_w8a8")

    def judge_embeddings(out):
        emb = tensor(returned(out, None, "sq_embeddings"), torch.float32, (16, 384), "the embeddings")
        expect(cosine_mean(emb) >= 0.987, "the mean cosine of sq_model must be at least 0.987")
        expect("alpha" in seen, "best_alpha could not be read")
        agree = float(F.cosine_similarity(emb, smoothquant_embeddings(seen["alpha"]), dim=-1).min())
        expect(agree >= 0.9995, "sq_model's embeddings differ from SmoothQuant W8A8's at best_alpha")

    return Part("test_sq_fidelity", 15, (Check(read("best_alpha"), judge_alpha, "best_alpha"),
                                         Check(call("sq_layers"), judge_layers, "sq_model's layers"),
                                         Check(call("sq_embeddings"), judge_embeddings, "SmoothQuant MiniLM")))


# -- Part 5: analysis --------------------------------------------------------------------------------------


@cache
def expected_share() -> float:
    mini, batch, _, _ = setup()
    names = [n for n, m in mini.named_modules() if isinstance(m, torch.nn.Linear)]
    seen = {}
    handles = [mini.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]))) for n in names]
    try:
        with torch.no_grad():
            mini(**batch)
    finally:
        for h in handles:
            h.remove()
    return sum(float((seen[n].abs() >= 6).any(dim=0).double().mean()) for n in names) / len(names)


def analysis_share() -> Part:
    def judge(out):
        value = returned(out, None, "outlier_share")
        expect(type(value) is float and 0.0 <= value <= 1.0, "outlier_share must be a fraction in [0, 1] (a Python float)")
        expect(close(value, expected_share(), atol=1e-4), "outlier_share differs from the mean share of outlier columns")

    return Part("test_analysis_share", 4, (Check(read("outlier_share"), judge, "outlier_share"),))


def analysis_answers() -> Part:
    return Part("test_analysis_answers", 6, (letter("why_per_token", "c"), letter("why_explicit", "a")))


def parts() -> list[Part]:
    """The graded parts of lab 4, in notebook order."""
    return [vectorwise_plain(), vectorwise_outliers(), matmul_outliers(), llm_int8_minilm(), smoothing(), sq_sweep(),
            sq_fidelity(), analysis_share(), analysis_answers()]
