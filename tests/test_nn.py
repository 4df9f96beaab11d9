"""qlab.nn: quantized layers against float math on their own dequantized operands (the oracle)."""

import pytest
import torch
import torch.nn.functional as F

import qlab as ql
from qlab import kernels
from qlab.kernels import reference
from qlab.nn import Int4WeightOnlyLinear, Int8WeightOnlyLinear, QuantConv2d, QuantLinear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def dequantized_input(layer, x):
    """x as the layer sees it: (codes - zero_point) * scale, in float64."""
    x2 = x.reshape(-1, x.shape[-1])
    q, s, z = reference.quantize_activations(x2, layer.act)
    return ((q.double() - z.double()) * s.double()).reshape(x.shape)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # dynamic, per token, symmetric int8
        dict(act_granularity=ql.PerTensor()),
        dict(act_symmetric=False),  # uint8 codes: shift by 128 + zero-point correction
        dict(weight_granularity=ql.PerTensor()),
        dict(act_qparams=(torch.tensor(0.03), torch.tensor(0))),  # static
        dict(act_qparams=(torch.tensor(0.03), torch.tensor(131)), act_symmetric=False),
    ],
)
def test_quant_linear_equals_float_matmul_of_dequantized_operands(kwargs):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    x = torch.randn(2, 5, 64)
    layer = QuantLinear.from_float(lin, **kwargs)
    with kernels.disable(kernels.cpu.FBGEMM), kernels.trace() as ran:
        y = layer(x)
    assert len(ran) == 1 and ran[0] in (kernels.INT_MM_CPU, kernels.REFERENCE)  # exact integer kernels
    expected = dequantized_input(layer, x) @ layer.dequantize_weight().double().t() + lin.bias.double()
    assert y.shape == (2, 5, 24)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)  # fp32 rounding of the rescale only
    assert (y - lin(x)).abs().max() < 0.05  # and close to the float layer


def test_integer_accumulator_is_the_exact_sum_over_codes():
    """acc[m, n] = sum_k (x_q - z) * w_q, checked one product at a time on a tiny asymmetric case."""
    torch.manual_seed(1)
    layer = QuantLinear.from_float(torch.nn.Linear(6, 3), act_symmetric=False)
    x = torch.rand(4, 6) * 3 - 0.5
    q, _, z = reference.quantize_activations(x, layer.act)
    acc = kernels.int_mm(q, layer.weight_q.t()) - z * layer.weight_q.sum(1, dtype=torch.int32)
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
    with kernels.disable(kernels.cpu.FBGEMM), kernels.trace() as ran:
        y = layer(x)
    assert len(ran) == 1 and ran[0] != kernels.cpu.FBGEMM
    w = layer.dequantize_weight().double()  # (O, C*kh*kw)
    expected = (dequantized_input(layer, patches) @ w.t() + conv.bias.double()).transpose(1, 2).reshape(y.shape)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert y.shape == conv(x).shape and (y - conv(x)).abs().max() < 0.05


def naive_group_quantize(w: torch.Tensor, group_size: int, symmetric: bool) -> torch.Tensor:
    """The spec of group-wise 4-bit weights, one group at a time in Python floats: W_hat (N, K)."""
    w_hat = torch.empty_like(w, dtype=torch.float64)
    for n in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group_size):
            vals = w[n, g0:g0 + group_size].tolist()
            if symmetric:  # int4 in [-7, 7], zero point 0
                s = max(abs(v) for v in vals) / 7
                codes = [max(-7, min(7, round(float(torch.tensor(v) / torch.tensor(s))))) for v in vals]
                w_hat[n, g0:g0 + group_size] = torch.tensor([c * float(torch.tensor(s)) for c in codes])
            else:  # uint4 in [0, 15] over [min(lo, 0), max(hi, 0)]
                lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
                s = float(torch.tensor((hi - lo) / 15, dtype=torch.float32))
                z = min(15, max(0, round(-lo / s)))
                codes = [max(0, min(15, round(float(torch.tensor(v) / torch.tensor(s)) + z))) for v in vals]
                w_hat[n, g0:g0 + group_size] = torch.tensor([(c - z) * s for c in codes])
    return w_hat


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_weight_only_matches_the_spec_on_every_kernel(symmetric):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 32)
    layer = Int4WeightOnlyLinear.from_float(lin, group_size=32, symmetric=symmetric)
    w_hat = naive_group_quantize(lin.weight.detach(), 32, symmetric)
    torch.testing.assert_close(layer.dequantize_weight().double(), w_hat, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 128)
    expected = x.double() @ w_hat.t() + lin.bias.double()
    with kernels.trace() as ran:
        fast = layer(x)
    with kernels.disable(*kernels.fast_only()):
        plain = layer(x)
    assert ran == [kernels.cpu.INT4PACK]
    torch.testing.assert_close(plain.double(), expected, rtol=1e-5, atol=1e-5)
    assert float((fast.double() - expected).norm() / expected.norm()) < 1e-2  # bf16 activations in the kernel


def test_int8_weight_only_matches_the_spec():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    w = lin.weight.detach()
    s = w.abs().amax(1, keepdim=True) / 127
    w_hat = (torch.round(w / s).clamp(-127, 127) * s).double()  # per output channel, written out
    layer = Int8WeightOnlyLinear.from_float(lin)
    torch.testing.assert_close(layer.dequantize_weight().double(), w_hat)
    x = torch.randn(5, 64)
    expected = x.double() @ w_hat.t() + lin.bias.double()
    with kernels.trace() as ran:
        y = layer(x)
    bound = next(k.tolerance for k in kernels.registered("linear_weight_only") if k.name == ran[0])
    assert float((y.double() - expected).norm() / expected.norm()) <= max(bound, 1e-6), ran
    with kernels.disable(*kernels.fast_only()):
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_int4_weight_bytes_are_half_a_byte_per_weight():
    layer = Int4WeightOnlyLinear.from_float(torch.nn.Linear(512, 64, bias=False), 128)
    assert layer.weight_qdata.numel() == 512 * 64 // 2
    assert ql.eval.model_nbytes(layer) == 512 * 64 // 2 + (512 // 128) * 64 * (4 + 4)  # codes + fp32 scale, int32 zero


MODULES = {
    "w8a8 dynamic": lambda lin: QuantLinear.from_float(lin),
    "w8a8 static": lambda lin: QuantLinear.from_float(lin, act_qparams=(torch.tensor(0.03), torch.tensor(0))),
    "int8 weight-only": lambda lin: Int8WeightOnlyLinear.from_float(lin),
    "int4 weight-only": lambda lin: Int4WeightOnlyLinear.from_float(lin, 64),
}


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_state_dict_is_portable_between_kernels(kind, tmp_path):
    """Saved on the fast path, loaded with the fast paths disabled (and the other way round): same outputs,
    same keys and shapes, and no kernel layout in the file."""
    torch.manual_seed(0)
    x = torch.randn(4, 256)
    fast = MODULES[kind](torch.nn.Linear(256, 64))
    with kernels.trace() as ran:
        y_fast = fast(x)
    assert ran and ran[0] != kernels.REFERENCE
    torch.save(fast.state_dict(), tmp_path / "fast.pt")
    with kernels.disable(*kernels.fast_only()):
        plain = MODULES[kind](torch.nn.Linear(256, 64))  # different random weights until loaded
        plain.load_state_dict(torch.load(tmp_path / "fast.pt"))
        y_plain = plain(x)
        torch.save(plain.state_dict(), tmp_path / "plain.pt")
    tol = max(k.tolerance for k in kernels.registered("linear_w8a8" if "w8a8" in kind else "linear_weight_only"))
    assert float((y_fast - y_plain).norm() / y_plain.norm()) <= tol
    again = MODULES[kind](torch.nn.Linear(256, 64))
    again(x)  # derive a kernel layout for the old weights ...
    again.load_state_dict(torch.load(tmp_path / "plain.pt"))  # ... which loading must drop
    torch.testing.assert_close(again(x), y_fast)
    saved = torch.load(tmp_path / "fast.pt")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in torch.load(tmp_path / "plain.pt").items()}


def test_modules_are_built_from_codes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    qt = ql.quantize_tensor(lin.weight.detach(), ql.int8, ql.PerChannel(0))
    x = torch.randn(3, 64)
    torch.testing.assert_close(QuantLinear.from_qtensor(qt, lin.bias)(x), QuantLinear.from_float(lin)(x))
    qt4 = ql.quantize_tensor(lin.weight.detach(), ql.uint4, ql.PerGroup(32), symmetric=False)
    torch.testing.assert_close(Int4WeightOnlyLinear.from_qtensor(qt4, lin.bias)(x),
                               Int4WeightOnlyLinear.from_float(lin, 32)(x))
    with pytest.raises(ValueError, match="built from a QTensor"):
        QuantLinear(lin.weight)


def test_copies_and_repr():
    import copy

    layer = Int8WeightOnlyLinear.from_float(torch.nn.Linear(64, 16), ql.PerTensor())
    assert "PerTensor" in repr(layer)  # the stored granularity, not a fixed string
    x = torch.randn(2, 64)
    y = layer(x)
    twin = copy.deepcopy(layer)  # the kernel cache is dropped, not copied
    assert len(twin._kernel_cache) == 0
    torch.testing.assert_close(twin(x), y)


def test_errors_teach():
    lin = torch.nn.Linear(96, 32)
    with pytest.raises(ValueError, match="group_size=64 must divide in_features=96"):
        Int4WeightOnlyLinear.from_float(lin, 64)
    with pytest.raises(ValueError, match="PerChannel\\(0\\) or ql.PerTensor"):
        QuantLinear.from_float(lin, weight_granularity=ql.PerGroup(32))
    with pytest.raises(ValueError, match="static activations are quantized per tensor"):
        QuantLinear.from_float(lin, act_qparams=(torch.tensor(0.1), torch.tensor(0)), act_granularity=ql.PerToken())
    with pytest.raises(ValueError, match="per tensor"):
        QuantLinear.from_float(lin, act_qparams=(torch.ones(4), torch.zeros(4, dtype=torch.int32)))
    with pytest.raises(ValueError, match="groups=1"):
        QuantConv2d.from_float(torch.nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="act_symmetric=False contradicts act_qtype=ql.int8"):
        QuantLinear.from_float(lin, act_symmetric=False, act_qtype=ql.int8)


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
