"""qlab.qat: STE and LSQ gradients against torch and the paper's formulas; QAT -> integer model on digits."""

import copy

import pytest
import torch

import qlab as ql
from qlab import kernels
from qlab.api import FakeQuantConfig, quantize_
from qlab.nn import QuantConv2d, QuantLinear
from qlab.qat import (
    FakeQuantConv2d,
    FakeQuantLinear,
    LSQFakeQuantize,
    convert_,
    fake_quantize_ste,
    lsq_grad_scale,
    qat_schedule_,
)


# ----------------------------------------------------------------------------- STE == torch.fake_quantize_*
@pytest.mark.parametrize("qtype, zero_point, qmin", [(ql.int8, 0, -127), (ql.uint8, 37, 0), (ql.uint4, 3, 0)])
def test_ste_matches_torch_fake_quantize_per_tensor(qtype, zero_point, qmin):
    torch.manual_seed(0)
    x = (torch.randn(64, 33) * 2).requires_grad_()  # wide enough that some codes clamp
    x_t = x.detach().clone().requires_grad_()
    scale = 0.02 if qtype.bits == 8 else 0.3
    y = fake_quantize_ste(x, torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32), qtype)
    y_t = torch.fake_quantize_per_tensor_affine(x_t, scale, zero_point, qmin, qtype.qmax)
    assert torch.equal(y, y_t)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_t.backward(grad)
    assert torch.equal(x.grad, x_t.grad)
    assert (x.grad == 0).any() and (x.grad != 0).any()  # both the clipped (zero) and the pass-through region


def test_ste_matches_torch_fake_quantize_per_channel():
    torch.manual_seed(1)
    w = (torch.randn(8, 20) * 3).requires_grad_()
    w_t = w.detach().clone().requires_grad_()
    scale = torch.rand(8) / 20 + 0.01
    zero_point = torch.zeros(8, dtype=torch.int32)
    y = fake_quantize_ste(w, scale, zero_point, ql.int8, ql.PerChannel(0))
    y_t = torch.fake_quantize_per_channel_affine(w_t, scale, zero_point, 0, -127, 127)
    assert torch.equal(y, y_t)
    y.sum().backward()
    y_t.sum().backward()
    assert torch.equal(w.grad, w_t.grad) and (w.grad == 0).any()


def test_ste_forward_is_qlab_quantize_then_dequantize():
    x = torch.randn(10, 16)
    s, z = ql.choose_qparams(x, ql.uint8, ql.PerToken(), symmetric=False)
    expected = ql.dequantize(ql.quantize(x, s, z, ql.uint8, ql.PerToken()), s, z, ql.PerToken())
    assert torch.equal(fake_quantize_ste(x, s, z, ql.uint8, ql.PerToken()), expected)


# ----------------------------------------------------------------------------- LSQ
def lsq_paper_reference(x, s, g, qn, qp):
    """The LSQ paper's own code (Esser et al. 2020, Appendix): gradient scaling and round_pass by detach."""
    s_scaled = (s - s * g).detach() + s * g  # grad_scale(s, g)
    v = torch.clamp(x / s_scaled, -qn, qp)
    v = (v.round() - v).detach() + v  # round_pass
    return v * s_scaled


@pytest.mark.parametrize("qtype", [ql.int4, ql.uint4])
def test_lsq_gradients_match_the_papers_code(qtype):
    torch.manual_seed(0)
    x = (torch.randn(200) * 2).abs() if not qtype.signed else torch.randn(200) * 2
    qn, qp = (qtype.qmax if qtype.signed else 0), qtype.qmax
    g = lsq_grad_scale(x.numel(), qtype)
    x1, s1 = x.clone().requires_grad_(), torch.tensor(0.3, requires_grad=True)
    x2, s2 = x.clone().requires_grad_(), torch.tensor(0.3, requires_grad=True)
    y1 = LSQFakeQuantize.apply(x1, s1, torch.tensor(0, dtype=torch.int32), qtype, ql.PerTensor(), g)
    y2 = lsq_paper_reference(x2, s2, g, qn, qp)
    torch.testing.assert_close(y1, y2)
    grad = torch.randn(200)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad)  # the paper's x / s * s differs from 1 by an ulp
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-6)


def test_lsq_step_gradient_hand_formula_and_finite_differences():
    """ds: round(v) - v inside, -Qn / Qp where clamped (eq. 3), times g = 1 / sqrt(N Qp)."""
    x = torch.tensor([0.26, -0.41, 0.05, 3.0, -5.0])  # v = x / s: two clamped (3.0, -5.0 at 4 bits, s = 0.1)
    s = torch.tensor(0.1, requires_grad=True)
    g = lsq_grad_scale(5, ql.int4)
    assert g == pytest.approx(1 / (5 * 7) ** 0.5)
    LSQFakeQuantize.apply(x, s, torch.tensor(0, dtype=torch.int32), ql.int4, ql.PerTensor(), g).sum().backward()
    v = x / 0.1
    by_hand = sum(float(round(vi) - vi) if -7 < vi < 7 else (7.0 if vi >= 7 else -7.0) for vi in v.tolist()) * g
    assert float(s.grad) == pytest.approx(by_hand, rel=1e-5)
    # in the clamped region x_hat = +-Qp * s is linear in s, so finite differences give exactly +-Qp
    for xi, slope in [(3.0, 7.0), (-5.0, -7.0)]:
        f = lambda step: float(LSQFakeQuantize.apply(torch.tensor([xi]), torch.tensor(step), torch.tensor(0), ql.int4, ql.PerTensor(), 1.0))
        assert (f(0.1 + 1e-3) - f(0.1 - 1e-3)) / 2e-3 == pytest.approx(slope, rel=1e-3)


def test_lsq_per_channel_gradient_sums_each_channel():
    torch.manual_seed(0)
    w = torch.randn(4, 10)
    s = torch.full((4,), 0.2, requires_grad=True)
    LSQFakeQuantize.apply(w, s, torch.zeros(4, dtype=torch.int32), ql.int4, ql.PerChannel(0), 1.0).sum().backward()
    for c in range(4):
        s_c = torch.tensor(0.2, requires_grad=True)
        LSQFakeQuantize.apply(w[c], s_c, torch.tensor(0), ql.int4, ql.PerTensor(), 1.0).sum().backward()
        torch.testing.assert_close(s.grad[c], s_c.grad)


# ----------------------------------------------------------------------------- modules, schedule, conversion
def test_fake_quant_linear_converts_to_an_equal_integer_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    x = torch.randn(64, 32)
    quantize_(model, FakeQuantConfig(weight_qtype=ql.int4, act_qtype=ql.uint8), calib_data=[x])
    assert isinstance(model[0], FakeQuantLinear)
    with torch.no_grad():
        fake = model(x)
    convert_(model)
    assert isinstance(model[0], QuantLinear) and model[0].weight_qtype == ql.qtype(4)
    with kernels.trace() as ran, torch.no_grad():
        real = model(x)
    assert len(ran) == 2 and kernels.REFERENCE not in ran  # a real integer kernel, no float simulation
    torch.testing.assert_close(real, fake, rtol=1e-5, atol=1e-5)


def test_schedule_freezes_observers_and_batchnorm():
    model = quantize_(ql.models.digits_cnn(pretrained=False), FakeQuantConfig())
    model.train()
    qat_schedule_(model, step=5, freeze_observers_at=10, freeze_bn_at=20)
    model(torch.rand(4, 1, 8, 8))  # observers see one batch
    assert bool(model.conv1.act_fake_quant.observer_enabled) and model.bn1.training
    qat_schedule_(model, step=10, freeze_observers_at=10, freeze_bn_at=20)
    assert not bool(model.conv1.act_fake_quant.observer_enabled) and model.bn1.training
    qat_schedule_(model, step=20, freeze_observers_at=10, freeze_bn_at=20)
    assert not model.bn1.training
    scale = model.conv2.act_fake_quant.scale.clone()
    model(torch.rand(4, 1, 8, 8) * 100)  # frozen: a wild batch moves nothing
    assert torch.equal(scale, model.conv2.act_fake_quant.scale)


def test_lsq_needs_calibration_data():
    with pytest.raises(ValueError, match="needs calib_data"):
        quantize_(ql.models.digits_cnn(pretrained=False), FakeQuantConfig(learnable=True))


def test_qat_at_4_bits_recovers_accuracy_and_converts_to_integers():
    """Naive 4-bit PTQ (per-tensor weights, signed activations) loses accuracy; two epochs of QAT win it back,
    and the integer model that convert_ builds scores the same as the QAT model."""
    torch.manual_seed(0)
    x_train, y_train = ql.data.digits_split("train")
    x_test, y_test = ql.data.digits_split("test")
    model = ql.models.digits_cnn(pretrained=True)
    fp32 = ql.eval.accuracy(model, x_test, y_test)
    config = FakeQuantConfig(weight_qtype=ql.int4, act_qtype=ql.int4, weight_granularity=ql.PerTensor())
    quantize_(model, config, calib_data=ql.data.digits_calibration_batches())
    assert isinstance(model.conv1, FakeQuantConv2d)
    ptq = ql.eval.accuracy(model, x_test, y_test)

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen, step = torch.Generator().manual_seed(0), 0
    for _ in range(2):
        model.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(64):
            qat_schedule_(model, step, freeze_observers_at=30, freeze_bn_at=30)
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    qat = ql.eval.accuracy(model, x_test, y_test)
    assert ptq < fp32 - 0.01  # PTQ at 4 bits visibly hurts
    assert qat > ptq + 0.01 and qat >= fp32 - 0.01  # QAT recovers

    model.eval()
    with torch.no_grad():
        fake_logits = model(x_test)
    convert_(model)
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.fc, QuantLinear)
    assert ql.eval.accuracy(model, x_test, y_test) == pytest.approx(qat, abs=1 / len(y_test))
    with torch.no_grad():
        int_logits = model(x_test)
    assert (int_logits - fake_logits).abs().max() < 0.05 * fake_logits.abs().max()
