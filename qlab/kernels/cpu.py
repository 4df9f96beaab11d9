"""CPU fast paths, registered per op with the conditions under which each one is actually fast.

    fbgemm (cpu)                torch.ops.quantized.linear_dynamic / linear_with_input_q_dq_qweight_dq_output_fp32
                                with prepacked per-channel int8 weights (x86): W8A8 at every M
    torch._int_mm (cpu)         int8 @ int8 -> int32; only where the CPU has int8 dot-product instructions
                                (AVX-512 VNNI, AVX-VNNI, AMX); elsewhere it is a scalar loop slower than FP32
    aten int8pack, bf16 (cpu)   aten._weight_int8pack_mm with activations cast to bf16 inside the call
    aten int4pack, bf16 (cpu)   aten._weight_int4pack_mm_for_cpu (the tinygemm layout), bf16 activations
    fbgemm int8 dot (cpu)       int8 weight-only layers for a few rows (M <= SMALL_M) on CPUs with int8 dot
                                products: the activation rows are quantized to int8 inside the call (one scale
                                per row), as llama.cpp's Q8_0 and ONNX Runtime's accuracy level 4 do; relative
                                error 0.009 instead of 0.005 (bench/linear.py), 3-5x faster than aten's kernel

Why bf16 activations: with fp32 activations both aten weight-only kernels take a scalar path 5-85x slower
than FP32 `F.linear`; with bf16 they vectorize. x is cast to bf16 (8 significant bits: relative rounding
error <= 2^-9 per element), the kernel accumulates in fp32 and returns bf16, which is cast back; the
measured effect on a 4096-wide layer is a relative output error of about 3e-3 against the fp32 reference
(`tolerance` below bounds it, tests/test_kernels.py checks it). They are chosen at every M: at large M they
lose to the FP32 GEMM (0.3-0.96x, bench/linear.py shows the crossover), but the only alternative here, the
reference, dequantizes the whole weight on every call and is slower still (0.13-0.34x FP32 at M >= 64).

fbgemm's u8s8 kernel on AVX2 without VNNI multiplies pairs with `vpmaddubsw`, whose int16 sums saturate for
8-bit activations: there, only 7-bit activation codes (`reduce_range`) are accepted by its `supports`.
The cost of 7 bits, from bench/linear.py's accuracy table (4096-wide layer, N(0, 1) inputs): relative
output error 0.0165 instead of 0.0089 (the cpu_peers notes measured 0.022 vs 0.014 on an AVX2 machine). Per-token dynamic scales (qlab's default) are realised on
fbgemm's per-tensor kernel by dividing each row by its absmax first and multiplying the output rows back:
every row then spans its own [-absmax, absmax] with the same number of codes, as per-token quantization does.

The int4 tinygemm layout stores unsigned codes u in [0, 15] and dequantizes each group as
(u - 8) * scale + zero, with scales_and_zeros (K // g, N, 2); qlab's codes map onto it as
signed c -> u = c + 8, zero = 0; unsigned u with zero point z -> zero = (8 - z) * scale.
Constraints (torch 2.13): N % 16 == 0, group_size in {32, 64, 128, 256}, K % group_size == 0.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..core.granularity import PerChannel, PerGroup, PerTensor, PerToken
from . import register, reference

INT_MM = "torch._int_mm (cpu)"
FBGEMM = "fbgemm (cpu)"
INT8PACK = "aten int8pack, bf16 (cpu)"
INT4PACK = "aten int4pack, bf16 (cpu)"
INT4_GROUP_SIZES = (32, 64, 128, 256)


# ----------------------------------------------------------------------------- what this CPU can do
@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_int8_dot() -> bool:
    """True if the CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def has_native_bf16() -> bool:
    """True if the CPU computes bf16 dot products natively (AVX-512 BF16 or AMX-BF16)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def capability() -> str:
    """One line for benchmarks and chapters: torch's CPU capability plus the int8/bf16 instructions."""
    extra = [name for name, ok in (("int8-dot", has_int8_dot()), ("bf16", has_native_bf16())) if ok]
    return f"{torch.backends.cpu.get_cpu_capability()}{' + ' + ' + '.join(extra) if extra else ''}"


@functools.lru_cache(maxsize=None)
def has_quantized_op(name: str) -> bool:
    """True if this torch build has torch.ops.quantized.<name> (x86 builds with fbgemm do)."""
    try:
        getattr(torch.ops.quantized, name)
        return "fbgemm" in torch.backends.quantized.supported_engines
    except (AttributeError, RuntimeError):
        return False


def _cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


# ----------------------------------------------------------------------------- torch._int_mm
def int_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _cpu(a) and hasattr(torch, "_int_mm") and has_int8_dot()


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(a, b)


def w8a8_int_mm_supported(x, w_q, w_scale, act, cache=None) -> bool:
    return _cpu(x) and hasattr(torch, "_int_mm") and has_int8_dot()


def w8a8_int_mm(x, w_q, w_scale, act, cache=None) -> torch.Tensor:
    """Exactly the reference's integers: quantize x as the reference does, int8 GEMM in torch._int_mm."""
    x_q, x_scale, x_zero_point = reference.quantize_activations(x, act)
    return reference.rescale(torch._int_mm(x_q, w_q.t()), x_zero_point, w_q, x_scale, w_scale)


# ----------------------------------------------------------------------------- fbgemm
def fbgemm_pack(w_q: torch.Tensor, w_scale: torch.Tensor):
    """fbgemm's prepacked weight from qlab's codes (N, K) int8 and scales () or (N,)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensor constructors; the packed op stays
        if w_scale.dim() == 0:
            qw = torch._make_per_tensor_quantized_tensor(w_q, float(w_scale), 0)
        else:
            zeros = torch.zeros(w_q.shape[0], dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(w_q, w_scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def fbgemm_supported(x, w_q, w_scale, act, cache=None) -> bool:
    if not (_cpu(x) and x.dtype == torch.float32 and cache is not None):
        return False
    bits_ok = act.qtype.bits == 7 or (act.qtype.bits == 8 and has_int8_dot())  # int16 saturation on AVX2
    if act.static:
        return bits_ok and has_quantized_op("linear_with_input_q_dq_qweight_dq_output_fp32")
    return bits_ok and has_quantized_op("linear_dynamic")


def _static_args(act) -> tuple[float, int, float, float]:
    """fbgemm's (scale, quint8 zero point) and the clamp range of qlab's codes, as Python numbers."""
    qmin, qmax = act.qtype.qmin, act.qtype.qmax
    if act.qtype.signed:
        qmin = -qmax  # qlab's restricted symmetric range
    z, scale = int(act.zero_point), float(act.scale)
    return scale, z + 128 if act.qtype.signed else z, (qmin - z) * scale, (qmax - z) * scale


def fbgemm_linear(x, w_q, w_scale, act, cache=None) -> torch.Tensor:
    packed = cache.get_packed(KERNELS[FBGEMM], x.device, w_q, w_scale)
    if act.static:  # fbgemm takes quint8 codes: an int8 code c is the quint8 code c + 128
        key = (FBGEMM + " static qparams", id(act.scale), id(act.zero_point))
        if key not in cache:
            cache[key] = _static_args(act)
        scale, zp, lo, hi = cache[key]
        x = x.clamp(lo, hi)  # the codes outside the type's range clamp here
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, scale, zp, packed)
    reduce_range = act.qtype.bits == 7
    if act.granularity == PerToken():
        return _dynamic_per_row(x, packed, reduce_range)
    return torch.ops.quantized.linear_dynamic(x, packed, reduce_range)


def _dynamic_per_row(x, packed, reduce_range: bool) -> torch.Tensor:
    """fbgemm's per-tensor dynamic kernel with one scale per row: normalise each row, scale the outputs back.
    One row needs no normalising (its per-tensor scale is its per-row scale)."""
    if x.shape[0] == 1:
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range)
    r = x.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)  # (M, 1)
    return torch.ops.quantized.linear_dynamic(x / r, packed, reduce_range) * r


# ----------------------------------------------------------------------------- aten weight-only kernels
def _small_cpu_float(x) -> bool:
    return _cpu(x) and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16)


def int8pack_supported(x, qt, cache=None) -> bool:
    return (
        _small_cpu_float(x) and cache is not None and hasattr(torch.ops.aten, "_weight_int8pack_mm")
        and qt.qtype.bits == 8 and qt.qtype.signed and qt.symmetric and qt.granularity == PerChannel(0)
        and qt.g_idx is None and len(qt.shape) == 2
    )


def int8pack_pack(qt):
    return qt.int_repr().contiguous(), qt.scale.reshape(-1).to(torch.bfloat16)


def int8pack_linear(x, qt, cache=None) -> torch.Tensor:
    w_q, scale = cache.get_packed(KERNELS[INT8PACK], x.device, qt)
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w_q, scale).to(x.dtype)


def int4pack_supported(x, qt, cache=None) -> bool:
    if not (_small_cpu_float(x) and cache is not None and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")):
        return False
    if qt.qtype.bits != 4 or not isinstance(qt.granularity, PerGroup) or qt.g_idx is not None or len(qt.shape) != 2:
        return False
    N, K = qt.shape
    g = qt.granularity.group_size
    return N % 16 == 0 and g in INT4_GROUP_SIZES and K % g == 0


def int4pack_pack(qt):
    """tinygemm layout from the canonical codes: packed (N, K / 2) uint8 and (K / g, N, 2) bf16 qparams."""
    u = qt.int_repr().to(torch.int32) + (8 if qt.qtype.signed else 0)  # (N, K) in [0, 15]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
    z_u = qt.zero_point.float() + (8 if qt.qtype.signed else 0)  # zero point in [0, 15] code space
    zero = (8 - z_u) * qt.scale  # (N, K // g): (u - 8) s + (8 - z_u) s = (u - z_u) s
    table = torch.stack([qt.scale.t(), zero.t()], dim=-1).contiguous()  # (K // g, N, 2)
    return packed, table.to(torch.bfloat16)


def int4pack_linear(x, qt, cache=None) -> torch.Tensor:
    packed, table = cache.get_packed(KERNELS[INT4PACK], x.device, qt)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, qt.granularity.group_size, table)
    return y.to(x.dtype)


SMALL_M = 16  # rows up to which the fbgemm int8 dot kernel serves weight-only layers (decode, short prompts)
FBGEMM_WO = "fbgemm int8 dot (cpu)"


def fbgemm_wo_supported(x, qt, cache=None) -> bool:
    return (
        _cpu(x) and x.dim() == 2 and x.dtype == torch.float32 and x.shape[0] <= SMALL_M and cache is not None
        and has_int8_dot() and has_quantized_op("linear_dynamic")
        and qt.qtype.bits == 8 and qt.qtype.signed and qt.symmetric and qt.granularity in (PerChannel(0), PerTensor())
        and len(qt.shape) == 2
    )


def fbgemm_wo_pack(qt):
    return fbgemm_pack(qt.int_repr().contiguous(), qt.scale_values().float())


def fbgemm_wo_linear(x, qt, cache=None) -> torch.Tensor:
    return _dynamic_per_row(x, cache.get_packed(KERNELS[FBGEMM_WO], x.device, qt), False)


KERNELS = {
    INT_MM: register("int_mm", INT_MM, int_mm_supported, int_mm, priority=10),
    FBGEMM: register("linear_w8a8", FBGEMM, fbgemm_supported, fbgemm_linear, pack=fbgemm_pack, priority=20,
                     tolerance=0.03),
    "w8a8 " + INT_MM: register("linear_w8a8", INT_MM, w8a8_int_mm_supported, w8a8_int_mm, priority=10),
    INT8PACK: register("linear_weight_only", INT8PACK, int8pack_supported, int8pack_linear, pack=int8pack_pack,
                       priority=10, tolerance=0.01),
    INT4PACK: register("linear_weight_only", INT4PACK, int4pack_supported, int4pack_linear, pack=int4pack_pack,
                       priority=10, tolerance=0.01),
    FBGEMM_WO: register("linear_weight_only", FBGEMM_WO, fbgemm_wo_supported, fbgemm_wo_linear, pack=fbgemm_wo_pack,
                        priority=15, tolerance=0.02),
}
