"""qlab.fp8 against torch's own FP8 casts and torch._scaled_mm, float64 arithmetic and hand-computed cases.

Oracles: `x.clamp(-max, max).to(torch.float8_*)` (bit for bit), ql.FORMATS' specs of the formats (max, min
normal), float64 matmuls of the exact dequantized values, torch._scaled_mm where this torch runs it, and a
delayed-scaling example worked out by hand with powers of two.
"""

import math

import pytest
import torch
from torch import nn

import qlab as ql
from qlab import fp8, kernels

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
cuda_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                              reason="needs a CUDA GPU with FP8 tensor cores (sm_89 or newer)")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def oracle(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """The spec: scale, clamp to the format's range, then torch's own round-to-nearest cast."""
    m = torch.finfo(dtype).max
    return (x * scale).clamp(-m, m).to(dtype)


# ----------------------------------------------------------------------------- formats and scales
def test_formats_are_the_papers():
    assert fp8.FORMATS["e4m3"] is E4M3 and fp8.FORMATS["e5m2"] is E5M2
    assert fp8.fp8_max("e4m3") == 448.0 == ql.FORMATS["fp8_e4m3"].max_finite
    assert fp8.fp8_max("e5m2") == 57344.0 == ql.FORMATS["fp8_e5m2"].max_finite


def test_amax_to_scale_is_transformer_engines_rule():
    assert fp8.amax_to_scale(torch.tensor(2.0), "e4m3").item() == 224.0  # 448 / 2
    assert fp8.amax_to_scale(torch.tensor(2.0), "e4m3", margin=2).item() == 56.0  # 448 / 2 / 2^2
    assert fp8.amax_to_scale(torch.tensor(7.0), "e5m2").item() == 8192.0  # 57344 / 7
    rows = fp8.amax_to_scale(torch.tensor([[1.75], [3.5]]), "e4m3")
    assert rows.shape == (2, 1) and rows.flatten().tolist() == [256.0, 128.0]
    # amax 0, Inf, NaN: the fallback, 1.0 unless given (TE keeps its previous scale)
    bad = torch.tensor([0.0, math.inf, math.nan])
    assert fp8.amax_to_scale(bad, "e4m3").tolist() == [1.0, 1.0, 1.0]
    assert fp8.amax_to_scale(bad, "e4m3", fallback=torch.tensor(3.0)).tolist() == [3.0, 3.0, 3.0]
    tiny = fp8.amax_to_scale(torch.tensor(1e-45), "e4m3")  # 448 / 1e-45 overflows float32
    assert torch.isfinite(tiny) and tiny.item() == torch.finfo(torch.float32).max


# ----------------------------------------------------------------------------- quantize / dequantize
@pytest.mark.parametrize("fmt,dtype", [("e4m3", E4M3), ("e5m2", E5M2)])
def test_quantize_is_torchs_cast_of_the_clamped_scaled_tensor(fmt, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g) * torch.logspace(-3, 2, 64)  # many binades, uneven columns
    m = torch.finfo(dtype).max
    x8, inv = fp8.quantize(x, fmt)
    s = m / x.abs().amax()
    assert x8.dtype == dtype and inv.shape == () and inv.item() == (1 / s).item()
    assert torch.equal(bits(x8), bits(oracle(x, dtype, s)))
    assert x8.float().abs().max().item() == m  # the amax lands on the format's max
    for granularity, s in [(ql.PerToken(), m / x.abs().amax(1, keepdim=True)),  # (16, 1)
                           (ql.PerChannel(0), m / x.abs().amax(1, keepdim=True)),  # a weight's output rows
                           (ql.PerChannel(1), m / x.abs().amax(0, keepdim=True))]:  # (1, 64)
        x8, inv = fp8.quantize(x, fmt, granularity)
        assert inv.shape == s.shape and torch.equal(inv, 1 / s)
        assert torch.equal(bits(x8), bits(oracle(x, dtype, s)))
    x8, inv = fp8.quantize(x.bfloat16(), fmt, scale=torch.tensor(3.0))  # a given scale is used as is
    assert torch.equal(bits(x8), bits(oracle(x.bfloat16().float(), dtype, torch.tensor(3.0))))
    assert inv.item() == (1 / torch.tensor(3.0)).item()


def test_row_wise_scales_one_per_row():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * torch.tensor([[1.0], [10.0], [100.0], [1e5]])
    x8, inv = fp8.quantize(x, "e4m3", ql.PerToken())
    assert inv.shape == (4, 1)
    torch.testing.assert_close(inv, x.abs().amax(1, keepdim=True) / 448, rtol=1e-6, atol=0)
    assert x8.float().abs().amax(1).tolist() == [448.0] * 4  # every row uses the whole range
    rel = lambda x_hat: float(((x_hat - x).abs() / x.abs())[0].mean())  # noqa: E731  (row 0, the smallest)
    assert rel(fp8.dequantize(x8, inv)) < 2**-4
    x8_t, inv_t = fp8.quantize(x, "e4m3")  # one scale for all: row 0 falls below the subnormals, to 0
    assert rel(fp8.dequantize(x8_t, inv_t)) > 0.5


def test_overflow_saturates_in_both_formats():
    one = torch.tensor(1.0)
    x = torch.tensor([500.0, -1000.0, 61440.0, 1e6, -1e6])
    x8, _ = fp8.quantize(x, "e4m3", scale=one)
    assert x8.float().tolist() == [448.0, -448.0, 448.0, 448.0, -448.0]
    x8, _ = fp8.quantize(x, "e5m2", scale=one)
    assert x8.float().tolist() == [512.0, -1024.0, 57344.0, 57344.0, -57344.0]
    # torch's own cast without the clamp (torch 2.13): e5m2 overflows to inf, e4m3fn saturates (<= 2.11: NaN)
    raw = x.to(E5M2).float()
    assert raw[2:].isinf().all() and raw[:2].tolist() == [512.0, -1024.0]
    assert x.to(E4M3).float().tolist() == [448.0, -448.0, 448.0, 448.0, -448.0]


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_nan_stays_nan_and_inf_clamps_to_max(fmt):
    m = fp8.fp8_max(fmt)
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.5])
    for scale in (torch.tensor(1.0), None):  # None: amax is NaN, so the scale falls back to 1
        x8, inv = fp8.quantize(x, fmt, scale=scale)
        y = x8.float()
        assert math.isnan(y[0]) and y[1:].tolist() == [m, -m, 1.5] and inv.item() == 1.0


def test_amax_zero_gives_a_finite_scale_and_zeros():
    x8, inv = fp8.quantize(torch.zeros(3, 8), "e4m3")
    assert inv.item() == 1.0 and not x8.float().any()
    assert not fp8.dequantize(x8, inv).any()
    x = torch.cat([torch.zeros(1, 8), torch.full((1, 8), 2.0)])  # one zero row among others
    x8, inv = fp8.quantize(x, "e4m3", ql.PerToken())
    assert inv.flatten().tolist() == pytest.approx([1.0, 2.0 / 448], rel=1e-7)
    torch.testing.assert_close(fp8.dequantize(x8, inv), x, rtol=1e-7, atol=0)


@pytest.mark.parametrize("fmt,bound", [("e4m3", 2**-4), ("e5m2", 2**-3)])
def test_dequantize_relative_error_is_half_an_ulp(fmt, bound):
    """m mantissa bits: rounding to nearest errs by at most 2^-(m+1) relative, for values in the normal range."""
    spec = ql.FORMATS["fp8_" + fmt]
    g = torch.Generator().manual_seed(2)
    x = torch.exp(torch.empty(4096).uniform_(-8, 8, generator=g)) * torch.sign(torch.randn(4096, generator=g))
    x8, inv = fp8.quantize(x, fmt)
    x_hat = fp8.dequantize(x8, inv)
    assert x_hat.dtype == torch.float32
    normal = (x * (1 / inv)).abs() >= spec.min_normal
    rel = ((x_hat - x).abs() / x.abs())[normal]
    assert normal.sum() > 2000 and rel.max() <= bound + 1e-6  # 1e-6: float32 rounding of x * scale, 1 / scale
    assert rel.max() > bound / 2  # the bound is reached: it is the format's, not a loose one


# ----------------------------------------------------------------------------- the scaled matmul
def operands(M, K, N, dtype_a=E4M3, dtype_b=E4M3, rowwise=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g) * 3
    w = torch.randn(N, K, generator=g)
    ga, gw = (ql.PerToken(), ql.PerChannel(0)) if rowwise else (ql.PerTensor(), ql.PerTensor())
    a8, sa = fp8.quantize(a, "e4m3" if dtype_a == E4M3 else "e5m2", ga)
    w8, sw = fp8.quantize(w, "e4m3" if dtype_b == E4M3 else "e5m2", gw)
    return a8, w8.t(), sa, sw.t()  # (M, K), (K, N) column-major, () / (M, 1), () / (1, N)


@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize("dtypes", [(E4M3, E4M3), (E5M2, E5M2), (E4M3, E5M2)])
def test_scaled_mm_against_float64(rowwise, dtypes):
    """float64 sums of the exact dequantized values; the emulation differs by its float32 accumulation only."""
    for M, K, N in [(1, 8, 8), (3, 5, 7), (17, 64, 48), (32, 512, 16)]:
        a8, b8, sa, sb = operands(M, K, N, *dtypes, rowwise=rowwise, seed=M + K)
        y = fp8.scaled_mm(a8, b8, sa, sb)
        A, B = a8.double() * sa.double(), b8.double() * sb.double()  # exact products in float64
        ref = A @ B
        bound = K * 2**-24 * (A.abs() @ B.abs()) + 2**-22 * ref.abs()
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert ((y.double() - ref).abs() <= bound).all()
    bias = torch.randn(N)
    y16 = fp8.scaled_mm(a8, b8, sa, sb, out_dtype=torch.bfloat16, bias=bias)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, (fp8.scaled_mm(a8, b8, sa, sb) + bias).bfloat16())


def test_scaled_mm_exact_by_hand():
    a8 = torch.tensor([[1.0, 2.0], [-0.5, 448.0]]).to(E4M3)
    b8 = torch.tensor([[3.0, 0.25], [1.5, -4.0]]).to(E4M3)
    y = fp8.scaled_mm(a8, b8, torch.tensor([[0.5], [2.0]]), torch.tensor([[1.0, 0.125]]))
    assert y.tolist() == [[3.0, -0.484375], [1341.0, -448.03125]]


requires_cpu_scaled_mm = pytest.mark.skipif(
    not fp8.torch_scaled_mm_works("cpu", E4M3, E4M3, True),
    reason="this torch has no CPU torch._scaled_mm for float8")


@requires_cpu_scaled_mm
@pytest.mark.parametrize("rowwise", [False, True])
def test_emulation_agrees_with_torch_scaled_mm_on_cpu(rowwise):
    """torch 2.13's CPU kernel scales the operands first, (a * sa) @ (b * sb) in float32; the emulation scales the
    exact float32 sums once. They differ by float32 rounding only: 1e-6 relative (measured <= 3e-7 up to K = 4096)."""
    for M, K, N in [(1, 8, 8), (3, 5, 7), (17, 64, 48), (64, 1024, 32)]:
        a8, b8, sa, sb = operands(M, K, N, rowwise=rowwise, seed=K)
        got = torch._scaled_mm(a8, b8, scale_a=sa.expand(M, 1).contiguous() if rowwise else sa,
                               scale_b=sb.expand(1, N).contiguous() if rowwise else sb, out_dtype=torch.float32)
        scaled_first = (a8.float() * sa) @ (b8.float() * sb)
        assert float((got - scaled_first).norm() / got.norm()) <= 1e-6
        y = fp8.scaled_mm(a8, b8, sa, sb)
        assert float((y - got).norm() / got.norm()) <= 1e-6
        bias = torch.randn(N)
        fast = next(k for k in kernels.registered("scaled_mm") if k.name == fp8.TORCH_SCALED_MM_CPU)
        y_fast = kernels.run(fast, a8, b8, sa, sb, torch.float32, bias)
        assert float((y_fast - (y + bias)).norm() / (y + bias).norm()) <= 1e-6


def scaled_mm_cases(device):
    """Operands for every kernel of "scaled_mm" (the same shape as tests/test_kernels.py's CASES)."""
    for M, K, N in [(1, 16, 16), (7, 64, 48), (40, 256, 32)]:
        for rowwise in (False, True):
            for dtypes in ((E4M3, E4M3), (E4M3, E5M2)):
                a8, b8, sa, sb = operands(M, K, N, *dtypes, rowwise=rowwise, seed=M)
                for out_dtype, bias in ((torch.float32, None), (torch.bfloat16, torch.randn(N))):
                    yield (a8.to(device), b8.to(device), sa.to(device), sb.to(device), out_dtype,
                           None if bias is None else bias.to(device))


def test_every_scaled_mm_kernel_is_within_its_tolerance_of_the_reference():
    ran = {k.name: 0 for k in kernels.registered("scaled_mm")}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for args in scaled_mm_cases(device):
            expected = fp8.scaled_mm(*args).double().cpu()
            for kernel in kernels.registered("scaled_mm"):
                if kernel.supports(*args):
                    got = kernel.fn(*args).double().cpu()
                    err = float((got - expected).norm() / expected.norm())
                    assert got.shape == expected.shape and err <= (kernel.tolerance or 1e-6), (kernel.name, err)
                    ran[kernel.name] += 1
    assert ran[kernels.REFERENCE] == 24 * (1 + torch.cuda.is_available())


def test_kernel_registry_runs_the_fast_path_where_it_works_and_the_reference_otherwise():
    ks = kernels.registered("scaled_mm")
    assert ks[-1].name == kernels.REFERENCE and ks[-1].priority == -100 and ks[-1].fn is fp8.scaled_mm
    layer = fp8.FP8Linear.from_float(nn.Linear(64, 32))
    x = torch.randn(5, 64)
    with kernels.trace() as ran:
        y = layer(x)
    cpu_works = fp8.torch_scaled_mm_works("cpu", E4M3, E4M3, False)
    assert ran == [fp8.TORCH_SCALED_MM_CPU if cpu_works else kernels.REFERENCE]
    with kernels.disable(fp8.TORCH_SCALED_MM_CPU, fp8.TORCH_SCALED_MM_CUDA), kernels.trace() as ran:
        y_ref = layer(x)
    assert ran == [kernels.REFERENCE] and float((y - y_ref).norm() / y_ref.norm()) <= 1e-6


@cuda_fp8
@pytest.mark.parametrize("rowwise", [False, True])
def test_torch_scaled_mm_on_cuda_agrees_with_the_reference(rowwise):
    a8, b8, sa, sb = operands(64, 128, 48, rowwise=rowwise)
    a8, b8, sa, sb = a8.cuda(), b8.cuda(), sa.cuda(), sb.cuda()
    kernel = kernels.choose("scaled_mm", a8, b8, sa, sb, torch.float32, None)
    assert kernel.name == fp8.TORCH_SCALED_MM_CUDA
    y, ref = kernel.fn(a8, b8, sa, sb, torch.float32, None), fp8.scaled_mm(a8, b8, sa, sb)
    assert float((y - ref).norm() / ref.norm()) <= kernel.tolerance


# ----------------------------------------------------------------------------- delayed scaling
def test_amax_history_rolls_keeps_the_max_and_lives_in_the_state_dict():
    h = fp8.AmaxHistory(history_len=3)
    assert set(h.state_dict()) == {"history", "scale"} and h.empty and h.scale.item() == 1.0
    for amax in (2.0, 8.0, 1.0):
        h.update(torch.tensor([-amax, amax / 2]))
    assert h.history.tolist() == [1.0, 8.0, 2.0]  # history[0] is the newest
    assert h.scale_for("e4m3").item() == 56.0 == h.scale.item()  # 448 / max(history) = 448 / 8
    h.update(torch.tensor([4.0]))  # 2 drops out, 8 is still in the window
    assert h.history.tolist() == [4.0, 1.0, 8.0] and h.scale_for("e4m3").item() == 56.0
    h.update(torch.tensor([0.5]))  # 8 drops out
    assert h.scale_for("e4m3", margin=1).item() == 56.0  # 448 / 4 / 2
    fresh = fp8.AmaxHistory(history_len=3)
    fresh.load_state_dict(h.state_dict())
    assert torch.equal(fresh.history, h.history) and fresh.scale.item() == 56.0
    zeros = fp8.AmaxHistory(2)
    zeros.scale.fill_(7.0)
    assert zeros.scale_for("e4m3").item() == 7.0  # amax 0: keep the previous scale, as TE does


def test_delayed_recipe_scales_with_the_previous_steps_amax():
    """W = 1.75 I and amaxes 1.75 * 2^k make every scale a power of two (448 = 1.75 * 2^8): exact arithmetic.
    step 1: empty history, current amax 1.75 -> scale 256: exact.
    step 2: amax 7 but history max 1.75 -> scale 256: 7 * 256 = 1792 clamps to 448 -> 1.75, so y = 1.75^2.
    step 3: history max 7 -> scale 64: exact again."""
    linear = nn.Linear(2, 2)
    with torch.no_grad():
        linear.weight.copy_(1.75 * torch.eye(2))
        linear.bias.zero_()
    layer = fp8.FP8Linear.from_float(linear, recipe="delayed", amax_history_len=4)
    assert layer(torch.tensor([[1.75, 0.875]])).tolist() == [[3.0625, 1.53125]]
    assert layer(torch.tensor([[7.0, 1.75]])).tolist() == [[3.0625, 3.0625]]  # clipped: delayed
    assert layer(torch.tensor([[7.0, 1.75]])).tolist() == [[12.25, 3.0625]]
    assert layer.act_amax.history.tolist() == [7.0, 7.0, 1.75, 0.0]
    tensorwise = fp8.FP8Linear.from_float(linear, recipe="tensorwise")
    assert tensorwise(torch.tensor([[7.0, 1.75]])).tolist() == [[12.25, 3.0625]]  # current scaling: no clipping


# ----------------------------------------------------------------------------- the layer and the config
SCALED = ("tensorwise", "rowwise", "delayed")


@pytest.mark.parametrize("recipe", SCALED)
def test_fp8_linear_shapes_state_dict_and_accuracy(recipe):
    g = torch.Generator().manual_seed(3)
    linear = nn.Linear(64, 48)
    x = torch.randn(2, 5, 64, generator=g)
    layer = fp8.FP8Linear.from_float(linear, "e4m3", recipe)
    assert layer.weight_fp8.dtype == E4M3 and layer.weight_fp8.shape == (48, 64) and layer.bias.dtype == torch.float32
    assert layer.weight_scale.shape == ((48, 1) if recipe == "rowwise" else ())
    y = layer(x)
    ref = linear(x).detach()
    assert y.shape == (2, 5, 48) and float((y - ref).pow(2).mean() / ref.pow(2).mean()) < 5e-3
    fresh = fp8.FP8Linear.from_float(nn.Linear(64, 48), "e4m3", recipe)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    assert "recipe=" + recipe in repr(layer)


@pytest.mark.parametrize("recipe", SCALED)
def test_fp8_config_keeps_tiny_gpt_close(recipe):
    model = ql.models.tiny_gpt().eval()
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)
        ql.quantize_(model, fp8.FP8Config(recipe=recipe, include=("blocks.*",)))
        assert isinstance(model.blocks[0].mlp.c_fc, fp8.FP8Linear) and type(model.lm_head) is nn.Linear
        for _ in range(2 if recipe == "delayed" else 1):  # delayed: first the current amax, then the history's
            out = model(tokens)
            assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 1e-2
    with pytest.raises(ValueError, match="already quantized"):
        ql.quantize_(model, fp8.FP8Config(include=("blocks.0.mlp.c_fc",)))


def test_unscaled_recipe_is_a_plain_cast_and_loses_small_weights():
    """The paper's section 4.3 baseline: no scale, the codes are torch's own cast of the (clamped) values."""
    linear = nn.Linear(256, 64)
    layer = fp8.FP8Linear.from_float(linear, "e4m3", "unscaled")
    assert torch.equal(layer.weight_fp8.view(torch.uint8), linear.weight.detach().clamp(-448, 448).to(E4M3).view(torch.uint8))
    assert float(layer.weight_scale) == 1.0
    x = torch.randn(3, 256)
    y8 = linear(x).detach()
    x8 = x.clamp(-448, 448).to(E4M3).float()
    expected = x8 @ layer.weight_fp8.float().t() + linear.bias.detach()
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    # weights in E4M3's normal range lose little without a scale; tiny weights and huge activations do not survive
    with torch.no_grad():
        linear.weight.mul_(0.01)  # |w| < 6.3e-4: below half of E4M3's smallest subnormal (2^-9) they flush to 0
    small = {r: fp8.FP8Linear.from_float(linear, "e4m3", r) for r in ("unscaled", "tensorwise")}
    assert float((small["unscaled"].weight_fp8.float() == 0).float().mean()) > 0.4
    y = linear(x * 1000).detach()  # activations up to ~4000 saturate at 448 without a scale
    err = {r: float((m(x * 1000) - y).pow(2).mean() / y.pow(2).mean()) for r, m in small.items()}
    assert err["unscaled"] > 0.3 and err["tensorwise"] < 1e-2, err


def test_errors_teach():
    with pytest.raises(ValueError, match="fmt='e3m4' is not an FP8 format; use 'e4m3'"):
        fp8.FP8Config(fmt="e3m4")
    with pytest.raises(ValueError, match="recipe='blockwise' is not an FP8 recipe"):
        fp8.FP8Config(recipe="blockwise")
    with pytest.raises(ValueError, match="amax_history_len=0 must be a positive integer"):
        fp8.FP8Config(amax_history_len=0)
    with pytest.raises(ValueError, match="margin=-1 must be an integer >= 0"):
        fp8.FP8Config(margin=-1)
    with pytest.raises(ValueError, match="history_len=0"):
        fp8.AmaxHistory(0)
    with pytest.raises(ValueError, match="quantize takes a float32.*got torch.int64"):
        fp8.quantize(torch.arange(4))
    with pytest.raises(ValueError, match="got torch.float8_e4m3fn"):
        fp8.quantize(torch.ones(4).to(E4M3))
    with pytest.raises(ValueError, match="fmt='e3m4'"):
        fp8.quantize(torch.ones(4), "e3m4")
    with pytest.raises(ValueError, match="granularity=PerGroup.*ql.PerToken"):
        fp8.quantize(torch.ones(4, 8), "e4m3", ql.PerGroup(4))
    with pytest.raises(ValueError, match="dequantize takes FP8 codes"):
        fp8.dequantize(torch.ones(4), torch.tensor(1.0))
    a8, b8 = torch.ones(3, 4).to(E4M3), torch.ones(5, 2).to(E4M3)
    with pytest.raises(ValueError, match=r"a8 \(M, K\) and b8 \(K, N\); got shapes \(3, 4\) and \(5, 2\)"):
        fp8.scaled_mm(a8, b8, torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"scale_b must be .* \(1, 2\) \(per row\), got \(2,\)"):
        fp8.scaled_mm(a8, b8[:4], torch.tensor(1.0), torch.ones(2))
    with pytest.raises(ValueError, match="scaled_mm multiplies FP8 codes"):
        fp8.scaled_mm(torch.ones(3, 4), b8[:4], torch.tensor(1.0), torch.tensor(1.0))
