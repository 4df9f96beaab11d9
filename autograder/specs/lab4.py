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
import dataclasses
from functools import cache

import torch
import torch.nn.functional as F

import qlab as ql
from autograder.spec import Check, Part, Ref, call, close, expect, labels, letter, read, returned, tensor
from qlab.llm_int8 import int8_matmul_outliers, vectorwise_quant
from qlab.smoothquant import smoothing_scales

DISABLED = ql.labs.DISABLED["lab4"]  # qlab functions the lab switches off (qlab/labs.py)
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

# The notebook asks for plain torch and math: importing bitsandbytes fails in its cells, locally and while grading.
IMPORTS = ql.labs.IMPORTS["lab4"]


def hidden_labels():
    """hidden("a single row") -> "hidden check 1 (a single row)": the category of a hidden check's inputs, by hand."""
    count = labels("hidden check")
    return lambda category: f"{count()} ({category})"


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
    g, hidden = torch.Generator().manual_seed(401), hidden_labels()
    for shape, label in [((1, 7), "a single row"), ((33, 5), "more rows than columns"), ((8, 256), "long rows")]:
        checks.append(vq_check(torch.randn(*shape, generator=g) * 4, 0.0, hidden(label)))
    checks.append(vq_check(torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]]), 0.0, hidden("an all-zero row"),
                           [[0, 0, 0], [127, -127, 64]]))
    checks.append(vq_check(torch.tensor([[2.0, -0.5, 0.25]], dtype=torch.float64), 0.0, hidden("a float64 input"),
                           [[127, -32, 16]]))
    return Part("test_vectorwise_plain", 10, tuple(checks))


def vectorwise_outliers() -> Part:
    checks = [vq_check(A, 6.0, "the worked example, threshold 6", [[64, -127, 0, 32], [95, 32, 0, -127]])]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 64, generator=g)
    x[3, 10], x[7, 10], x[20, 41], x[0, 5] = 9.0, -7.5, 6.0, -6.0
    checks.append(vq_check(x, 6.0, "injected outliers"))
    g, hidden = torch.Generator().manual_seed(402), hidden_labels()
    for shape, threshold, scale, label in [((16, 32), 6.0, 3.0, "outliers in many columns"),
                                           ((5, 100), 2.5, 1.0, "a low threshold"),
                                           ((64, 16), 6.0, 0.5, "small values, no outlier"),
                                           ((1, 20), 1.0, 2.0, "a single row")]:
        checks.append(vq_check(torch.randn(*shape, generator=g) * scale, threshold, hidden(label)))
    checks.append(vq_check(torch.tensor([[7.0, -8.0, 0.0], [0.5, 1.0, -0.25]]), 6.0,
                           hidden("a row of outliers and zeros only"), [[0, 0, 0], [0, 0, -32]]))
    checks.append(vq_check(torch.randn(4, 4, generator=g), 100.0, hidden("a threshold above every value")))
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
    g, hidden = torch.Generator().manual_seed(403), hidden_labels()
    for (M, K, N, threshold), label in zip([(1, 64, 8, 6.0), (17, 33, 5, 3.0), (64, 128, 32, 6.0), (9, 300, 7, 0.0)],
                                           ["a single row", "a low threshold", "outlier channels", "no decomposition"]):
        x = torch.randn(M, K, generator=g) * 2
        x[:, torch.randint(0, K, (3,), generator=g)] *= 8
        w_q, w_absmax = quantized_weight(torch.randn(N, K, generator=g))
        expected_scale = float(exact_reference(x, w_q, w_absmax, threshold).abs().max())
        checks.append(mm_check(x, w_q, w_absmax, threshold, hidden(label), atol=1e-3 * expected_scale))
    x = torch.randn(3, 4096, generator=g) * 4
    w_q = torch.randint(-127, 128, (5, 4096), generator=g, dtype=torch.int8)
    checks.append(mm_check(x, w_q, torch.ones(5), 6.0, hidden("a long sum, where the int8 part must be exact"),
                           rtol=1e-5, atol=1e-3))
    return Part("test_matmul_outliers", 15, tuple(checks))


def llm_int8_minilm() -> Part:
    """The visible test's three promises: (16, 384) embeddings, int8_mini made by llm_int8_minilm (here: its
    embeddings equal those of a fresh llm_int8_minilm(6.0), the glue's own build), a mean cosine of at least 0.999;
    then, hidden, agreement with qlab's LLM.int8() MiniLM."""
    def judge(out, _fresh_model, fresh):
        emb = tensor(returned(out, None, "llm_int8_embeddings"), torch.float32, (16, 384), "the embeddings")
        fresh = tensor(returned(fresh, None, "llm_int8_minilm"), torch.float32, (16, 384), "the embeddings")
        expect(torch.allclose(emb, fresh, rtol=0, atol=1e-5), "int8_mini must come from llm_int8_minilm")
        expect(cosine_mean(emb) >= 0.999, "LLM.int8() MiniLM must keep a mean cosine of at least 0.999 to FP32")
        agree = float(F.cosine_similarity(emb, llm_int8_reference(), dim=-1).min())
        expect(agree >= 0.9995, "int8_mini's embeddings differ from LLM.int8()'s")

    context = (call("llm_int8_minilm", 6.0, key="fresh"), call("embeddings", Ref("fresh")))
    return Part("test_llm_int8_minilm", 10, (Check(call("llm_int8_embeddings"), judge, "LLM.int8() MiniLM", context=context),))


# -- Part 3: smoothing_scales ------------------------------------------------------------------------------


def scales_check(act, w, alpha, label, expected=None) -> Check:
    expected = smoothing_scales(act, w, alpha) if expected is None else expected

    def judge(out):
        s = tensor(returned(out, None, "smoothing_scales"), torch.float32, tuple(act.shape), "s")
        expect(bool(torch.isfinite(s).all() and (s > 0).all()), "s must be finite and positive (clamp at 1e-5)")
        expect(torch.allclose(s, expected, rtol=1e-5), "s differs from max|X|^alpha / max|W|^(1 - alpha) (statistics "
               "and result clamped at 1e-5)")

    return Check(call("scales_result", act, w, alpha), judge, label)


def raises_check(alpha: float, should_raise: bool, label: str) -> Check:
    def judge(out):
        raised = returned(out, None, "raises_value_error")
        expect(raised is should_raise, "an alpha outside [0, 1] must raise a ValueError" if should_raise else
               "an alpha in [0, 1] must not raise a ValueError")

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
    g, hidden = torch.Generator().manual_seed(404), hidden_labels()
    for K, alpha, label in [(1, 0.5, "a single all-zero channel"), (1536, 0.75, "many channels, some all-zero"),
                            (64, 0.0, "alpha at the low end of its range, some all-zero channels"),
                            (64, 1.0, "alpha at the high end of its range, some all-zero channels"),
                            (100, 0.3, "some all-zero channels")]:
        act, w = torch.rand(K, generator=g) * 50, torch.rand(K, generator=g) * 0.2
        act[0] = 0.0
        if K > 2:
            w[1] = 0.0
        checks.append(scales_check(act, w, alpha, hidden(label)))
    checks.append(scales_check(torch.tensor([1e-9, 2.0]), torch.tensor([1e-9, 1e-9]), 0.5,
                               hidden("statistics below the clamp")))
    checks += [raises_check(1.0001, True, hidden("alpha just above the range")),
               raises_check(-1e-6, True, hidden("alpha just below the range"))]
    return Part("test_smoothing_scales", 15, tuple(checks))


# -- Part 4: SmoothQuant on MiniLM -------------------------------------------------------------------------
#
# Errors carried forward: Part 4 asks for a sweep and a model "built with your smoothing_scales". A student whose
# smoothing_scales is wrong loses Part 3, not Part 4 again: each probe of Part 4 also sends back what the student's
# smoothing_scales gives on the statistics of MiniLM's mappings (`smoothing_statistics`, the inputs qlab's walker
# hands to scales_fn), and where those factors are not qlab's, the expected cosines are those of the model built
# here with the student's own factors (the notebook's smoothquant_w8a8, with their numbers). Students whose factors
# are qlab's cost nothing more.


@cache
def smoothing_statistics() -> tuple:
    """(act_absmax, weight_absmax) of every mapping, in the order qlab's walker calls scales_fn on MiniLM."""
    mini, _, calib, _ = setup()
    seen = []

    def record(act, w, alpha):
        seen.append((act.detach().clone(), w.detach().clone()))
        return smoothing_scales(act, w, alpha)

    ql.smoothquant.smooth_(copy.deepcopy(mini), calib, 0.5, scales_fn=record)
    return tuple(seen)


def own_scales_probes(alpha: float) -> tuple:
    """Probes of the student's smoothing_scales on every mapping's statistics at alpha."""
    return tuple(call("scales_result", act, w, alpha) for act, w in smoothing_statistics())


def own_factors(alpha: float, outs) -> list[torch.Tensor] | None:
    """The student's factors at alpha, or None where they are qlab's (or unusable: then only qlab's numbers count)."""
    factors = []
    for (act, w), out in zip(smoothing_statistics(), outs):
        try:
            s = tensor(returned(out, None, "smoothing_scales"), torch.float32, tuple(act.shape), "s")
        except Exception:
            return None
        if not bool(torch.isfinite(s).all() and (s > 0).all()):
            return None
        factors.append(s)
    if all(torch.equal(s, smoothing_scales(act, w, alpha)) for s, (act, w) in zip(factors, smoothing_statistics())):
        return None
    return factors


_own_cache: dict = {}


def own_smoothquant_embeddings(alpha: float, factors: list[torch.Tensor]) -> torch.Tensor:
    """The notebook's smoothquant_w8a8(alpha) built with the student's factors (cached by their bytes)."""
    key = (alpha, b"".join(s.numpy().tobytes() for s in factors))
    if key not in _own_cache:
        mini, _, calib, _ = setup()

        def build() -> torch.Tensor:
            model, supply = copy.deepcopy(mini), iter(factors)
            ql.smoothquant.smooth_(model, calib, alpha, scales_fn=lambda _act, _w, _alpha: next(supply))
            return embeddings(ql.quantize_(model, ql.Int8StaticConfig(reduce_range=False), calib_data=calib))

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the sandbox, calibration included
        try:
            if len(_own_cache) >= len(ALPHAS):  # one submission at a time: its sweep's models, then its best one's
                del _own_cache[next(iter(_own_cache))]
            _own_cache[key] = build()
        finally:
            torch.set_num_threads(threads)
    return _own_cache[key]


def sq_sweep() -> Part:
    n = len(smoothing_statistics())

    def judge(out, *own):
        alphas, values, best = returned(out, 3, "sweep_values")
        expect(isinstance(alphas, tuple) and tuple(alphas) == ALPHAS, "sweep must have the keys 0.25, 0.5 and 0.75")
        expect(isinstance(values, tuple) and len(values) == 3 and all(type(v) is float and 0.0 < v <= 1.0 for v in values),
               "sweep's values must be mean cosines")
        expect(type(best) is float and best in ALPHAS and values[ALPHAS.index(best)] == max(values),
               "best_alpha must be the alpha with the highest mean cosine")
        for i, (alpha, value) in enumerate(zip(ALPHAS, values)):
            if close(value, cosine_mean(smoothquant_embeddings(alpha)), atol=5e-4):
                continue
            factors = own_factors(alpha, own[i * n:(i + 1) * n])
            expect(factors is not None and close(value, cosine_mean(own_smoothquant_embeddings(alpha, factors)), atol=5e-4),
                   f"sweep[{alpha}] differs from the mean cosine of SmoothQuant W8A8 at alpha {alpha} built with your "
                   "smoothing_scales")

    context = tuple(probe for alpha in ALPHAS for probe in own_scales_probes(alpha))
    return Part("test_sq_sweep", 10, (Check(call("sweep_values"), judge, "the alpha sweep", context=context),))


def sq_fidelity() -> Part:
    n = len(smoothing_statistics())

    def judge_layers(out):
        layers = returned(out, None, "sq_layers")
        expect(isinstance(layers, tuple) and len(layers) == 36 and all(isinstance(t, tuple) and len(t) == 2 for t in layers),
               "sq_layers must describe 36 layers")
        expect(all(kind == "QuantLinear" for kind, _ in layers), "every linear of sq_model must be a W8A8 QuantLinear")
        expect(sum(smoothed is True for _, smoothed in layers) == 24,
               "sq_model must be smoothed (query/key/value and the first FFN linear of each layer): build it with smoothquant_w8a8")

    def judge_embeddings(out, alpha_out, *own):
        emb = tensor(returned(out, None, "sq_embeddings"), torch.float32, (16, 384), "the embeddings")
        expect(cosine_mean(emb) >= 0.987, "the mean cosine of sq_model must be at least 0.987")
        best = returned(alpha_out, None, "best_alpha")
        expect(type(best) is float and 0.0 <= best <= 1.0, "best_alpha must be an alpha in [0, 1] (a Python float)")
        if float(F.cosine_similarity(emb, smoothquant_embeddings(best), dim=-1).min()) >= 0.9995:
            return
        factors = own_factors(best, own[ALPHAS.index(best) * n:(ALPHAS.index(best) + 1) * n]) if best in ALPHAS else None
        agree = 0.0 if factors is None else \
            float(F.cosine_similarity(emb, own_smoothquant_embeddings(best, factors), dim=-1).min())
        expect(agree >= 0.9995, "sq_model's embeddings differ from those of SmoothQuant W8A8 at best_alpha built with "
               "your smoothing_scales")

    context = (read("best_alpha"), *(probe for alpha in ALPHAS for probe in own_scales_probes(alpha)))
    return Part("test_sq_fidelity", 15, (Check(call("sq_layers"), judge_layers, "sq_model's layers"),
                                         Check(call("sq_embeddings"), judge_embeddings, "SmoothQuant MiniLM",
                                               context=context)))


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
    per_token, explicit = letter("why_per_token", "c"), letter("why_explicit", "a")
    return Part("test_analysis_answers", 6, (dataclasses.replace(per_token, points=3),
                                             dataclasses.replace(explicit, points=3)))


def parts() -> list[Part]:
    """The graded parts of lab 4, in notebook order."""
    return [vectorwise_plain(), vectorwise_outliers(), matmul_outliers(), llm_int8_minilm(), smoothing(), sq_sweep(),
            sq_fidelity(), analysis_share(), analysis_answers()]
