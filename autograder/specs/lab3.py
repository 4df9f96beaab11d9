"""Grading spec of lab 3 (QAT: STE, LSQ, 3-bit QAT of the digits CNN): the checks of each test cell of
labs/source/lab3/lab3.ipynb.

Each part makes the checks of the test cell with its grade_id, visible and hidden, on the same seeds and with
the same tolerances. Autograd is probed through the notebook's locked helpers `ste_forward_backward` and
`lsq_forward_backward` (one forward and one backward pass through the student's Function), the trained model
through `qat_logits(x)` and `qat_state()` (its float weights, biases and step sizes). The judges compute every
expected value here, in the grading process, with torch.fake_quantize_per_tensor_affine and qlab.qat.
"""

from __future__ import annotations

import copy
import math
from functools import cache

import torch
import torch.nn as nn

import qlab as ql
from autograder.spec import Check, Outcome, Part, Ref, call, close, expect, labels, letter, read, returned, tensor
from qlab.bn_folding import fold_batchnorm_
from qlab.qat import LSQFakeQuantize

# qlab's versions of what the lab asks for are switched off; torch's built-ins are not: the lab asks for "plain torch"
# and names torch.fake_quantize_per_tensor_affine as Part 1's function without forbidding it (README, policy on built-ins).
DISABLED = ql.labs.DISABLED["lab3"]  # qlab functions the lab switches off (qlab/labs.py)
LAYERS = ("conv1", "conv2", "conv3", "fc")
BITS = 3  # the graded QAT model's weights and activations: at 4 bits the untrained model is already at FP32 accuracy
QAT_ACCURACY = 0.95  # 3-bit PTQ gets about 62 %, the untrained 3-bit QAT model about 83 %, trained QAT 99.4 % to 99.7 %


@cache
def setup():
    """folded model, test split and calibration images, as the notebook's setup cell makes them."""
    folded = ql.models.digits_cnn()
    fold_batchnorm_(folded)
    x_test, y_test = ql.data.digits_split("test")
    return folded, x_test, y_test, torch.cat(ql.data.digits_calibration_batches(8, 32))


def away_from_ties(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Where x / scale is not within 1e-4 of a rounding tie (there the last bit of float arithmetic decides)."""
    return ((x / scale).abs() % 1 - 0.5).abs() >= 1e-4


# -- Part 1: STE -------------------------------------------------------------------------------------------


def ste_check(x, scale, zero_point, qmin, qmax, grad_output, label: str, what: str, exact: bool = False) -> Check:
    """what: "forward" compares the output with torch's fake quantization, "backward" the gradient for x; away from
    rounding ties, unless `exact` (inputs whose ties are exact in float, where the notebook's rule of half to even
    decides)."""
    x_ref = x.clone().requires_grad_(True)
    expected = torch.fake_quantize_per_tensor_affine(x_ref, scale, zero_point, qmin, qmax)
    expected.backward(grad_output)
    keep = torch.ones_like(x, dtype=torch.bool) if exact else away_from_ties(x, scale)

    def judge(out):
        y, grad = returned(out, 2, "ste_forward_backward")
        if what == "forward":
            y = tensor(y, torch.float32, tuple(x.shape), "the output")
            expect(torch.allclose(y[keep], expected.detach()[keep], atol=1e-6), "the output differs from the expected fake quantization")
        else:
            expect(grad is not None, "no gradient reached x: does backward return a gradient for x?")
            grad = tensor(grad, torch.float32, tuple(x.shape), "the gradient for x")
            expect(torch.allclose(grad[keep], x_ref.grad[keep]), "the gradient for x differs from the straight-through estimator's")

    return Check(call("ste_forward_backward", x, scale, zero_point, qmin, qmax, grad_output), judge, label)


def ste_forward() -> Part:
    example = torch.tensor([-1.0, -0.2, 0.26, 0.5, 2.0])
    checks = [ste_check(example, 0.25, 0, -4, 3, torch.ones(5), "the worked example", "forward")]
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    for scale, zero_point, qmin, qmax in [(0.1, 0, -127, 127), (0.05, 3, -8, 7), (0.02, 128, 0, 255)]:
        checks.append(ste_check(x, scale, zero_point, qmin, qmax, torch.ones_like(x), f"scale {scale}, zero point {zero_point}", "forward"))
    generator, hidden = torch.Generator().manual_seed(301), labels("hidden check")
    for shape, scale, zero_point, qmin, qmax in [((4, 5, 6), 0.3, 0, -4, 3), ((64,), 1e-3, -2, -128, 127),
                                                  ((7, 9), 0.5, 0, 0, 15), ((3, 3), 0.125, 1, -1, 1)]:
        x = torch.randn(*shape, generator=generator) * 2
        checks.append(ste_check(x, scale, zero_point, qmin, qmax, torch.ones_like(x), hidden(), "forward"))
    checks.append(ste_check(torch.tensor([0.5, 1.5, 2.5, -0.5]), 1.0, 0, -8, 7, torch.ones(4), "hidden check 5 (ties at .5: half to even)",
                            "forward", exact=True))
    return Part("test_ste_forward", 10, tuple(checks))


def ste_backward() -> Part:
    example = torch.tensor([-1.0, -0.2, 0.26, 0.5, 2.0])
    checks = [ste_check(example, 0.25, 0, -4, 3, torch.ones(5), "the worked example", "backward")]
    generator = torch.Generator().manual_seed(2)
    x, grad_output = torch.randn(1000, generator=generator), torch.randn(1000, generator=generator)
    for scale, zero_point, qmin, qmax in [(0.01, 0, -127, 127), (0.2, 2, -8, 7)]:
        checks.append(ste_check(x, scale, zero_point, qmin, qmax, grad_output, f"scale {scale}", "backward"))
    generator, hidden = torch.Generator().manual_seed(302), labels("hidden check")
    for shape, scale, zero_point, qmin, qmax in [((4, 5, 6), 0.3, 0, -4, 3), ((2000,), 0.01, 128, 0, 255), ((7, 9), 0.5, 0, 0, 15)]:
        x = torch.randn(*shape, generator=generator) * 3
        checks.append(ste_check(x, scale, zero_point, qmin, qmax, torch.randn(*shape, generator=generator), hidden(), "backward"))
    checks.append(ste_check(torch.tensor([-0.6, 0.6]), 0.5, 0, -1, 1, torch.ones(2), f"{hidden()} (values that round onto qmin and qmax)",
                            "backward"))
    return Part("test_ste_backward", 15, tuple(checks))


# -- Part 2: LSQ -------------------------------------------------------------------------------------------


def grad_scale_check(n: int, qp: int, label: str) -> Check:
    expected = 1 / math.sqrt(n * qp)

    def judge(out):
        g = returned(out, None, "lsq_grad_scale")
        expect(type(g) is float, f"lsq_grad_scale must return a Python float, got {type(g).__name__}")
        expect(close(g, expected, rtol=1e-12), "the gradient scale differs from 1 / sqrt(N * Qp)")

    return Check(call("lsq_grad_scale", n, qp), judge, label)


def lsq_check(x, step: float, grad_scale: float, bits: int, signed: bool, grad_output, label: str, what: str,
              qn: int | None = None, qp: int | None = None) -> Check:
    """what: "forward" compares the output with qlab's LSQ, "backward" both gradients.

    Codes [-qn, qp] default to the qtype's (signed: [-qmax, qmax]; unsigned: [0, qmax]); a range no qtype has
    is checked against the paper's formulas, written out here.
    """
    qtype = ql.qtype(bits, signed=signed)
    x_ref, s_ref = x.clone().requires_grad_(True), torch.tensor(step).requires_grad_(True)
    if qn is None:
        qn, qp = (qtype.qmax, qtype.qmax) if signed else (0, qtype.qmax)
        expected = LSQFakeQuantize.apply(x_ref, s_ref, torch.tensor(0, dtype=torch.int32), qtype, ql.PerTensor(), grad_scale)
        expected.backward(grad_output)
    else:
        v = x / step
        expected = torch.round(v).clamp(-qn, qp) * step
        x_ref.grad = grad_output * ((v > -qn) & (v < qp))
        dv_ds = torch.where(v <= -qn, float(-qn), torch.where(v >= qp, float(qp), torch.round(v) - v))
        s_ref.grad = (grad_output * dv_ds).sum() * grad_scale

    def judge(out):
        y, grad_x, grad_step = returned(out, 3, "lsq_forward_backward")
        if what == "forward":
            y = tensor(y, torch.float32, tuple(x.shape), "the output")
            expect(torch.allclose(y, expected.detach(), atol=1e-6), "the output differs from the expected LSQ fake quantization")
            return
        expect(grad_x is not None, "no gradient reached x")
        expect(grad_step is not None, "no gradient reached the step size")
        grad_x = tensor(grad_x, torch.float32, tuple(x.shape), "the gradient for x")
        expect(torch.allclose(grad_x, x_ref.grad), "the gradient for x differs from LSQ's")
        grad_step = tensor(grad_step, torch.float32, (), "the gradient for the step")
        expect(close(float(grad_step), float(s_ref.grad), rtol=1e-4, atol=1e-6), "the gradient for the step differs from LSQ's")

    return Check(call("lsq_forward_backward", x, step, grad_scale, qn, qp, grad_output), judge, label)


def lsq_forward() -> Part:
    checks = [grad_scale_check(4, 3, "lsq_grad_scale(4, 3)"),
              lsq_check(torch.tensor([-1.0, 0.1, 0.3, 2.0]), 0.25, 1 / math.sqrt(12), 2, True, torch.ones(4), "the worked example",
                        "forward", qn=3, qp=3),
              lsq_check(torch.tensor([-0.5, 0.2, 0.9, 5.0]), 0.25, 0.1, 3, False, torch.ones(4), "unsigned codes", "forward")]
    hidden = labels("hidden check")
    checks += [grad_scale_check(n, 2 ** (bits - 1) - 1, hidden()) for n, bits in [(1, 2), (576, 3), (10_000, 8)]]
    generator = torch.Generator().manual_seed(303)
    for shape, step, bits, signed in [((4, 5, 6), 0.3, 3, True), ((256,), 0.05, 4, False), ((8, 8), 0.01, 8, True)]:
        x = torch.randn(*shape, generator=generator)
        checks.append(lsq_check(x, step, 0.1, bits, signed, torch.ones_like(x), hidden(), "forward"))
    return Part("test_lsq_forward", 10, tuple(checks))


def lsq_backward() -> Part:
    checks = [lsq_check(torch.tensor([-1.0, 0.1, 0.3, 2.0]), 0.25, 1 / math.sqrt(12), 2, True, torch.ones(4),
                        "the worked example", "backward", qn=3, qp=3)]
    generator = torch.Generator().manual_seed(3)
    x, grad_output = torch.randn(500, generator=generator), torch.randn(500, generator=generator)
    checks.append(lsq_check(x, 0.2, 0.05, 3, True, grad_output, "random data, codes [-4, 3]", "backward", qn=4, qp=3))
    generator, hidden = torch.Generator().manual_seed(304), labels("hidden check")
    for shape, step, bits, signed, grad_scale in [((4, 5, 6), 0.3, 3, True, 0.2), ((1024,), 0.05, 4, False, 0.01),
                                                  ((16, 9), 0.02, 8, True, 1.0), ((2, 3), 1.0, 2, True, 0.5)]:
        x = torch.relu(torch.randn(*shape, generator=generator)) if not signed else torch.randn(*shape, generator=generator)
        grad_output = torch.randn(*shape, generator=generator)
        checks.append(lsq_check(x, step, grad_scale, bits, signed, grad_output, hidden(), "backward"))
    return Part("test_lsq_backward", 15, tuple(checks))


# -- Part 3: QAT -------------------------------------------------------------------------------------------


def accuracy_of(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).double().mean())


def initial_weight_steps() -> list[float]:
    """LSQ's initial w_step of each layer of LAYERS, as prepare_qat(folded_model, BITS) sets it."""
    folded, w_qp = setup()[0], 2 ** (BITS - 1) - 1
    return [float(2 * folded.get_submodule(name).weight.detach().abs().mean() / math.sqrt(w_qp)) for name in LAYERS]


def state_shapes() -> list[tuple]:
    """The shapes of qat_state()'s 16 tensors: (weight, bias, w_step, a_step) per layer."""
    folded = setup()[0]
    return [shape for name in LAYERS for shape in (tuple(folded.get_submodule(name).weight.shape),
                                                   tuple(folded.get_submodule(name).bias.shape), (), ())]


def trained(state: tuple, initial_steps: list[float]) -> bool:
    """Whether some layer's w_step moved away from LSQ's initial value."""
    return any(not close(float(state[4 * k + 2]), initial_steps[k], rtol=1e-6) for k in range(len(LAYERS)))


def qat_accuracy() -> Part:
    _, x_test, y_test, _ = setup()
    initial_steps, shapes = initial_weight_steps(), state_shapes()

    def judge_state(out):
        values = returned(out, len(shapes), "qat_state")
        state = tuple(tensor(value, torch.float32, shape, "a weight, bias or step size") for value, shape in zip(values, shapes))
        expect(trained(state, initial_steps), "qat_model has LSQ's initial step sizes: train it with train_qat (all of model.parameters())")

    def judge(out):
        logits = tensor(returned(out, None, "qat_logits"), torch.float32, (len(x_test), 10), "the logits")
        expect(accuracy_of(logits, y_test) >= QAT_ACCURACY, f"the {BITS}-bit model must reach at least {QAT_ACCURACY:.0%} test accuracy")

    return Part("test_qat_accuracy", 25, (Check(call("qat_state"), judge_state, "the trained step sizes"),
                                          Check(call("qat_logits", x_test), judge, f"{BITS}-bit test accuracy")))


def rebuild(state: tuple) -> nn.Module:
    """The QAT model rebuilt from (weight, bias, w_step, a_step) per layer with torch's fake quantization."""
    model = copy.deepcopy(setup()[0])
    w_qp, a_qp = 2 ** (BITS - 1) - 1, 2 ** BITS - 1
    for k, name in enumerate(LAYERS):
        weight, bias, w_step, a_step = state[4 * k : 4 * k + 4]
        layer = model.get_submodule(name)
        with torch.no_grad():
            layer.weight.copy_(torch.fake_quantize_per_tensor_affine(weight, float(w_step), 0, -w_qp, w_qp))
            layer.bias.copy_(bias)
        layer.register_forward_pre_hook(lambda _m, args, s=float(a_step): torch.fake_quantize_per_tensor_affine(args[0], s, 0, 0, a_qp))
    return model.eval()


def qat_is_quantized() -> Part:
    _, x_test, y_test, _ = setup()
    initial_steps, shapes = initial_weight_steps(), state_shapes()
    seen = {}

    def judge_state(out):
        seen.clear()  # judged one submission at a time: never keep another student's model
        values = returned(out, len(shapes), "qat_state")
        state = tuple(tensor(value, torch.float32, shape, "a weight, bias or step size") for value, shape in zip(values, shapes))
        expect(all(float(state[4 * k + i]) > 0 for k in range(len(LAYERS)) for i in (2, 3)), "step sizes must stay positive")
        expect(trained(state, initial_steps), "the step sizes were not trained: pass all of model.parameters() to the optimizer")
        with torch.no_grad():
            seen["rebuilt"] = rebuild(state)(x_test)
        expect(accuracy_of(seen["rebuilt"], y_test) >= QAT_ACCURACY, f"the model rebuilt at {BITS} bits does not reach {QAT_ACCURACY:.0%}")

    def judge_logits(out):
        logits = tensor(returned(out, None, "qat_logits"), torch.float32, (len(x_test), 10), "the logits")
        expect("rebuilt" in seen, "the model's state could not be checked")
        agree = float((logits.argmax(-1) == seen["rebuilt"].argmax(-1)).double().mean())
        expect(agree >= 0.99, f"the predictions differ from the model rebuilt at {BITS} bits")

    return Part(f"test_qat_is_{BITS}bit", 10, (Check(call("qat_state"), judge_state, "the trained weights and step sizes"),
                                         Check(call("qat_logits", x_test), judge_logits, f"the {BITS}-bit predictions")))


# -- Part 4: analysis --------------------------------------------------------------------------------------


def reference_ptq(bits: int, steps: str = "minmax") -> float:
    """Test accuracy of the folded model with weights and layer inputs fake-quantized at `bits`, per tensor:
    with min/max steps (PTQ, `static_fake_quant`), or with LSQ's initial steps (the untrained QAT model of
    `prepare_qat`: 2 mean|t| / sqrt(qp))."""
    folded, x_test, y_test, calib_x = setup()
    model = copy.deepcopy(folded)
    inputs = {}
    handles = [model.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, args[0]))
               for name in LAYERS]
    with torch.no_grad():
        model(calib_x)
    for handle in handles:
        handle.remove()
    w_qp, a_qp = 2 ** (bits - 1) - 1, 2 ** bits - 1

    def step(t: torch.Tensor, qp: int) -> float:
        return float(t.abs().max()) / qp if steps == "minmax" else float(2 * t.abs().mean() / math.sqrt(qp))

    for name in LAYERS:
        layer = model.get_submodule(name)
        with torch.no_grad():
            layer.weight.copy_(torch.fake_quantize_per_tensor_affine(layer.weight, step(layer.weight, w_qp), 0, -w_qp, w_qp))
        s = step(inputs[name], a_qp)
        layer.register_forward_pre_hook(lambda _m, args, s=s: torch.fake_quantize_per_tensor_affine(args[0], s, 0, 0, a_qp))
    return ql.eval.accuracy(model, x_test, y_test)


def own_value(out: Outcome) -> float | None:
    """A context probe's number, or None if the student's own pipeline gave nothing usable."""
    return out.value if not (out.missing or out.raised) and type(out.value) is float else None


def accuracy_value(out: Outcome, variable: str) -> float:
    value = returned(out, None, variable)
    expect(type(value) is float and 0.0 <= value <= 1.0, f"{variable} must be an accuracy in [0, 1] (a Python float)")
    return value


def analysis_accuracy() -> Part:
    """2 points per value. The PTQ values are right if they match the reference, or (errors carried forward) the
    accuracy of static_fake_quant built on the student's own fake_quant_ste; qat_acc_3bit must be the accuracy of
    qat_model (computed here from its logits), and qat_acc_4bit at least 98.5 %."""
    _, x_test, y_test, _ = setup()
    checks = []
    for bits in (4, 3):
        expected = reference_ptq(bits)

        def judge(out, *context, variable=f"ptq_acc_{bits}bit", expected=expected):
            value = accuracy_value(out, variable)
            own = own_value(context[-1])
            expect(abs(value - expected) <= 0.006 or (own is not None and abs(value - own) <= 0.006),
                   f"{variable} differs from the accuracy of static_fake_quant(folded_model, {bits})")

        context = (read("folded_model", key="folded"),) if bits == 4 else ()
        context += (call("static_fake_quant", Ref("folded"), bits, key=f"ptq_{bits}"), call("test_accuracy", Ref(f"ptq_{bits}")))
        checks.append(Check(read(f"ptq_acc_{bits}bit"), judge, f"ptq_acc_{bits}bit", points=2, context=context))

    def qat_value(out, logits_out):
        value = accuracy_value(out, f"qat_acc_{BITS}bit")
        logits = tensor(returned(logits_out, None, "qat_logits"), torch.float32, (len(x_test), 10), "the logits")
        expect(close(value, accuracy_of(logits, y_test), atol=1e-6), f"qat_acc_{BITS}bit is not the accuracy of qat_model")

    def qat_4bit(out):
        value = accuracy_value(out, "qat_acc_4bit")
        expect(value >= 0.985, "qat_acc_4bit: 4-bit QAT must reach at least 98.5%")

    checks += [Check(read(f"qat_acc_{BITS}bit"), qat_value, f"qat_acc_{BITS}bit", points=2, context=(call("qat_logits", x_test),)),
               Check(read("qat_acc_4bit"), qat_4bit, "qat_acc_4bit", points=2)]
    return Part("test_analysis_accuracy", 8, tuple(checks))


def analysis_answer() -> Part:
    why_qat, why_grad_scale = letter("why_qat", "c"), letter("why_grad_scale", "a")
    return Part("test_analysis_answer", 7, (Check(why_qat.probe, why_qat.judge, why_qat.label, points=4),
                                            Check(why_grad_scale.probe, why_grad_scale.judge, why_grad_scale.label, points=3)))


def parts() -> list[Part]:
    """The graded parts of lab 3, in notebook order."""
    return [ste_forward(), ste_backward(), lsq_forward(), lsq_backward(), qat_accuracy(), qat_is_quantized(),
            analysis_accuracy(), analysis_answer()]
