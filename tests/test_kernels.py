"""qlab.kernels: every fast path against the pure-torch reference, and the reference against a naive loop."""

import pytest
import torch

import qlab as ql
from qlab import kernels
from qlab.kernels import cpu, reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 5, 7), (17, 64, 48), (64, 1024, 32)])
def test_int_mm_cpu_kernel_matches_reference(shape):
    M, K, N = shape
    g = torch.Generator().manual_seed(M + K + N)
    a = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    with kernels.trace() as ran:
        c = kernels.int_mm(a, w.t())  # the layout QuantLinear uses: b is a transposed (N, K) weight
    assert ran == [kernels.INT_MM_CPU]
    assert c.dtype == torch.int32
    assert torch.equal(c, reference.int_mm(a, w.t()))


def test_int_mm_rejects_wrong_operands():
    with pytest.raises(ValueError, match="int8 codes"):
        kernels.int_mm(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(M, K\) and b \(K, N\)"):
        kernels.int_mm(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.int8))


def test_int8_weight_only_kernel_matches_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 96, generator=g)
    w_q = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8)
    scale = torch.rand(40, generator=g) / 100 + 1e-3
    with kernels.trace() as ran:
        y = kernels.int8_weight_only_mm(x, w_q, scale)
    assert ran == [kernels.INT8_WEIGHT_ONLY_CPU]
    torch.testing.assert_close(y, reference.int8_weight_only_mm(x, w_q, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_tinygemm_layout_matches_plain_reference(symmetric, group_size):
    """The CPU int4 kernel, fed qlab's codes through pack_int4_weight / scales_and_zeros, agrees with
    dequantize-then-matmul on the same codes to ~1e-5 relative (the convention w = (u - 8) * s + zero)."""
    g = torch.Generator().manual_seed(group_size)
    N, K = 48, 256
    w = torch.randn(N, K, generator=g)
    x = torch.randn(3, K, generator=g)
    qtype = ql.int4 if symmetric else ql.uint4
    scale, zero_point = ql.choose_qparams(w, qtype, ql.PerGroup(group_size), symmetric)
    codes = ql.quantize(w, scale, zero_point, qtype, ql.PerGroup(group_size))
    packed = cpu.pack_int4_weight(codes, signed=symmetric)
    table = cpu.scales_and_zeros(scale, zero_point, signed=symmetric)
    y = kernels.int4_weight_only_mm(x, packed, group_size, table)
    ref = reference.int4_weight_only_mm(x, ql.pack_int4(codes), scale, zero_point, (N, K), group_size, symmetric)
    assert (y - ref).abs().max() / ref.abs().max() < 1e-5


def test_int4_kernel_constraints_measured():
    """What torch 2.13's CPU int4 kernel accepts (recorded in cpu.int4_weight_only_supported)."""
    assert cpu.int4_weight_only_supported(48, 32)
    assert not cpu.int4_weight_only_supported(40, 32)  # N % 16 != 0
    assert not cpu.int4_weight_only_supported(48, 16)  # group_size not in {32, 64, 128, 256}
    with pytest.raises(RuntimeError, match="dividable by 16"):
        cpu.pack_int4_weight(torch.zeros(8, 64, dtype=torch.int8), signed=True)


def test_trace_records_only_inside_the_block():
    a = torch.ones(2, 8, dtype=torch.int8)
    with kernels.trace() as ran:
        kernels.int_mm(a, a.t())
    kernels.int_mm(a, a.t())
    assert ran == [kernels.INT_MM_CPU]


@cuda
def test_int_mm_cuda_matches_reference_and_falls_back_for_small_m():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 64), generator=g, dtype=torch.int8).cuda()
    w = torch.randint(-128, 128, (48, 64), generator=g, dtype=torch.int8).cuda()
    with kernels.trace() as ran:
        c = kernels.int_mm(a, w.t())
        small = kernels.int_mm(a[:1], w.t())  # M = 1 <= 16: cuBLASLt refuses it
    assert ran == [kernels.INT_MM_CUDA, kernels.REFERENCE]
    assert torch.equal(c.cpu(), reference.int_mm(a.cpu(), w.t().cpu()))
    assert torch.equal(small.cpu(), c[:1].cpu())
