"""qlab.bias_correction: the corrected layer's mean output equals the FP one; the digits CNN's mean error shrinks."""

import copy

import pytest
import torch
import torch.nn as nn

import qlab as ql
from qlab.bias_correction import bias_correction_, bias_correction_term, channel_mean
from qlab.bn_folding import fold_batchnorm_
from qlab.sensitivity import fake_quantize_weight_


def test_single_layer_mean_output_matches_after_correction():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(32, 16, bias=False))
    q = copy.deepcopy(fp)
    fake_quantize_weight_(q[0], ql.int2, ql.PerTensor())  # a coarse grid: a large, biased error
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 32, generator=g) + 1.0 for _ in range(4)]  # E[x] != 0 makes the error biased
    x = torch.cat(batches)
    with torch.no_grad():
        expected = (q(x) - fp(x)).double().mean(dim=0)  # E[W_q x] - E[W x], per output channel, written out
        corrections = bias_correction_(fp, q, batches, ["0"], progress=False)
        assert torch.allclose(corrections["0"].double(), expected, atol=1e-5)
        assert torch.allclose(channel_mean(q(x), -1), channel_mean(fp(x), -1), atol=1e-5)
        assert q[0].bias is not None and fp[0].bias is None


def test_digits_cnn_mean_output_error_shrinks():
    fp = ql.models.digits_cnn(pretrained=True)
    fold_batchnorm_(fp)
    q = copy.deepcopy(fp)
    names = ["conv1", "conv2", "conv3", "fc"]
    for name in names:
        fake_quantize_weight_(dict(q.named_modules())[name], ql.int4, ql.PerTensor())
    x_test, _ = ql.data.digits_split("test")

    def mean_error() -> float:  # |E[logits_q] - E[logits]| on held-out data, summed over classes
        with torch.no_grad():
            return float((q(x_test).mean(0) - fp(x_test).mean(0)).abs().sum())

    before = mean_error()
    conv2_before = q.conv2.bias.clone()
    corrections = bias_correction_(fp, q, ql.data.digits_calibration_batches(8, 32), names, progress=False)
    assert list(corrections) == names and corrections["conv2"].shape == (64,)
    assert torch.allclose(q.conv2.bias, conv2_before - corrections["conv2"])
    assert mean_error() < 0.5 * before


def test_conv_channel_axis():
    y = torch.arange(24.0).reshape(2, 3, 2, 2)
    assert torch.allclose(channel_mean(y, 1), y.transpose(0, 1).reshape(3, -1).mean(1).double())


def test_bias_correction_errors():
    fp = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    q = copy.deepcopy(fp)
    with pytest.raises(ValueError, match="calib_batches is empty"):
        bias_correction_(fp, q, [], ["0"])
    with pytest.raises(ValueError, match="no module named"):
        bias_correction_(fp, q, [torch.randn(2, 4)], ["fc"])
    with pytest.raises(ValueError, match="Conv or Linear"):
        bias_correction_(fp, q, [torch.randn(2, 4)], ["1"])
    with pytest.raises(ValueError, match="same inputs"):
        bias_correction_term(torch.randn(2, 4), torch.randn(3, 4), -1)


@pytest.mark.parametrize("config", [ql.Int8WeightOnlyConfig(), ql.Int4WeightOnlyConfig(group_size=16),
                                    ql.Int8DynamicConfig()])
def test_corrects_qlab_quantized_layers(config):
    """The docstring's promise: qlab's own quantized layers (buffers, no Parameters) get corrected too."""
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(32, 16, bias=False), nn.ReLU(), nn.Linear(16, 8))
    q = ql.quantize_(copy.deepcopy(fp), config)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 32, generator=g) + 1.0 for _ in range(4)]
    x = torch.cat(batches)
    with torch.no_grad():
        before = (q(x) - fp(x)).mean(dim=0).abs().max()
        bias_correction_(fp, q, batches, ["0", "2"], progress=False)
        after = (q(x) - fp(x)).mean(dim=0).abs().max()
    assert q[0].bias is not None and after < before / 2
