"""qlab.kernels: the registry, every registered kernel against the pure-torch reference, the reference
against a naive loop, and the dispatch rules (device, row count, CPU capability, missing torch ops)."""

import pytest
import torch

import qlab as ql
from qlab.kernels import cuda as cuda_kernels
from qlab import kernels
from qlab.kernels import ActQuant, KernelCache, cpu, native, reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def naive_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Python integers, one multiply-add at a time."""
    M, K = a.shape
    N = b.shape[1]
    out = torch.zeros(M, N, dtype=torch.int64)
    for m in range(M):
        for n in range(N):
            out[m, n] = sum(int(a[m, k]) * int(b[k, n]) for k in range(K))
    return out


def test_reference_int_mm_is_exact_against_naive_loop():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (3, 7), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (7, 5), generator=g, dtype=torch.int8)
    a[0] = -128  # the extreme codes: (-128)(-128) * 7 = 114688
    b[:, 0] = -128
    assert torch.equal(reference.int_mm(a, b).long(), naive_int_mm(a, b))


def naive_w8a8(x, w_q, w_scale, qmax):
    """The spec of per-token symmetric W8A8, written out: s_x = absmax / qmax per row, codes clamp to
    [-qmax, qmax], exact integer dot products in Python, then s_x * s_w * acc."""
    out = torch.zeros(x.shape[0], w_q.shape[0], dtype=torch.float64)
    for m in range(x.shape[0]):
        s = float(x[m].abs().max()) / qmax
        q = [max(-qmax, min(qmax, round(v))) for v in (x[m] / torch.tensor(s, dtype=torch.float32)).tolist()]
        for n in range(w_q.shape[0]):
            acc = sum(qi * int(wi) for qi, wi in zip(q, w_q[n].tolist()))
            out[m, n] = s * float(w_scale[n]) * acc
    return out


def test_reference_w8a8_matches_the_written_out_spec():
    g = torch.Generator().manual_seed(3)
    x, w_q = torch.randn(3, 16, generator=g), torch.randint(-127, 128, (5, 16), generator=g, dtype=torch.int8)
    w_scale = torch.rand(5, generator=g) / 50
    y = reference.linear_w8a8(x, w_q, w_scale, ActQuant(ql.int8, ql.PerToken()))
    torch.testing.assert_close(y.double(), naive_w8a8(x, w_q, w_scale, 127), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- every kernel vs the reference
def w8a8_cases(device):
    g = torch.Generator().manual_seed(0)
    K, N = 256, 48
    w = torch.randn(N, K, generator=g)
    w_scale = w.abs().amax(1) / 127
    w_q = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    for M in (1, 7, 40):
        x = torch.randn(M, K, generator=g) * torch.linspace(0.2, 3, K)  # uneven channels
        for act in (ActQuant(ql.int8, ql.PerToken()), ActQuant(ql.int8, ql.PerTensor()),
                    ActQuant(ql.qtype(7), ql.PerToken()),  # reduce_range
                    ActQuant(ql.int8, ql.PerTensor(), torch.tensor(0.02), torch.tensor(0, dtype=torch.int32)),
                    ActQuant(ql.uint8, ql.PerTensor(), torch.tensor(0.03), torch.tensor(120, dtype=torch.int32)),
                    ActQuant(ql.qtype(7, signed=False), ql.PerTensor(), torch.tensor(0.06), torch.tensor(60, dtype=torch.int32))):
            yield (x.to(device), w_q.to(device), w_scale.to(device), act._replace(
                scale=None if act.scale is None else act.scale.to(device),
                zero_point=None if act.zero_point is None else act.zero_point.to(device)), KernelCache())


def weight_only_cases(device):
    g = torch.Generator().manual_seed(1)
    N, K = 64, 256
    w = torch.randn(N, K, generator=g)
    qts = [ql.quantize_tensor(w, ql.int8, ql.PerChannel(0)), ql.quantize_tensor(w, ql.int8, ql.PerTensor()),
           ql.quantize_tensor(w, ql.uint4, ql.PerGroup(64), symmetric=False),
           ql.quantize_tensor(w, ql.int4, ql.PerGroup(32), symmetric=True),
           ql.quantize_tensor(w, ql.int2, ql.PerGroup(128), symmetric=True)]
    for M in (1, 16, 64):
        x = torch.randn(M, K, generator=g)
        for qt in qts:
            yield x.to(device), qt.to(device), KernelCache()


def int_mm_cases(device):
    for M, K, N in [(1, 8, 8), (3, 5, 7), (17, 64, 48), (64, 1024, 32)]:
        g = torch.Generator().manual_seed(M + K + N)
        a = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
        w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
        yield a.to(device), w.t().to(device)


def four_bit_cases(device):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 256, generator=g)
    ts = [ql.nf4.quantize_4bit(w, "nf4", 64), ql.nf4.quantize_4bit(w, "nf4", 64, double_quant=True),
          ql.nf4.quantize_4bit(w, "fp4", 128)]
    for M in (1, 16):
        x = torch.randn(M, 256, generator=g)
        for t in ts:
            yield x.to(device), t.to(device), KernelCache()


def scaled_mm_cases(device):
    from test_fp8 import scaled_mm_cases as cases  # FP8 operands, written next to qlab.fp8's own tests

    yield from cases(device)


CASES = {"int_mm": int_mm_cases, "linear_w8a8": w8a8_cases, "linear_weight_only": weight_only_cases,
         "linear_4bit": four_bit_cases, "scaled_mm": scaled_mm_cases}


def test_every_op_has_cases_and_a_reference():
    assert set(kernels.ops()) == set(CASES)
    for op in kernels.ops():
        assert kernels.registered(op)[-1].name == kernels.REFERENCE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", sorted(CASES))
def test_every_registered_kernel_agrees_with_the_reference(op, device):
    """Each kernel, on every case it accepts, is within its declared tolerance of the reference
    (tolerance 0: the very same integers / floats up to fp32 rounding)."""
    ref = kernels.registered(op)[-1]
    ran = {k.name: 0 for k in kernels.registered(op)}
    for args in CASES[op](device):
        expected = ref.fn(*args).double().cpu()
        for kernel in kernels.registered(op):
            if not kernel.supports(*args):
                continue
            got = kernel.fn(*args).double().cpu()
            assert got.shape == expected.shape, kernel.name
            err = float((got - expected).norm() / expected.norm().clamp(min=1e-12))
            bound = kernel.tolerance if kernel.tolerance else 1e-6
            assert err <= bound, (kernel.name, op, args[0].shape, err)
            ran[kernel.name] += 1
    assert ran[kernels.REFERENCE] > 0
    print(op, device, ran)


def test_int_mm_kernels_are_bit_exact():
    for a, b in int_mm_cases("cpu"):
        for kernel in kernels.registered("int_mm"):
            if kernel.supports(a, b):
                assert torch.equal(kernel.fn(a, b), reference.int_mm(a, b)), kernel.name


def test_int_mm_rejects_wrong_operands():
    with pytest.raises(ValueError, match="int8 codes"):
        kernels.int_mm(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(M, K\) and b \(K, N\)"):
        kernels.int_mm(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.int8))


# ----------------------------------------------------------------------------- dispatch rules
def test_int_mm_is_chosen_only_with_int8_dot_product_instructions(monkeypatch):
    a = torch.ones(2, 8, dtype=torch.int8)
    monkeypatch.setattr(cpu, "has_int8_dot", lambda: False)  # an AVX2 CPU: _int_mm is a scalar loop there
    assert kernels.choose("int_mm", a, a.t()).name == kernels.REFERENCE
    monkeypatch.setattr(cpu, "has_int8_dot", lambda: True)
    assert kernels.choose("int_mm", a, a.t()).name == kernels.INT_MM_CPU


def test_fbgemm_needs_7_bit_activations_without_int8_dot(monkeypatch):
    x, w_q, w_scale = torch.randn(2, 64), torch.ones(8, 64, dtype=torch.int8), torch.ones(8)
    monkeypatch.setattr(cpu, "has_int8_dot", lambda: False)
    eight, seven = ActQuant(ql.int8, ql.PerToken()), ActQuant(ql.qtype(7), ql.PerToken())
    assert kernels.choose("linear_w8a8", x, w_q, w_scale, eight, KernelCache()).name == kernels.REFERENCE
    assert kernels.choose("linear_w8a8", x, w_q, w_scale, seven, KernelCache()).name == cpu.FBGEMM


def test_a_torch_without_quantized_ops_falls_back_cleanly(monkeypatch):
    """Where torch.ops.quantized is gone (torch deprecates torch.ao), W8A8 still runs, on the next kernel."""
    monkeypatch.setattr(cpu, "has_quantized_op", lambda name: False)
    layer = ql.QuantLinear.from_float(torch.nn.Linear(64, 16))
    x = torch.randn(3, 64)
    with kernels.trace() as ran:
        y = layer(x)
    assert cpu.FBGEMM not in ran and ran and ran[0] in (kernels.INT_MM_CPU, kernels.REFERENCE)
    with kernels.disable(*kernels.fast_only()):
        torch.testing.assert_close(y, layer(x))


def test_weight_only_kernels_are_chosen_by_layout_and_device():
    qt = ql.quantize_tensor(torch.randn(64, 256), ql.uint4, ql.PerGroup(64), symmetric=False)
    assert kernels.choose("linear_weight_only", torch.randn(1, 256), qt, KernelCache()).name == cpu.INT4PACK
    many = kernels.choose("linear_weight_only", torch.randn(300, 256), qt, KernelCache()).name
    assert many == (native.DEQUANT_GEMM if native.available() else cpu.INT4PACK)  # the reference is slower at any M
    odd = ql.quantize_tensor(torch.randn(40, 256), ql.uint4, ql.PerGroup(64), symmetric=False)  # N % 16 != 0
    assert kernels.choose("linear_weight_only", torch.randn(2, 256), odd, KernelCache()).name == kernels.REFERENCE


def test_int4pack_layout_is_derived_once_and_never_saved():
    layer = ql.Int4WeightOnlyLinear.from_float(torch.nn.Linear(256, 64), group_size=64)
    x = torch.randn(2, 256)
    layer(x)
    assert (cpu.INT4PACK, "cpu") in layer._kernel_cache
    packed = layer._kernel_cache[(cpu.INT4PACK, "cpu")]
    layer(x)
    assert layer._kernel_cache[(cpu.INT4PACK, "cpu")] is packed  # derived on first use only
    assert set(layer.state_dict()) == {"weight_qdata", "weight_scale", "weight_zero_point", "bias"}


def test_int4_tinygemm_mapping_against_a_hand_dequantized_weight():
    """The tinygemm convention w = (u - 8) * s + zero, fed qlab's codes, gives x @ W_hat^T with W_hat
    computed by hand from the codes: (u - z) * s per group."""
    g = torch.Generator().manual_seed(5)
    N, K, gs = 32, 128, 32
    u = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    s = torch.rand(N, K // gs, generator=g) + 0.1
    z = torch.randint(0, 16, (N, K // gs), generator=g, dtype=torch.int32)
    w_hat = (u.float() - z.repeat_interleave(gs, 1).float()) * s.repeat_interleave(gs, 1)
    qt = ql.from_codes(u, s, z, ql.uint4, ql.PerGroup(gs), symmetric=False)
    x = torch.randn(3, K, generator=g)
    y = cpu.int4pack_linear(x, qt, KernelCache())
    ref = x @ w_hat.t()
    assert float((y - ref).norm() / ref.norm()) < 1e-2  # bf16 activations and qparams


def test_registry_errors_and_disable():
    with pytest.raises(ValueError, match="no kernel is registered for op 'nope'"):
        kernels.registered("nope")
    with pytest.raises(ValueError, match="unknown kernel names"):
        with kernels.disable("no such kernel"):
            pass
    with pytest.raises(ValueError, match="cannot be disabled"):
        with kernels.disable(kernels.REFERENCE):
            pass
    a = torch.ones(2, 8, dtype=torch.int8)
    with kernels.disable(kernels.INT_MM_CPU), kernels.trace() as ran:
        kernels.int_mm(a, a.t())
    assert ran == [kernels.REFERENCE]


def test_a_registered_kernel_is_dispatched_by_priority():
    calls = []
    try:
        kernels.register("int_mm", "test kernel", lambda a, b: a.shape[0] == 3,
                         lambda a, b: calls.append(1) or reference.int_mm(a, b), priority=50)
        a = torch.ones(3, 8, dtype=torch.int8)
        with kernels.trace() as ran:
            kernels.int_mm(a, a.t())
            kernels.int_mm(a[:2], a.t())
        assert ran[0] == "test kernel" and ran[1] != "test kernel" and calls == [1]
    finally:
        kernels._REGISTRY["int_mm"] = [k for k in kernels._REGISTRY["int_mm"] if k.name != "test kernel"]


def test_trace_records_only_inside_the_block():
    a = torch.ones(2, 8, dtype=torch.int8)
    with kernels.trace() as ran:
        kernels.int_mm(a, a.t())
    kernels.int_mm(a, a.t())
    assert len(ran) == 1


@cuda
def test_int_mm_cuda_matches_reference_and_falls_back_for_small_m():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 64), generator=g, dtype=torch.int8).cuda()
    w = torch.randint(-128, 128, (48, 64), generator=g, dtype=torch.int8).cuda()
    with kernels.disable(cuda_kernels.BNB_INT_MM), kernels.trace() as ran:
        c = kernels.int_mm(a, w.t())
        small = kernels.int_mm(a[:1], w.t())  # M = 1 <= 16: cuBLASLt refuses it
    assert ran == [kernels.INT_MM_CUDA, kernels.REFERENCE]
    assert torch.equal(c.cpu(), reference.int_mm(a.cpu(), w.t().cpu()))
    assert torch.equal(small.cpu(), c[:1].cpu())


@cuda
@pytest.mark.skipif(not cuda_kernels.has_bitsandbytes(), reason="needs bitsandbytes")
def test_bitsandbytes_int_mm_on_cuda_is_exact_at_every_m():
    """bitsandbytes' int8 GEMM (LLM.int8()'s) is preferred on CUDA and takes M = 1 too; exact against int64."""
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8)
    for M in (1, 5, 33):
        a = torch.randint(-127, 128, (M, 96), generator=g, dtype=torch.int8)
        with kernels.trace() as ran:
            c = kernels.int_mm(a.cuda(), w.cuda().t())
        assert ran == [cuda_kernels.BNB_INT_MM]
        assert torch.equal(c.cpu().long(), a.long() @ w.long().t())
    # LLM.int8() on the GPU runs its int8 part there and agrees with the CPU
    x = torch.randn(7, 96, generator=g)
    x[:, 3] *= 10
    w_absmax = torch.rand(40, generator=g) + 0.5
    y_cpu, _ = ql.llm_int8.int8_matmul_outliers(x, w, w_absmax, 6.0)
    y_gpu, _ = ql.llm_int8.int8_matmul_outliers(x.cuda(), w.cuda(), w_absmax.cuda(), 6.0)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-4)


needs_native = pytest.mark.skipif(not native.available(), reason="qlab's C kernels were not built (make native)")


@needs_native
@pytest.mark.parametrize("qtype,granularity,symmetric", [
    (ql.int8, ql.PerChannel(0), True), (ql.int8, ql.PerTensor(), True), (ql.uint4, ql.PerGroup(32), False),
    (ql.int4, ql.PerGroup(64), True), (ql.int4, ql.PerGroup(8), False),  # 8: the portable loop inside the C code
])
def test_c_dequantization_is_exact(qtype, granularity, symmetric):
    """The C kernel's rows equal torch's dequantize bit for bit in fp32, and torch's bf16 rounding in bf16."""
    g = torch.Generator().manual_seed(7)
    qt = ql.quantize_tensor(torch.randn(40, 128, generator=g), qtype, granularity, symmetric)
    ref = qt.dequantize()
    assert torch.equal(native.dequantize_rows(qt, 0, 40, torch.float32), ref)
    assert torch.equal(native.dequantize_rows(qt, 8, 24, torch.float32), ref[8:24])
    assert torch.equal(native.dequantize_rows(qt, 0, 40, torch.bfloat16), ref.bfloat16())


def test_without_the_c_library_everything_runs_on_torch_kernels(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    layer = ql.Int4WeightOnlyLinear.from_float(torch.nn.Linear(256, 64), group_size=64)
    x = torch.randn(40, 256)
    with kernels.trace() as ran:
        y = layer(x)
    assert ran == [cpu.INT4PACK]
    with kernels.disable(*kernels.fast_only()):
        torch.testing.assert_close(y, layer(x), rtol=0.05, atol=0.05)


def test_int8_weight_only_quantizes_activations_only_with_int8_dot_products(monkeypatch):
    """fbgemm's int8 dot kernel serves int8 weight-only decode only where the CPU has int8 dot products
    (elsewhere its int16 sums would saturate without 7-bit activations, too lossy for a weight-only layer)."""
    qt = ql.quantize_tensor(torch.randn(64, 256), ql.int8, ql.PerChannel(0))
    x = torch.randn(1, 256)
    monkeypatch.setattr(cpu, "has_int8_dot", lambda: True)
    assert kernels.choose("linear_weight_only", x, qt, KernelCache()).name == cpu.FBGEMM_WO
    assert kernels.choose("linear_weight_only", torch.randn(cpu.SMALL_M + 1, 256), qt, KernelCache()).name != cpu.FBGEMM_WO
    monkeypatch.setattr(cpu, "has_int8_dot", lambda: False)
    assert kernels.choose("linear_weight_only", x, qt, KernelCache()).name == cpu.INT8PACK
