"""qlab's own CPU kernels (csrc/qlab_cpu.c, built by `make` into _qlab_cpu.so), called through ctypes.

    qlab dequant + GEMM (cpu)   weight-only linear for many rows (M > SMALL_M): dequantize a tile of weight
                                rows (a few MB, so it stays in cache) with the C kernel, multiply it with
                                torch's GEMM, next tile. In bf16 where the CPU has native bf16 dot products
                                (AVX-512 BF16 / AMX: twice the FP32 GEMM's speed there), else in fp32.

Why: aten's weight-only kernels lose to the FP32 GEMM at large M (0.3-0.96x), and dequantizing the whole
weight in torch on every call costs more than the GEMM itself. The tile never leaves the cache, so the
extra memory traffic is one read of the packed codes. Where the library was not built (no C compiler),
`available()` is False and this kernel is never chosen: everything still runs on the other kernels.
bf16 tiles round the weights and activations to 8 significant bits: relative error about 3e-3 (tolerance).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ..core.granularity import PerChannel, PerGroup, PerTensor
from . import cpu, register

LIBRARY = Path(__file__).with_name("_qlab_cpu.so")
DEQUANT_GEMM = "qlab dequant + GEMM (cpu)"
SMALL_M = 16  # at or below this many rows, aten's weight-only kernels are faster (bench/linear.py)
TILE_BYTES = 2 * 2**20  # dequantized rows per tile: about 2 MB


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The built kernel library, or None where it was not built or cannot be loaded."""
    try:
        lib = ctypes.CDLL(str(LIBRARY))
        if lib.qlab_abi_version() != 1:
            return None
    except (OSError, AttributeError):
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.qlab_dequant_int4.argtypes = [p, p, p, i, i, i, i, i, p, i, i]
    lib.qlab_dequant_int8.argtypes = [p, p, i, i, i, i, p, i, i]
    return lib


def available() -> bool:
    return library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def dequantize_rows(qt, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [n0, n1) of qt.dequantize(), as a (n1 - n0, K) tensor of `dtype` (float32 or bfloat16)."""
    N, K = qt.shape
    out = torch.empty(n1 - n0, K, dtype=dtype)
    bf16 = int(dtype == torch.bfloat16)
    threads = torch.get_num_threads()
    scale = qt.scale_values().float().contiguous()
    if qt.qtype.bits == 8:
        rc = library().qlab_dequant_int8(_ptr(qt.qdata.contiguous()), _ptr(scale), int(scale.dim() > 0), n0, n1, K,
                                         _ptr(out), bf16, threads)
    else:
        zero = None if qt.symmetric else qt.zero_point.to(torch.int32).contiguous()
        rc = library().qlab_dequant_int4(_ptr(qt.qdata.contiguous()), _ptr(scale), _ptr(zero), n0, n1, K,
                                         qt.granularity.group_size, int(qt.qtype.signed), _ptr(out), bf16, threads)
    if rc != 0:
        raise ValueError(f"qlab's C kernel rejected the weight layout {qt!r} (K must be even and divisible by the group)")
    return out


def supports(x, qt, cache=None) -> bool:
    if not (x.device.type == "cpu" and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16)
            and x.shape[0] > SMALL_M and qt.g_idx is None and len(qt.shape) == 2 and available()):
        return False
    if qt.qtype.bits == 8:
        return qt.qtype.signed and qt.granularity in (PerChannel(0), PerTensor())
    if qt.qtype.bits == 4:
        return isinstance(qt.granularity, PerGroup) and qt.shape[1] % 2 == 0
    return False


def dequant_gemm(x, qt, cache=None) -> torch.Tensor:
    """y = x @ W^T, tile by tile: y^T[n0:n1] = W[n0:n1] @ x^T with W[n0:n1] dequantized in cache."""
    N, K = qt.shape
    dtype = torch.bfloat16 if cpu.has_native_bf16() else torch.float32
    xt = x.to(dtype).t()  # (K, M)
    rows = max(16, TILE_BYTES // (K * (2 if dtype == torch.bfloat16 else 4)))
    tiles = [(n0, min(N, n0 + rows)) for n0 in range(0, N, rows)]
    if torch.is_grad_enabled() and x.requires_grad:  # autograd through x: plain matmuls, concatenated
        yt = torch.cat([dequantize_rows(qt, n0, n1, dtype) @ xt for n0, n1 in tiles])
    else:
        yt = torch.empty(N, x.shape[0], dtype=dtype)  # (N, M): each tile of rows is a contiguous slice
        for n0, n1 in tiles:
            torch.mm(dequantize_rows(qt, n0, n1, dtype), xt, out=yt[n0:n1])
    return yt.t().to(x.dtype)


register("linear_weight_only", DEQUANT_GEMM, supports, dequant_gemm, priority=20, tolerance=0.01)
