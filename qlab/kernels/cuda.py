"""CUDA fast paths (optional; registered always, chosen only for CUDA tensors).

torch._int_mm on CUDA (cuBLASLt integer tensor cores) is stricter than on CPU (aten/src/ATen/native/cuda/Blas.cpp):

    a (M, K) int8, b (K, N) int8     M > 16,  K > 0 and K % 8 == 0,  N > 0 and N % 8 == 0

Decoding at batch 1 (M = 1) therefore falls back to the reference kernel (bench/gpu.sh reports which ran)...
unless bitsandbytes is installed: its `int8_linear_matmul` (the int8 GEMM of LLM.int8(), cuBLASLt underneath)
takes any shape and is preferred for the `int_mm` op on CUDA (exact int32 sums, like every int_mm kernel).
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

from . import register, reference

INT_MM = "torch._int_mm (cuda)"
BNB_INT_MM = "bitsandbytes int8_linear_matmul (cuda)"


@cache
def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _shapes_ok(M: int, K: int, N: int) -> bool:
    return M > 16 and K % 8 == 0 and N % 8 == 0


def int_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device.type == "cuda" and hasattr(torch, "_int_mm") and _shapes_ok(a.shape[0], a.shape[1], b.shape[1])


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(a, b)


def w8a8_supported(x, w_q, w_scale, act, cache=None) -> bool:
    return x.device.type == "cuda" and hasattr(torch, "_int_mm") and _shapes_ok(x.shape[0], x.shape[1], w_q.shape[0])


def w8a8_int_mm(x, w_q, w_scale, act, cache=None) -> torch.Tensor:
    x_q, x_scale, x_zero_point = reference.quantize_activations(x, act)
    return reference.rescale(torch._int_mm(x_q, w_q.t()), x_zero_point, w_q, x_scale, w_scale)


register("int_mm", INT_MM, int_mm_supported, int_mm, priority=10)
register("linear_w8a8", INT_MM, w8a8_supported, w8a8_int_mm, priority=10)


def bnb_int_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device.type == "cuda" and b.device.type == "cuda" and has_bitsandbytes()


def bnb_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnb_f  # imported on first use: it prints warnings on CPU-only machines

    return bnb_f.int8_linear_matmul(a.contiguous(), b.t().contiguous())  # bitsandbytes computes A @ B.T


register("int_mm", BNB_INT_MM, bnb_int_mm_supported, bnb_int_mm, priority=20)
