"""CUDA fast path: torch._int_mm on cuBLASLt integer tensor cores (optional; unused without a GPU).

torch._int_mm on CUDA is stricter than on CPU (aten/src/ATen/native/cuda/Blas.cpp, torch 2.x):

    a (M, K) int8, b (K, N) int8     M > 16,  K > 0 and K % 8 == 0,  N > 0 and N % 8 == 0

Decoding at batch 1 (M = 1) therefore falls back to the reference kernel; pad M to 17 rows if you
want the tensor cores (bench/linear.py --device cuda reports which path ran).
"""

from __future__ import annotations

import torch


def int_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Shapes and device that torch._int_mm accepts on CUDA."""
    M, K = a.shape
    N = b.shape[1]
    return a.device.type == "cuda" and hasattr(torch, "_int_mm") and M > 16 and K % 8 == 0 and N % 8 == 0


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (K, N) -> int32 (M, N) with torch._int_mm."""
    return torch._int_mm(a, b)
