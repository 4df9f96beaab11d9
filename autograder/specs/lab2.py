"""Grading spec of lab 2 (calibration, static W8A8 PTQ): the checks of each test cell of labs/source/lab2/lab2.ipynb.

Each part makes the checks of the test cell with its grade_id, visible and hidden, on the same seeds and with
the same tolerances, in the form a probe can carry: tensors and plain scalars in, plain data out. So a list of
batches becomes a tensor whose first axis indexes the batches (the lab allows both), and the W8A8 models are
probed through the notebook's locked helpers `ptq_logits(x, method)` and `ptq_act_scales(method)`.
The judges compute every expected value here, in the grading process, with qlab's observers and integer layers.
"""

from __future__ import annotations

import copy
from functools import cache

import torch
import torch.nn as nn

import qlab as ql
from autograder.spec import Check, Outcome, Part, Ref, call, close, expect, labels, number, read, returned, tensor
from qlab.bn_folding import fold_batchnorm_
from qlab.nn import QuantConv2d, QuantLinear
from qlab.observers import HistogramObserver, MinMaxObserver, PercentileObserver, entropy_threshold_bin, qparams_from_range
from qlab.observers import percentile as ql_percentile

DISABLED = ql.labs.DISABLED["lab2"]  # qlab functions the lab switches off (qlab/labs.py)
METHODS = ("minmax", "percentile", "entropy")
LAYERS = ("conv1", "conv2", "conv3", "fc")


# -- the notebook's locked setup, rebuilt here --------------------------------------------------------------


@cache
def setup():
    """folded model, test split, calibration batches, and FP32 accuracy, as the setup cell makes them."""
    fp32_model = ql.models.digits_cnn()
    folded = copy.deepcopy(fp32_model)
    fold_batchnorm_(folded)
    x_test, y_test = ql.data.digits_split("test")
    calib = ql.data.digits_calibration_batches(8, 32)
    return folded, x_test, y_test, calib, ql.eval.accuracy(fp32_model, x_test, y_test)


def abs_histogram(x: torch.Tensor, bins: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """The notebook's helper (locked cell `glue`)."""
    a = x.detach().abs().flatten().double()
    a = a[a > 0]
    amax = a.max()
    index = (a / amax * bins).floor().long().clamp(max=bins - 1)
    return torch.bincount(index, minlength=bins).double(), torch.arange(bins + 1, dtype=torch.float64) * amax / bins


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    seen = {name: [] for name in LAYERS}
    handles = [modules[name].register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0])) for name in LAYERS]
    for x in batches:
        model(x)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(inputs) for name, inputs in seen.items()}


def observer(method: str):
    return {"minmax": MinMaxObserver, "percentile": lambda: PercentileObserver(99.99), "entropy": HistogramObserver}[method]()


def reference_int8(batches, method: str) -> tuple[nn.Module, torch.Tensor]:
    """The W8A8 model qlab builds from `batches` with `method`, and its activation scales (4,)."""
    folded = setup()[0]
    inputs = capture_layer_inputs(folded, batches)
    act_qparams = {}
    for name in LAYERS:
        obs = observer(method)
        obs(inputs[name])
        act_qparams[name] = obs.calculate_qparams()
    model = copy.deepcopy(folded)
    for name in LAYERS:
        layer = model.get_submodule(name)
        w = layer.weight.detach()
        weight_qparams = ql.choose_qparams(w.reshape(w.shape[0], -1), ql.int8, ql.PerChannel(0), symmetric=True)
        quant = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        model.set_submodule(name, quant.from_float(layer, act_qparams=act_qparams[name], weight_qparams=weight_qparams))
    return model.eval(), torch.stack([act_qparams[name][0] for name in LAYERS])


def corrupted_batches() -> list[torch.Tensor]:
    batches = [x.clone() for x in setup()[3]]
    batches[3][5] *= 255
    return batches


# -- Parts 1 and 2: min/max and percentile -----------------------------------------------------------------


def minmax_check(batches: list[torch.Tensor] | torch.Tensor, label: str, key: str | None = None) -> Check:
    """minmax_range on a tensor of batches, or (with `key`) on a Python list of batches of any shapes, built in the
    sandbox by the notebook's helper batch_list."""
    stacked = batches if isinstance(batches, torch.Tensor) else torch.cat([b.flatten() for b in batches])
    lo_ref, hi_ref = float(stacked.min()), float(stacked.max())

    def check(out):
        lo, hi = returned(out, 2, "minmax_range")
        expect(number(lo, "lo") == lo_ref and number(hi, "hi") == hi_ref, "(lo, hi) differs from the min and max of the batches")

    if key is None:
        return Check(call("minmax_range", batches), check, label)

    def judge(out_list, out):
        check(out)

    return Check(call("batch_list", *batches, key=key), judge, label, context=(call("minmax_range", Ref(key)),))


def minmax() -> Part:
    generator, hidden = torch.Generator().manual_seed(1), labels("hidden check")

    def calibration_images(out_list, out):
        lo, hi = returned(out, 2, "minmax_range")
        expect((number(lo, "lo"), number(hi, "hi")) == (0.0, 1.0), "(lo, hi) differs from the min and max of the calibration images")

    checks = [minmax_check([torch.tensor([1.0, -2.0, 3.0]), torch.tensor([[0.5, 4.0]])], "the example (a list)", key="example"),
              minmax_check(torch.randn(5, 16, 3, generator=generator) * 2 + 0.5, "a tensor of batches"),
              Check(read("calib_batches", key="calib"), calibration_images, "the calibration images (a list)",
                    context=(call("minmax_range", Ref("calib")),))]
    generator = torch.Generator().manual_seed(201)
    checks += [minmax_check([torch.randn(7, 3, generator=generator) - 5, torch.rand(2, 2, 2, generator=generator) + 10,
                             torch.randn(1, generator=generator)], "hidden check 1 (a list of batches of different shapes)", key="shapes"),
               minmax_check(torch.relu(torch.randn(4, 8, 8, generator=generator)) + 0.25, "hidden check 2 (all-positive batches)"),
               minmax_check([torch.full((3,), -1.5), torch.full((2,), -0.5)], "hidden check 3 (a list of all-negative batches)",
                            key="negative")]
    return Part("test_minmax_range", 10, tuple(checks))


def percentile_check(x: torch.Tensor, p: float, label: str, expected: float | None = None) -> Check:
    expected = float(ql_percentile(x.abs().flatten(), p)) if expected is None else expected

    def judge(out):
        t = number(returned(out, None, "percentile_range"), "the threshold")
        expect(close(t, expected, rtol=1e-5, atol=1e-7), "the threshold differs from the expected percentile")

    return Check(call("percentile_range", x, p), judge, label)


def percentile() -> Part:
    checks = [percentile_check(torch.tensor([-4.0, 1.0, 2.0, 3.0]), 50, "the worked example", 2.5),
              percentile_check(torch.tensor([[0.5, -3.0], [2.0, 1.0]]), 100, "p = 100", 3.0)]
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(2))
    checks.append(percentile_check(x, 99.9, "20,000 Gaussian values"))
    generator, hidden = torch.Generator().manual_seed(202), labels("hidden check")
    for shape, p in [((1000,), 99.99), ((4, 8, 8), 99.0), ((3, 7), 75.0), ((50_000,), 99.999), ((2, 5), 100.0)]:
        checks.append(percentile_check(torch.randn(*shape, generator=generator) * 3, p, hidden()))
    checks.append(percentile_check(torch.relu(torch.randn(64, 32, generator=generator)), 99.99, hidden()))
    checks.append(percentile_check(torch.tensor([5.0]), 99.99, hidden(), 5.0))
    return Part("test_percentile_range", 10, tuple(checks))


# -- Part 3: entropy ---------------------------------------------------------------------------------------


def kl_check(hist: torch.Tensor, edges: torch.Tensor, nq: int, label: str, rtol: float = 0.0) -> Check:
    expected = float(edges[entropy_threshold_bin(hist, nq)])

    def judge(out):
        t = returned(out, None, "kl_entropy_threshold")
        expect(type(t) is float, f"kl_entropy_threshold must return a Python float, got {type(t).__name__}")
        expect(close(t, expected, rtol=rtol), "the threshold differs from the expected entropy threshold")

    return Check(call("kl_entropy_threshold", hist, edges, nq), judge, label)


def kl_by_hand() -> Part:
    f64 = torch.float64
    checks = [kl_check(torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0], dtype=f64), torch.arange(9, dtype=f64) * 0.5, 4, "the tie example"),
              kl_check(torch.tensor([4.0, 2, 1, 1, 1], dtype=f64), torch.arange(6, dtype=f64), 4, "the hand example"),
              kl_check(torch.tensor([9.0, 7, 5, 3, 2, 1, 1, 0, 0, 0, 0, 1], dtype=f64), torch.arange(13, dtype=f64) / 4, 4,
                       "the decaying histogram")]
    generator, hidden = torch.Generator().manual_seed(203), labels("hidden check")
    for bins, nq in [(16, 4), (40, 8), (64, 16)]:
        for _ in range(5):
            hist = torch.randint(0, 6, (bins,), generator=generator).double() * (torch.rand(bins, generator=generator) < 0.7)
            hist[0] += 1
            checks.append(kl_check(hist, torch.linspace(0, 3.0, bins + 1, dtype=f64), nq, hidden()))
    hist = torch.zeros(32, dtype=f64)
    hist[[0, 1, 2, 31]] = torch.tensor([5.0, 5.0, 5.0, 1.0], dtype=f64)
    checks.append(kl_check(hist, torch.arange(33, dtype=f64), 8, hidden()))
    return Part("test_kl_by_hand", 10, tuple(checks))


def kl_vs_observer() -> Part:
    x = torch.relu(torch.randn(20_000, generator=torch.Generator().manual_seed(3)))
    checks = [kl_check(*abs_histogram(x), 128, "a ReLU output", rtol=1e-6)]
    generator, hidden = torch.Generator().manual_seed(204), labels("hidden check")
    cases = [torch.relu(torch.randn(20_000, generator=generator)), torch.randn(5000, generator=generator) * 3,
             torch.cat([torch.rand(4000, generator=generator), torch.tensor([40.0])]),
             torch.randint(0, 17, (3000,), generator=generator) / 16.0]
    checks += [kl_check(*abs_histogram(x), 128, hidden(), rtol=1e-6) for x in cases]
    return Part("test_kl_vs_observer", 15, tuple(checks))


# -- Part 4: qparams and layer thresholds ------------------------------------------------------------------


def qparams_check(t: float | torch.Tensor, label: str) -> Check:
    """symmetric_int8_qparams(t), with t a Python float or a 0-d tensor (the notebook allows both)."""
    value = float(t)
    ref_scale, _ = qparams_from_range(-value, value) if value > 0 else (torch.tensor(1.0), None)

    def judge(out):
        scale, zero_point = returned(out, 2, "symmetric_int8_qparams")
        scale = tensor(scale, torch.float32, (), "the scale")
        zero_point = tensor(zero_point, torch.int32, (), "the zero point")
        expect(close(float(scale), float(ref_scale), rtol=1e-6), "the scale differs from the expected scale")
        expect(int(zero_point) == 0, "the zero point must be 0")

    return Check(call("symmetric_int8_qparams", t), judge, label)


def symmetric_qparams() -> Part:
    hidden = labels("hidden check")
    checks = [qparams_check(2.54, "threshold 2.54"), qparams_check(torch.tensor(0.0), "threshold 0 (a 0-d tensor)")]
    checks += [qparams_check(torch.tensor(t), f"{hidden()} (a 0-d tensor threshold)") for t in (1e-3, 0.5, 3.0, 127.0, 1e4)]
    checks += [qparams_check(0.0, f"{hidden()} (a zero threshold as a Python float)"),
               qparams_check(3.0, f"{hidden()} (a Python float threshold)")]
    return Part("test_symmetric_int8_qparams", 5, tuple(checks))


def threshold_check(x: torch.Tensor, method: str, label: str) -> Check:
    if bool((x != 0).any()) or method != "entropy":
        obs = observer(method)
        obs(x)
        expected = float(obs.calculate_qparams()[0]) * 127
    else:
        expected = 0.0

    def judge(out):
        t = number(returned(out, None, "layer_threshold"), "the threshold")
        expect(close(t, expected, rtol=1e-5), f"the {method} threshold differs from the expected one")

    return Check(call("layer_threshold", x, method), judge, label)


def layer_threshold() -> Part:
    def raises(out):
        expect(not out.missing, "layer_threshold is not defined")
        expect(out.raised == "ValueError", 'layer_threshold(x, "mse") must raise ValueError')

    x = torch.relu(torch.randn(64, 8, 4, 4, generator=torch.Generator().manual_seed(4)))
    checks = [threshold_check(torch.tensor([[0.0, -3.0], [1.0, 2.0]]), "minmax", "minmax example"),
              threshold_check(x, "percentile", "percentile"), threshold_check(x, "entropy", "entropy"),
              threshold_check(torch.zeros(3, 4), "entropy", "all zeros"),
              Check(call("layer_threshold", x, "mse"), raises, "an unknown method")]
    x = torch.randn(128, 16, 4, 4, generator=torch.Generator().manual_seed(205)) * 2 - 1
    hidden = labels("hidden check")
    checks += [threshold_check(x, method, hidden()) for method in METHODS]
    return Part("test_layer_threshold", 10, tuple(checks))


# -- Part 5: W8A8 ------------------------------------------------------------------------------------------


def weight_check(w: torch.Tensor, label: str) -> Check:
    w = w.detach()
    ref_scale, _ = ql.choose_qparams(w.reshape(w.shape[0], -1), ql.int8, ql.PerChannel(0), symmetric=True)

    def judge(out):
        scale, zero_point = returned(out, 2, "weight_qparams_per_channel")
        scale = tensor(scale, torch.float32, (w.shape[0],), "the scale")
        zero_point = tensor(zero_point, torch.int32, (w.shape[0],), "the zero point")
        expect(not bool(zero_point.any()), "the zero points must be 0")
        expect(torch.allclose(scale, ref_scale, rtol=1e-6, atol=0), "the scales differ from the expected scales")

    return Check(call("weight_qparams_per_channel", w), judge, label)


def weight_qparams() -> Part:
    folded = setup()[0]
    hidden = labels("hidden check")
    checks = [weight_check(torch.tensor([[[[0.5, -1.27]]], [[[0.0, 0.0]]], [[[2.54, 1.0]]]]), "the example")]
    checks += [weight_check(w, hidden()) for w in (folded.conv2.weight, folded.fc.weight,
                                                    torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(206)))]
    return Part("test_weight_qparams", 5, tuple(checks))


def ptq_accuracy() -> Part:
    """What the notebook states: every layer a static integer layer, each model within 1.0 point of FP32 (the
    accuracy computed here from the logits the student's model gives on the test split), folded_model unchanged.
    The scales and logits are not compared with a reference model: any calibration that keeps the accuracy passes."""
    _, x_test, y_test, _, fp32_accuracy = setup()
    checks = []
    for method in METHODS:
        def judge_static(out, method=method):
            expect(returned(out, None, "ptq_is_static") is True,
                   f"{method}: every layer must be a static integer layer: build the model with to_int8_model")

        def judge_logits(out, method=method):
            logits = tensor(returned(out, None, "ptq_logits"), torch.float32, (len(x_test), 10), "the logits")
            expect(bool(torch.isfinite(logits).all()), f"{method}: the logits must be finite")
            correct = int((logits.argmax(-1) == y_test).sum())
            expect(correct / len(y_test) >= fp32_accuracy - 0.010 - 1e-9, f"{method}: the W8A8 accuracy is more than 1 point below FP32")

        checks += [Check(call("ptq_is_static", method), judge_static, f"{method} integer layers"),
                   Check(call("ptq_logits", x_test, method), judge_logits, f"{method} W8A8 accuracy")]

    def judge_unchanged(out):
        expect(returned(out, None, "folded_model_is_float") is True,
               "static_w8a8 must return a quantized copy and leave folded_model unchanged")

    checks.append(Check(call("folded_model_is_float"), judge_unchanged, "folded_model unchanged"))
    return Part("test_ptq_accuracy", 20, tuple(checks))


# -- Part 6: analysis --------------------------------------------------------------------------------------


def accuracy_value(out: Outcome, variable: str) -> float:
    value = returned(out, None, variable)
    expect(type(value) is float and 0.0 <= value <= 1.0, f"{variable} must be an accuracy in [0, 1] (a Python float)")
    return value


def own_value(out: Outcome) -> float | None:
    """A context probe's number, or None if the student's own pipeline gave nothing usable."""
    return out.value if not (out.missing or out.raised) and type(out.value) is float else None


ANALYSIS_POINTS = {"minmax": 3, "percentile": 3, "entropy": 2}


def analysis_accuracy() -> Part:
    """Each accuracy on its own (partial credit); right if it matches the reference W8A8 model's, or (errors carried
    forward) the accuracy of the model the student's own static_w8a8 builds from corrupted_batches."""
    _, x_test, y_test, _, _ = setup()
    batches = corrupted_batches()
    checks = []
    for index, method in enumerate(METHODS):
        expected = ql.eval.accuracy(reference_int8(batches, method)[0], x_test, y_test)
        context = (read("folded_model", key="folded"), read("corrupted_batches", key="corrupted")) if index == 0 else ()
        context += (call("static_w8a8", Ref("folded"), Ref("corrupted"), method, key=f"own_{method}"),
                    call("test_accuracy", Ref(f"own_{method}")))

        def judge(out, *context_outs, variable=f"corrupt_acc_{method}", expected=expected):
            value = accuracy_value(out, variable)
            own = own_value(context_outs[-1])
            expect(abs(value - expected) <= 0.006 or (own is not None and abs(value - own) <= 0.006),
                   f"{variable} differs from the accuracy of the W8A8 model calibrated on corrupted_batches")

        checks.append(Check(read(f"corrupt_acc_{method}"), judge, f"corrupt_acc_{method}", points=ANALYSIS_POINTS[method],
                            context=context))
    return Part("test_analysis_accuracy", 8, tuple(checks))


def analysis_answer() -> Part:
    fp32_accuracy = setup()[4]

    def survivor(out, *own_outs):
        value = returned(out, None, "survivor")
        expect(isinstance(value, str) and value in METHODS, f"survivor must be one of {METHODS}")
        if value == "entropy":
            return
        own = dict(zip(METHODS, (own_value(o) for o in own_outs)))
        # "stays closest to FP32": the highest accuracy, or the one nearest FP32 (they differ only above FP32)
        consistent = all(v is not None for v in own.values()) and (own[value] == max(own.values()) or
                                                                    abs(fp32_accuracy - own[value]) == min(abs(fp32_accuracy - v) for v in own.values()))
        expect(consistent, "survivor is not the method that keeps its accuracy (by the reference, or by your own accuracies)")

    def why(out):
        value = returned(out, None, "why")
        expect(isinstance(value, str) and value in ("a", "b", "c", "d"), 'why must be one of "a", "b", "c", "d"')
        expect(value == "b", "why is not the best explanation")

    own = tuple(read(f"corrupt_acc_{method}") for method in METHODS)
    return Part("test_analysis_answer", 7, (Check(read("survivor"), survivor, "survivor", points=4, context=own),
                                            Check(read("why"), why, "why", points=3)))


def parts() -> list[Part]:
    """The graded parts of lab 2, in notebook order."""
    return [minmax(), percentile(), kl_by_hand(), kl_vs_observer(), symmetric_qparams(), layer_threshold(),
            weight_qparams(), ptq_accuracy(), analysis_accuracy(), analysis_answer()]
