"""qlab.bn_folding against torch.nn.utils.fusion, the eval-mode model, and the digits CNN's accuracy."""

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import qlab as ql
from qlab.bn_folding import find_conv_bn_pairs, fold_batchnorm_, fold_bn


def randomize_bn_(bn: nn.modules.batchnorm._BatchNorm, g: torch.Generator) -> None:
    """Running statistics and affine parameters far from their defaults, so folding really does something."""
    c = bn.num_features
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.05)
    if bn.affine:
        bn.weight.data.copy_(torch.randn(c, generator=g))
        bn.bias.data.copy_(torch.randn(c, generator=g))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_bn_matches_torch_fuse_conv_bn_eval(bias, affine):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, bias=bias).eval(), nn.BatchNorm2d(5, eps=1e-3, affine=affine).eval()
    randomize_bn_(bn, g)
    ref = fuse_conv_bn_eval(conv, bn)
    w, b = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    assert torch.allclose(w, ref.weight, atol=1e-6) and torch.allclose(b, ref.bias, atol=1e-6)
    x = torch.randn(2, 3, 6, 6, generator=g)
    assert torch.allclose(nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-5)


def test_fold_bn_matches_torch_fuse_linear_bn_eval():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    linear, bn = nn.Linear(6, 4).eval(), nn.BatchNorm1d(4).eval()
    randomize_bn_(bn, g)
    ref = fuse_linear_bn_eval(linear, bn)
    w, b = fold_bn(linear.weight, linear.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    assert torch.allclose(w, ref.weight, atol=1e-6) and torch.allclose(b, ref.bias, atol=1e-6)


def test_fold_bn_shape_error():
    with pytest.raises(ValueError, match="3 output channels"):
        fold_bn(torch.randn(3, 2), None, torch.zeros(4), torch.ones(4), None, None, 1e-5)


def test_digits_cnn_folds_without_changing_outputs_or_accuracy():
    model = ql.models.digits_cnn(pretrained=True)
    x, y = ql.data.digits_split("test")
    with torch.no_grad():
        ref = model(x)
    acc = ql.eval.accuracy(model, x, y)
    assert find_conv_bn_pairs(model) == [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    folded = fold_batchnorm_(model)
    assert folded == [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    assert all(isinstance(getattr(model, f"bn{i}"), nn.Identity) for i in (1, 2, 3))
    assert model.conv1.bias is not None and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)
    assert ql.eval.accuracy(model, x, y) == acc
    assert find_conv_bn_pairs(model) == []  # nothing left to fold


def random_net(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = lambda cin, cout: nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())  # noqa: E731
    net = nn.Sequential(
        block(3, 8), nn.Sequential(block(8, 8), block(8, 4)), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2),
    ).eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_bn_(m, g)
    return net


@pytest.mark.parametrize("seed", range(3))
def test_random_nested_nets_fold_exactly(seed):
    net = random_net(seed)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        ref = net(x)
        pairs = fold_batchnorm_(net)
        assert pairs == [("0.0", "0.1"), ("1.0.0", "1.0.1"), ("1.1.0", "1.1.1"), ("3", "4")]
        assert torch.allclose(net(x), ref, atol=1e-5, rtol=1e-5)


class Residual(nn.Module):
    """conv's output feeds both the BatchNorm and a skip connection: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.conv2, self.bn2 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.conv2(x))


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_shared_outputs_are_not_folded():
    assert find_conv_bn_pairs(Residual().eval()) == [("conv2", "bn2")]


def test_untraceable_model_needs_explicit_pairs():
    model = DataDependent().eval()
    randomize_bn_(model.bn, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="pass the pairs explicitly"):
        fold_batchnorm_(model)
    x = torch.rand(2, 1, 3, 3)
    ref = model(x)
    assert fold_batchnorm_(model, [("conv", "bn")]) == [("conv", "bn")]
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_fold_batchnorm_errors():
    model = ql.models.digits_cnn(pretrained=False).train()
    with pytest.raises(ValueError, match="model.eval"):
        fold_batchnorm_(model)
    model.eval()
    with pytest.raises(ValueError, match="must name a Conv/Linear"):
        fold_batchnorm_(model, [("bn1", "conv1")])
    with pytest.raises(ValueError, match="one pair only"):
        fold_batchnorm_(model, [("conv1", "bn1"), ("conv1", "bn2")])
    assert isinstance(model.bn1, nn.BatchNorm2d)  # nothing was changed by the failed calls
    deconv = nn.Sequential(nn.ConvTranspose2d(2, 3, 2), nn.BatchNorm2d(3)).eval()
    with pytest.raises(ValueError, match="not transposed"):
        fold_batchnorm_(deconv, [("0", "1")])
