"""qlab.kernels: the matmuls behind quantized layers, a pure-torch reference plus fast paths per device.

    ql.kernels.int_mm(a, b)                       int8 @ int8 -> int32 (W8A8 layers)
    ql.kernels.int8_weight_only_mm(x, w_q, s)     float @ int8 weights (weight-only int8)
    ql.kernels.int4_weight_only_mm(x, ...)        float @ packed 4-bit weights, group-wise qparams

Each call runs the fastest kernel that accepts its operands (`cpu.py`, `cuda.py`) and otherwise the
reference (`reference.py`), which is always there and is the truth the fast paths are tested against.
To see which one ran, record the kernels inside a `with` block:

    with ql.kernels.trace() as ran:
        model(x)
    print(ran)        # ['torch._int_mm (cpu)', ...]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import cpu, cuda, reference

REFERENCE = "reference"
INT_MM_CPU = "torch._int_mm (cpu)"
INT_MM_CUDA = "torch._int_mm (cuda)"
INT8_WEIGHT_ONLY_CPU = "aten._weight_int8pack_mm (cpu)"
INT4_WEIGHT_ONLY_CPU = "aten._weight_int4pack_mm_for_cpu (cpu)"

_open_traces: list[list[str]] = []  # one list per active `trace()` block


@contextmanager
def trace() -> Iterator[list[str]]:
    """Collect the name of every kernel that runs inside the block, in order."""
    ran: list[str] = []
    _open_traces.append(ran)
    try:
        yield ran
    finally:
        _open_traces.remove(ran)


def _ran(name: str) -> None:
    for ran in _open_traces:
        ran.append(name)


def int_mm_path(a: torch.Tensor, b: torch.Tensor) -> str:
    """Which kernel `int_mm(a, b)` would run for these operands."""
    if cpu.int_mm_supported(a, b):
        return INT_MM_CPU
    if cuda.int_mm_supported(a, b):
        return INT_MM_CUDA
    return REFERENCE


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 (M, K) @ int8 (K, N) -> int32 (M, N), on the fastest kernel that takes these shapes."""
    reference.check_int_mm_operands(a, b)
    path = int_mm_path(a, b)
    _ran(path)
    if path == INT_MM_CPU:
        return cpu.int_mm(a, b)
    if path == INT_MM_CUDA:
        return cuda.int_mm(a, b)
    return reference.int_mm(a, b)


def int8_weight_only_mm(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (scale[:, None] * w_q)^T -> (M, N): int8 weights with one scale per output channel."""
    if cpu.int8_weight_only_supported(x, w_q):
        _ran(INT8_WEIGHT_ONLY_CPU)
        return cpu.int8_weight_only_mm(x, w_q, scale)
    _ran(REFERENCE)
    return reference.int8_weight_only_mm(x, w_q, scale)


def int4_weight_only_mm(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor
) -> torch.Tensor:
    """x (M, K) @ W^T for W packed by `cpu.pack_int4_weight` (the tinygemm layout) -> (M, N)."""
    _ran(INT4_WEIGHT_ONLY_CPU)
    return cpu.int4_weight_only_mm(x, packed, group_size, scales_and_zeros)


def int4_weight_only_mm_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    shape: tuple[int, int],
    group_size: int,
    signed: bool,
) -> torch.Tensor:
    """x (M, K) @ W^T for W packed by ql.pack_int4 (qlab's plain layout), via dequantize-then-matmul."""
    _ran(REFERENCE)
    return reference.int4_weight_only_mm(x, packed, scale, zero_point, shape, group_size, signed)


__all__ = [
    "trace", "int_mm", "int_mm_path", "int8_weight_only_mm", "int4_weight_only_mm",
    "int4_weight_only_mm_reference", "reference", "cpu", "cuda",
]
