"""qlab.cle: a hand-computed 2-channel case, function preservation, and lower per-tensor weight error."""

import copy
import math

import pytest
import torch
import torch.nn as nn

import qlab as ql
from qlab.bn_folding import fold_batchnorm_
from qlab.cle import equalization_scales, equalize_, find_equalization_pairs, rescale_pair


def test_two_channel_case_by_hand():
    w1 = torch.tensor([[1.0, -2.0], [0.5, 0.25]])  # r1 = (2, 0.5)
    w2 = torch.tensor([[8.0, 1.0], [-2.0, 0.5]])  # r2 = (8, 1)  (columns)
    s = equalization_scales(w1, w2)
    assert torch.allclose(s, torch.tensor([math.sqrt(2 / 8), math.sqrt(0.5 / 1)]))  # (0.5, 0.7071)
    b1 = torch.tensor([1.0, -1.0])
    w1e, b1e, w2e = rescale_pair(w1, b1, w2, s)
    assert torch.allclose(w1e, torch.tensor([[2.0, -4.0], [0.5 / 0.5**0.5, 0.25 / 0.5**0.5]]))
    assert torch.allclose(b1e, torch.tensor([2.0, -1 / 0.5**0.5]))
    assert torch.allclose(w2e, torch.tensor([[4.0, 0.5**0.5], [-1.0, 0.5 * 0.5**0.5]]))
    # both layers now have range sqrt(r1 r2) = (4, sqrt(0.5)) in channel i
    assert torch.allclose(w1e.abs().amax(1), torch.tensor([4.0, 0.5**0.5]))
    assert torch.allclose(w2e.abs().amax(0), torch.tensor([4.0, 0.5**0.5]))
    x = torch.randn(5, 2)
    assert torch.allclose(torch.relu(x @ w1.T + b1) @ w2.T, torch.relu(x @ w1e.T + b1e) @ w2e.T, atol=1e-5)


def test_conv_scales_and_dead_channels():
    w1, w2 = torch.randn(4, 3, 3, 3), torch.randn(6, 4, 3, 3)
    w1[2] = 0  # a dead channel keeps s = 1
    s = equalization_scales(w1, w2)
    r1, r2 = w1.abs().amax(dim=(1, 2, 3)), w2.abs().amax(dim=(0, 2, 3))
    expected = torch.sqrt(r1 / r2)
    expected[2] = 1.0
    assert s.shape == (4,) and torch.allclose(s, expected)


def imbalanced_mlp(seed: int = 0) -> nn.Sequential:
    """Linear-ReLU-Linear-ReLU-Linear whose hidden channels differ in scale by up to 10^4."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        for first, second in [(net[0], net[2]), (net[2], net[4])]:
            k = torch.logspace(-2, 2, 32)[torch.randperm(32)]  # (32,) channel scale factors
            first.weight.mul_(k.unsqueeze(1))
            first.bias.mul_(k)
            second.weight.div_(k.unsqueeze(0))  # same function, badly balanced weights
    return net


def w8_per_tensor(net: nn.Module) -> nn.Module:
    q = copy.deepcopy(net)
    for m in q.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.data = ql.fake_quantize(m.weight.data, ql.int8, ql.PerTensor())
    return q


def test_equalize_preserves_function_and_cuts_quantization_error():
    net = imbalanced_mlp()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
        err_before = ql.metrics.mse(ref, w8_per_tensor(net)(x))
        pairs = equalize_(net)
        assert pairs == [("0", "2"), ("2", "4")]
        out = net(x)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        err_after = ql.metrics.mse(ref, w8_per_tensor(net)(x))
    assert err_after < 0.01 * err_before
    # converged: both layers of each pair have equal per-channel ranges
    for a, b in pairs:
        w1, w2 = dict(net.named_modules())[a].weight, dict(net.named_modules())[b].weight
        assert torch.allclose(equalization_scales(w1, w2), torch.ones(w1.shape[0]), atol=1e-3)


def test_digits_cnn_pairs_need_folding_first():
    model = ql.models.digits_cnn(pretrained=True)
    assert find_equalization_pairs(model) == []  # BatchNorm between the layers blocks CLE
    fold_batchnorm_(model)
    assert find_equalization_pairs(model) == [("conv1", "conv2"), ("conv2", "conv3"), ("conv3", "fc")]
    x, y = ql.data.digits_split("test")
    with torch.no_grad():
        ref = model(x)
        equalize_(model)
        assert torch.allclose(model(x), ref, atol=1e-4)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h)) + h)  # h feeds b and the skip: (a, b) is not a valid pair


def test_branches_are_not_paired():
    assert find_equalization_pairs(Residual()) == []


def test_cle_errors():
    with pytest.raises(ValueError, match="4 output channels but layer 2 has 3 input channels"):
        equalization_scales(torch.randn(4, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="positive"):
        rescale_pair(torch.randn(2, 2), None, torch.randn(2, 2), torch.tensor([1.0, -1.0]))
    net = imbalanced_mlp()
    with pytest.raises(ValueError, match="two Conv/Linear layers"):
        equalize_(net, [("0", "1")])
    with pytest.raises(ValueError, match="iterations"):
        equalize_(net, iterations=0)
    dw = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    assert find_equalization_pairs(dw) == []
    with pytest.raises(ValueError, match="depthwise"):
        equalize_(dw, [("0", "2")])
