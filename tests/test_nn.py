"""qlab.nn: quantized layers against float math on their own dequantized operands (the oracle)."""

import pytest
import torch
import torch.nn.functional as F

import qlab as ql
from qlab import kernels
from qlab.nn import Int4WeightOnlyLinear, Int8WeightOnlyLinear, QuantConv2d, QuantLinear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def dequantized_input(layer, x):
    """x as the layer sees it: (codes - zero_point) * scale, in float64."""
    q, s, z = layer.quantize_input(x)
    return (q.double() - z.double()) * s.double()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # dynamic, per token, symmetric int8
        dict(act_granularity=ql.PerTensor()),
        dict(act_symmetric=False),  # uint8 codes: shift by 128 + zero-point correction
        dict(granularity_w=ql.PerTensor()),
        dict(act_qparams=(torch.tensor(0.03), torch.tensor(0))),  # static
        dict(act_qparams=(torch.tensor(0.03), torch.tensor(131)), act_symmetric=False),
    ],
)
def test_quant_linear_equals_float_matmul_of_dequantized_operands(kwargs):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    x = torch.randn(2, 5, 64)
    layer = QuantLinear.from_float(lin, **kwargs)
    with kernels.trace() as ran:
        y = layer(x)
    assert ran == [kernels.INT_MM_CPU]  # the real integer kernel ran, not a float simulation
    expected = dequantized_input(layer, x) @ layer.dequantize_weight().double().t() + lin.bias.double()
    assert y.shape == (2, 5, 24)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)  # fp32 rounding of the rescale only
    assert (y - lin(x)).abs().max() < 0.05  # and close to the float layer


def test_integer_accumulator_is_the_exact_sum_over_codes():
    """acc[m, n] = sum_k (x_q - z) * w_q, checked one product at a time on a tiny asymmetric case."""
    from qlab.nn import int8_gemm

    torch.manual_seed(1)
    layer = QuantLinear.from_float(torch.nn.Linear(6, 3), act_symmetric=False)
    x = torch.rand(4, 6) * 3 - 0.5
    q, _, z = layer.quantize_input(x)
    acc = int8_gemm(q, z, layer.weight_q)
    for m in range(4):
        for n in range(3):
            assert int(acc[m, n]) == sum((int(q[m, k]) - int(z[m, 0])) * int(layer.weight_q[n, k]) for k in range(6))


@pytest.mark.parametrize("conv_kwargs", [dict(padding=1), dict(stride=2, padding=2, dilation=2)])
@pytest.mark.parametrize("act_kwargs", [dict(), dict(act_granularity=ql.PerToken()), dict(act_symmetric=False)])
def test_quant_conv2d_equals_conv_of_dequantized_operands(conv_kwargs, act_kwargs):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, **conv_kwargs)
    x = torch.randn(2, 3, 9, 9)
    layer = QuantConv2d.from_float(conv, **act_kwargs)
    patches = layer.im2col(x)
    assert torch.equal(patches, F.unfold(x, 3, conv.dilation, conv.padding, conv.stride).transpose(1, 2))
    with kernels.trace() as ran:
        y = layer(x)
    assert ran == [kernels.INT_MM_CPU]
    w = layer.dequantize_weight().double()  # (O, C*kh*kw)
    expected = (dequantized_input(layer, patches) @ w.t() + conv.bias.double()).transpose(1, 2).reshape(y.shape)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert y.shape == conv(x).shape and (y - conv(x)).abs().max() < 0.05


def test_weight_only_layers_match_their_dequantized_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    x = torch.randn(3, 256)
    layers = [Int8WeightOnlyLinear(lin), Int4WeightOnlyLinear(lin, 64, layout="tinygemm"),
              Int4WeightOnlyLinear(lin, 64, layout="plain"), Int4WeightOnlyLinear(lin, 64, symmetric=True)]
    for layer in layers:
        expected = x.double() @ layer.dequantize_weight().double().t() + lin.bias.double()
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-4)
    fast, plain = layers[1], layers[2]
    torch.testing.assert_close(fast.dequantize_weight(), plain.dequantize_weight(), rtol=1e-5, atol=1e-6)
    assert fast.layout == "tinygemm" and plain.layout == "plain"
    assert Int4WeightOnlyLinear(torch.nn.Linear(256, 40), 64).layout == "plain"  # N % 16 != 0: auto falls back


def test_int4_weight_bytes_are_half_a_byte_per_weight():
    layer = Int4WeightOnlyLinear(torch.nn.Linear(512, 64, bias=False), 128)
    assert layer.weight_packed.numel() == 512 * 64 // 2
    assert ql.eval.model_nbytes(layer) == 512 * 64 // 2 + (512 // 128) * 64 * 2 * 4  # codes + fp32 scale and zero


def test_errors_teach():
    lin = torch.nn.Linear(96, 32)
    with pytest.raises(ValueError, match="group_size=64 must divide in_features=96"):
        Int4WeightOnlyLinear(lin, 64)
    with pytest.raises(ValueError, match="PerChannel\\(0\\) or ql.PerTensor"):
        QuantLinear.from_float(lin, granularity_w=ql.PerGroup(32))
    with pytest.raises(ValueError, match="static activations are quantized per tensor"):
        QuantLinear.from_float(lin, act_qparams=(torch.tensor(0.1), torch.tensor(0)), act_granularity=ql.PerToken())
    with pytest.raises(ValueError, match="per tensor"):
        QuantLinear.from_float(lin, act_qparams=(torch.ones(4), torch.zeros(4, dtype=torch.int32)))
    with pytest.raises(ValueError, match="groups=1"):
        QuantConv2d.from_float(torch.nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="tinygemm int4 kernel needs"):
        Int4WeightOnlyLinear(torch.nn.Linear(64, 40), 32, layout="tinygemm")


def test_static_qparams_accept_an_observer():
    class Observer:  # the protocol: __call__(x) records, calculate_qparams() answers
        def __call__(self, x):
            return x

        def calculate_qparams(self):
            return torch.tensor([0.05]), torch.tensor([0], dtype=torch.int32)

    layer = QuantLinear.from_float(torch.nn.Linear(8, 4), act_qparams=Observer())
    assert layer.static and float(layer.act_scale) == pytest.approx(0.05) and layer.act_scale.shape == ()


@cuda
def test_quant_linear_on_cuda_matches_cpu():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(32, 64)
    layer = QuantLinear.from_float(lin)
    y_cpu = layer(x)
    with kernels.trace() as ran:
        y_gpu = layer.cuda()(x.cuda())
    assert ran == [kernels.INT_MM_CUDA]
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
