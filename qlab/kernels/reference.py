"""Reference kernels: pure torch, every device, exact. The truth that every fast path must agree with.

Four ops cover all of qlab's quantized linear layers (x: activations (M, K), W: weights (N, K)):

    int_mm(a, b)                               int8 (M, K) @ int8 (K, N) -> int32 (M, N), exact integer sums
    linear_w8a8(x, w_q, w_scale, act, cache)   quantize x (act), exact integer GEMM with w_q, rescale -> (M, N)
    linear_weight_only(x, qt, cache)           x @ qt.dequantize()^T: dequantize the QTensor, then matmul
    linear_4bit(x, t, cache)                   the same for NF4/FP4 blocks (registered by qlab.nf4, next to its
                                               Tensor4bit: the weight is dequantized again in backward)

`int_mm` multiplies the integer codes in float64: every product is at most 128 * 128 = 2^14 in size and a
sum of K of them stays below 2^53 (where float64 stops representing integers exactly) for any
K < 2^39, so the float64 result is the exact integer sum. A real int8 kernel accumulates in int32
instead, which is exact only while K * 2^14 < 2^31, i.e. K < 131072; the reference checks that too, so
it reports the overflow a real kernel would silently wrap around.

W8A8 with x ~ s_x (x_q - z_x) and W ~ s_w w_q (symmetric weights):

    y[m, n] = s_x[m] * s_w[n] * (acc[m, n] - z_x[m] * rowsum(w_q)[n]),   acc = x_q @ w_q^T  (int32)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..core.granularity import Granularity, PerTensor, expand
from ..core.primitives import choose_qparams, quantize
from ..core.qtypes import QType

INT32_SAFE_K = 2**31 // 2**14  # the longest sum of int8 x int8 products an int32 accumulator holds exactly


class ActQuant(NamedTuple):
    """How a W8A8 layer quantizes its input: codes of `qtype` (signed = symmetric), one scale per token or
    per tensor. `scale`/`zero_point` are None for dynamic quantization (chosen from each input)."""

    qtype: QType
    granularity: Granularity = PerTensor()
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None

    @property
    def static(self) -> bool:
        return self.scale is not None


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


def int8_codes(q: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of any qtype up to 8 bits as int8 (what an int8 GEMM takes), with the zero point shifted to match.

    Unsigned codes (uint8 [0, 255]) are shifted by -128 and so is the zero point; the difference
    (q - zero_point), which is all the GEMM needs, is unchanged. Signed codes already fit.
    """
    if q.dtype == torch.uint8:
        return (q.to(torch.int16) - 128).to(torch.int8), zero_point - 128
    return q.to(torch.int8), zero_point


def quantize_activations(x: torch.Tensor, act: ActQuant) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 codes of x (M, K) per `act`, with scale and zero point shaped to broadcast: () or (M, 1)."""
    symmetric = act.qtype.signed
    if act.static:
        scale, zero_point = act.scale, act.zero_point
    else:
        scale, zero_point = choose_qparams(x, act.qtype, act.granularity, symmetric)
    q = quantize(x, scale, zero_point, act.qtype, act.granularity, symmetric=symmetric)  # (M, K)
    q, zero_point = int8_codes(q, zero_point)
    col = x[..., :1]
    return q, expand(scale, col, act.granularity), expand(zero_point, col, act.granularity)


def rescale(acc: torch.Tensor, x_zero_point: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor,
            w_scale: torch.Tensor) -> torch.Tensor:
    """y = s_x * s_w * (acc - z_x * rowsum(w_q)).  Shapes: acc (M, N) int32, x_* () or (M, 1), w_scale () or (N,)."""
    if bool((x_zero_point != 0).any()):
        acc = acc - x_zero_point * w_q.sum(dim=1, dtype=torch.int32)  # (M, 1) * (N,): the zero-point term
    return acc.float() * x_scale * w_scale


def linear_w8a8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, act: ActQuant, cache=None) -> torch.Tensor:
    """W8A8 linear without bias: x (M, K) float, w_q (N, K) int8, w_scale () or (N,) -> (M, N) float32."""
    x_q, x_scale, x_zero_point = quantize_activations(x, act)
    acc = int_mm(x_q, w_q.t())  # (M, N) exact
    return rescale(acc, x_zero_point, w_q, x_scale, w_scale)


def linear_weight_only(x: torch.Tensor, qt, cache=None) -> torch.Tensor:
    """x (M, K) @ W^T with W = qt.dequantize() (N, K), computed in float32 -> (M, N) in x's dtype."""
    return (x.float() @ qt.dequantize().float().t()).to(x.dtype)


def _always(*args) -> bool:
    return True


def _register() -> None:
    from . import register

    register("int_mm", "reference", _always, int_mm, priority=-100)
    register("linear_w8a8", "reference", _always, linear_w8a8, priority=-100)
    register("linear_weight_only", "reference", _always, linear_weight_only, priority=-100)


_register()
