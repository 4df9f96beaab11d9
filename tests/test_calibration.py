"""qlab.calibration: hooks only inside `with`, statistics equal to the captured tensors', static W8A8 on the digits CNN."""

import copy

import pytest
import torch
import torch.nn as nn

import qlab as ql
from qlab import calibration
from qlab.bn_folding import fold_batchnorm_
from qlab.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
)


@pytest.fixture(scope="module")
def cnn():
    return ql.models.digits_cnn(pretrained=True)


@pytest.fixture(scope="module")
def calib():
    return ql.data.digits_calibration_batches(4, 32)


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_observe_matches_captured_tensors(cnn, calib):
    names = ["conv1", "conv2", "conv3", "fc"]
    with calibration.observe(cnn, MinMaxObserver, where="both") as stats:
        assert not no_hooks(cnn)
        for x in calib:
            cnn(x)
    assert no_hooks(cnn) and list(stats) == names
    inputs = calibration.collect_activations(cnn, calib, names, where="input", progress=False)
    outputs = calibration.collect_activations(cnn, calib, names, where="output", progress=False)
    for name in names:
        for obs, ref in [(stats[name].input, inputs[name]), (stats[name].output, outputs[name])]:
            scale, zp = obs.calculate_qparams()
            s_ref, z_ref = ql.choose_qparams(ref, ql.int8)
            assert torch.equal(scale, s_ref) and torch.equal(zp, z_ref)
    assert inputs["fc"].shape == (128, 64) and outputs["conv2"].shape == (128, 64, 8, 8)


def test_observe_where_and_names(cnn, calib):
    with calibration.observe(cnn, HistogramObserver, module_names=["fc"], where="output") as stats:
        cnn(calib[0])
    assert list(stats) == ["fc"] and stats["fc"].input is None and stats["fc"].output.num_batches == 1
    stats = calibration.calibrate(cnn, calib, lambda: PercentileObserver(99.9), include=(nn.Conv2d,), progress=False)
    assert list(stats) == ["conv1", "conv2", "conv3"] and stats["conv2"].output is None
    assert stats["conv2"].input.num_batches == len(calib)


def test_hooks_removed_even_on_exception(cnn, calib):
    with pytest.raises(RuntimeError, match="boom"):
        with calibration.observe(cnn) as stats:
            cnn(calib[0])
            raise RuntimeError("boom")
    assert no_hooks(cnn) and stats["fc"].input.num_batches == 1
    with pytest.raises(ValueError, match="seen no data"):
        with calibration.fake_quantize_activations(cnn, {"fc": calibration.LayerStats(input=MinMaxObserver())}):
            pass
    assert no_hooks(cnn)


def test_calibrate_restores_training_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    stats = calibration.calibrate(model, [torch.randn(3, 4)] * 2, progress=False)
    assert model.training and no_hooks(model) and list(stats) == ["0", "2"]


def test_fake_quantize_activations_is_quantize_then_dequantize():
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    model = nn.Sequential(layer)
    xs = [torch.randn(5, 8) for _ in range(3)]
    obs_factory = lambda: MinMaxObserver(qtype=ql.uint8, symmetric=False)  # noqa: E731
    stats = calibration.calibrate(model, xs, obs_factory, where="both", progress=False)
    s_in, z_in = stats["0"].input.calculate_qparams()
    s_out, z_out = stats["0"].output.calculate_qparams()
    x = 3 * torch.randn(4, 8)  # beyond the calibrated range: must be clipped
    fq = lambda t, s, z: ql.dequantize(ql.quantize(t, s, z, ql.uint8), s, z)  # noqa: E731
    expected = fq(layer(fq(x, s_in, z_in)), s_out, z_out)
    with torch.no_grad():
        with calibration.fake_quantize_activations(model, stats):
            got = model(x)
        assert torch.equal(got, expected) and no_hooks(model)
        assert torch.equal(model(x), layer(x))


def test_per_channel_activation_observer_on_conv(cnn, calib):
    gran = ql.PerChannel(axis=1)  # (B, C, H, W): one scale per channel
    stats = calibration.calibrate(
        cnn, calib, lambda: MinMaxObserver(granularity=gran), module_names=["conv2"], where="output", progress=False
    )
    out = calibration.collect_activations(cnn, calib, ["conv2"], progress=False)["conv2"]
    assert torch.equal(stats["conv2"].output.calculate_qparams()[0], ql.choose_qparams(out, ql.int8, gran)[0])


def test_calibration_errors(cnn):
    with pytest.raises(ValueError, match="where="):
        with calibration.observe(cnn, where="middle"):
            pass
    with pytest.raises(ValueError, match="no module named"):
        with calibration.observe(cnn, module_names=["conv9"]):
            pass
    with pytest.raises(ValueError, match="must return an observer"):
        with calibration.observe(cnn, lambda: "minmax"):
            pass
    with pytest.raises(ValueError, match="no module of type"):
        calibration.layer_names(cnn, include=(nn.LSTM,))
    with pytest.raises(ValueError, match="'input' or 'output'"):
        calibration.collect_activations(cnn, [], ["fc"], where="both")
    assert no_hooks(cnn)


# ------------------------------------------------------------------ end to end: static W8A8 on the digits CNN
OBSERVERS = [MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, HistogramObserver, MSEObserver]


@pytest.fixture(scope="module")
def w8_cnn(cnn):
    model = copy.deepcopy(cnn)
    fold_batchnorm_(model)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.data = ql.fake_quantize(module.weight.data, ql.int8, ql.PerChannel(axis=0))
    return model


@pytest.mark.parametrize("observer", OBSERVERS, ids=lambda c: c.__name__)
def test_static_w8a8_keeps_digits_accuracy(cnn, w8_cnn, observer):
    x, y = ql.data.digits_split("test")
    fp32 = ql.eval.accuracy(cnn, x, y)
    stats = calibration.calibrate(w8_cnn, ql.data.digits_calibration_batches(8, 32), observer, progress=False)
    with calibration.fake_quantize_activations(w8_cnn, stats):
        w8a8 = ql.eval.accuracy(w8_cnn, x, y)
    assert w8a8 >= fp32 - 0.01
    assert no_hooks(w8_cnn)


def test_tiny_gpt_per_channel_hidden_dim():
    """Transformer activations (B, T, C): PerChannel(axis=-1) gives one scale per hidden channel."""
    torch.manual_seed(0)
    model = ql.models.tiny_gpt(pretrained=False)
    batches = [b[:, :32] for b in ql.data.lm_calibration_batches(2, 2, 32)]
    names = ["blocks.0.attn.c_attn", "blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj"]
    gran = ql.PerChannel(axis=-1)
    stats = calibration.calibrate(model, batches, lambda: MSEObserver(granularity=gran), module_names=names, progress=False)
    assert list(stats) == names and no_hooks(model)
    for name, st in stats.items():
        in_features = dict(model.named_modules())[name].in_features
        assert st.input.calculate_qparams()[0].shape == (in_features,)


def test_record_accepts_any_accumulator_such_as_a_hessian():
    """record() feeds each named layer's inputs to any callable: here H = sum x^T x, checked against the
    inputs captured by a plain hook."""
    class Hessian:
        def __init__(self):
            self.H, self.n = None, 0

        def __call__(self, x):
            x = x.reshape(-1, x.shape[-1]).double()
            self.H = x.t() @ x if self.H is None else self.H + x.t() @ x
            self.n += x.shape[0]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    batches = [torch.randn(5, 8) for _ in range(3)]
    stats = ql.calibration.record(model, ["2"], Hessian, batches, progress=False)
    inputs = torch.cat([torch.relu(model[0](b)) for b in batches]).double().detach()
    torch.testing.assert_close(stats["2"].input.H, inputs.t() @ inputs)
    assert stats["2"].input.n == 15 and stats["2"].output is None
    assert no_hooks(model)


def test_simulate_replaces_weights_and_inputs_then_restores_them():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    w0 = model[0].weight.detach().clone()
    x = torch.randn(3, 8)
    with ql.calibration.simulate(model, ["0"], weight_fn=lambda w: 2 * w, input_fn=lambda v: v + 1):
        y = model(x)
    torch.testing.assert_close(y, (x + 1) @ (2 * w0).t() + model[0].bias)
    assert torch.equal(model[0].weight, w0) and no_hooks(model)
    with pytest.raises(RuntimeError):
        with ql.calibration.simulate(model, ["0"], weight_fn=lambda w: 0 * w):
            raise RuntimeError("inside")
    assert torch.equal(model[0].weight, w0)
