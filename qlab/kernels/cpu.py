"""CPU fast paths: the integer and weight-only matmul kernels that ship inside PyTorch.

    torch._int_mm                                  int8 (M, K) @ int8 (K, N) -> int32; any shape on CPU
    torch.ops.aten._weight_int8pack_mm             x (M, K) fp32/bf16/fp16 @ int8 W (N, K)^T * scale (N,)
    torch.ops.aten._convert_weight_to_int4pack_for_cpu
    torch.ops.aten._weight_int4pack_mm_for_cpu     x (M, K) @ group-wise 4-bit W (N, K)^T

The int4 kernel ("tinygemm" layout, the one gpt-fast and torchao use) stores unsigned codes u in [0, 15]
and dequantizes each group as

    w = (u - 8) * scale + zero            scales_and_zeros: (K // group_size, N, 2), [..., 0] = scale, [..., 1] = zero

so qlab's codes map onto it as: symmetric int4 c in [-7, 7] -> u = c + 8, zero = 0;
asymmetric uint4 u with zero_point z -> u as is, zero = (8 - z) * scale (then (u - 8) s + (8 - z) s = (u - z) s).
Constraints measured on torch 2.13 (tests/test_kernels.py checks them): N % 16 == 0 and
group_size in {32, 64, 128, 256}.

Each `*_supported` function says whether the kernel accepts the operands; callers fall back to
`qlab.kernels.reference` when it does not. These kernels exist in every CPU build of torch >= 2.5, but
not all of them are fast everywhere: on a CPU without VNNI/AMX int8 instructions `torch._int_mm` is a
generic loop (bench/linear.py measures it).
"""

from __future__ import annotations

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def int_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._int_mm on CPU takes any 2-D int8 operands."""
    return a.device.type == "cpu" and hasattr(torch, "_int_mm")


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (K, N) -> int32 (M, N) with torch._int_mm."""
    return torch._int_mm(a, b)


def int8_weight_only_supported(x: torch.Tensor, w_q: torch.Tensor) -> bool:
    """_weight_int8pack_mm: CPU, x 2-D fp32/bf16/fp16, w_q (N, K) int8."""
    return (
        x.device.type == "cpu"
        and _has("_weight_int8pack_mm")
        and x.dim() == 2
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and w_q.dtype == torch.int8
    )


def int8_weight_only_mm(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (scale[:, None] * w_q)^T -> (M, N), in x's dtype."""
    return torch.ops.aten._weight_int8pack_mm(x, w_q.contiguous(), scale.to(x.dtype))


def int4_weight_only_supported(out_features: int, group_size: int, device: torch.device | str = "cpu") -> bool:
    """_weight_int4pack_mm_for_cpu: N % 16 == 0 and group_size in {32, 64, 128, 256}."""
    return (
        torch.device(device).type == "cpu"
        and _has("_weight_int4pack_mm_for_cpu")
        and out_features % 16 == 0
        and group_size in INT4_GROUP_SIZES
    )


def pack_int4_weight(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """Repack 4-bit codes (N, K) into the kernel's layout: uint8 (N, K // 2).

    Signed codes c in [-8, 7] are shifted to u = c + 8 in [0, 15]; unsigned codes are kept.
    """
    u = codes.to(torch.int32) + (8 if signed else 0)  # (N, K) in [0, 15]
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)


def scales_and_zeros(scale: torch.Tensor, zero_point: torch.Tensor, signed: bool) -> torch.Tensor:
    """qlab's group qparams (N, K // g) -> the kernel's (K // g, N, 2) table of (scale, zero).

    In the kernel's [0, 15] code space the zero point is z_u = zero_point + 8 for signed codes (they were
    shifted by 8) and zero_point itself for unsigned ones; then (u - z_u) * s = (u - 8) * s + (8 - z_u) * s.
    """
    z_u = zero_point.float() + (8 if signed else 0)
    zero = (8 - z_u) * scale  # (N, K // g)
    return torch.stack([scale.t(), zero.t()], dim=-1).float().contiguous()  # (K // g, N, 2)


def int4_weight_only_mm(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor
) -> torch.Tensor:
    """x (M, K) @ W^T with W in the tinygemm int4 layout -> (M, N), in x's dtype."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros.to(x.dtype))
