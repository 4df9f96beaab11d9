"""Reference kernels: pure torch, every device, exact. The truth that every fast path must agree with.

Three matmuls cover all of qlab's quantized linear layers (x: activations (M, K), W: weights (N, K)):

    int_mm(a, b)                     int8 (M, K) @ int8 (K, N) -> int32 (M, N)     exact integer sums
    int8_weight_only_mm(x, w_q, s)   x @ (s[:, None] * w_q)^T                       dequantize, then matmul
    int4_weight_only_mm(x, ...)      x @ dequantize(unpack_int4(codes))^T           same, 4-bit packed codes

`int_mm` multiplies the integer codes in float64: every product is at most 128 * 128 = 2^14 in size and a
sum of K of them stays below 2^53 (where float64 stops representing integers exactly) for any
K < 2^39, so the float64 result is the exact integer sum. A real int8 kernel accumulates in int32
instead, which is exact only while K * 2^14 < 2^31, i.e. K < 131072; the reference checks that too, so
it reports the overflow a real kernel would silently wrap around.
"""

from __future__ import annotations

import torch

from ..core.granularity import PerChannel, PerGroup
from ..core.packing import unpack_int4
from ..core.primitives import dequantize

INT32_SAFE_K = 2**31 // 2**14  # the longest sum of int8 x int8 products an int32 accumulator holds exactly


def check_int_mm_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise ValueError unless a (M, K) and b (K, N) are 2-D int8 tensors that can be multiplied."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise ValueError("int_mm multiplies two torch.Tensors of int8 codes")
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(
            f"int_mm multiplies int8 codes, got {a.dtype} and {b.dtype}; quantize with ql.quantize(..., ql.int8) "
            "(unsigned codes: subtract 128 first and fold the shift into the zero point)"
        )
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"int_mm needs a (M, K) and b (K, N); got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] > INT32_SAFE_K:
        raise ValueError(
            f"K={a.shape[1]} int8 products can overflow an int32 accumulator (safe up to K={INT32_SAFE_K}); "
            "split the reduction into chunks"
        )


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer matmul of int8 codes: C[m, n] = sum_k a[m, k] * b[k, n], as int32.

    Shapes: a (M, K) int8, b (K, N) int8 -> (M, N) int32.
    """
    check_int_mm_operands(a, b)
    return (a.double() @ b.double()).to(torch.int32)  # exact: see the module docstring


def int8_weight_only_mm(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ W^T with W = scale[:, None] * w_q (int8 codes, one scale per output channel).

    Shapes: x (M, K) float, w_q (N, K) int8, scale (N,) -> (M, N) in x's dtype.
    """
    w = dequantize(w_q, scale, 0, PerChannel(0))  # (N, K) float32
    return (x.float() @ w.t()).to(x.dtype)


def int4_weight_only_mm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    shape: tuple[int, int],
    group_size: int,
    signed: bool,
) -> torch.Tensor:
    """x @ W^T with W the group-wise dequantized 4-bit codes stored by ql.pack_int4.

    Shapes: x (M, K) float, packed (N * K / 2,) uint8, scale and zero_point (N, K // group_size),
    shape = (N, K) -> (M, N) in x's dtype.
    """
    codes = unpack_int4(packed, shape, signed=signed)  # (N, K) int8 / uint8
    w = dequantize(codes, scale, zero_point, PerGroup(group_size))  # (N, K) float32
    return (x.float() @ w.t()).to(x.dtype)
