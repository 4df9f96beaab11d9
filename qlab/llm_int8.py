"""LLM.int8(): vector-wise int8 matmul with a mixed-precision decomposition for outlier features.

T. Dettmers, M. Lewis, Y. Belkada, L. Zettlemoyer. "LLM.int8(): 8-bit Matrix Multiplication for Transformers
at Scale", NeurIPS 2022, https://arxiv.org/abs/2208.07339.

Conventions, as bitsandbytes 0.50 implements them (`Linear8bitLt(..., has_fp16_weights=False, threshold=6.0)`
in eval mode; tests/test_llm_int8.py compares against it):

  - an activation value is an outlier when |x| >= threshold; a column is an outlier column when any row has one;
  - only the outlier values are left out of each row's absmax; whole outlier columns are zeroed in the int8
    activation codes (with one row, bitsandbytes zeros the outlier values instead: the same thing there);
  - weights: one absmax per output row, codes round(w * 127 / absmax) in [-127, 127], round half to even;
  - the outlier part multiplies the original activations of the outlier columns with the *dequantized* int8
    weights (codes * absmax / 127), in floating point;
  - threshold = 0 turns the decomposition off (plain vector-wise int8).

    y = (X_q W_q^T) * (s_x s_w^T) / 127^2   +   X[:, O] (W_q[:, O] * s_w / 127)^T         O: outlier columns

Math first (tensor functions), then the module (`Int8OutlierLinear`), then the config (`LLMInt8Config`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .api import QuantConfig, register_handler, swap_modules
from .core.granularity import PerChannel
from .core.qtensor import QTensor, from_codes
from .core.qtypes import int8
from .core.checks import check_finite
from .nn import NON_FINITE_INPUT, _CachedKernels

QMAX = 127


# ----------------------------------------------------------------------------- 1) the math
def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if threshold < 0 or threshold != threshold:
        raise ValueError(f"threshold={threshold} must be >= 0: 6.0 is the paper's value, 0 turns the outlier split off")
    return threshold


def vectorwise_quant(x: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 codes of each row of x (M, K), with the outliers (|x| >= threshold) split off.

    Returns:
        q (M, K) int8: round(x * 127 / absmax_row), outlier columns zeroed;
        row_absmax (M,) float32: max |x| of each row over its non-outlier values;
        outlier_cols (n,) int64: the columns that hold an outlier in any row (empty if threshold == 0).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"vectorwise_quant takes a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2:
        raise ValueError(f"vectorwise_quant takes a (rows, features) matrix, got shape {tuple(x.shape)}; reshape first")
    threshold = _check_threshold(threshold)
    x = x.float()
    if threshold > 0:
        outliers = x.abs() >= threshold  # (M, K)
        outlier_cols = outliers.any(dim=0).nonzero().flatten()  # (n,)
        row_absmax = x.masked_fill(outliers, 0.0).abs().amax(dim=1)  # only the outlier values leave the absmax
    else:
        outlier_cols = torch.empty(0, dtype=torch.long)
        row_absmax = x.abs().amax(dim=1)
    scale = torch.where(row_absmax > 0, row_absmax, torch.ones_like(row_absmax))  # an all-zero row gets codes 0
    q = torch.round(x * (QMAX / scale[:, None])).clamp(-QMAX, QMAX).to(torch.int8)  # (M, K)
    if outlier_cols.numel():
        q[:, outlier_cols] = 0  # the float path computes these columns
    return q, row_absmax, outlier_cols


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8()'s weights: codes (N, K) int8 with one absmax per output row (bitsandbytes' CB and SCB)."""
    q, absmax, _ = vectorwise_quant(w.detach(), threshold=0.0)
    return q, absmax


def int8_matmul_outliers(
    x: torch.Tensor, w_q: torch.Tensor, w_absmax: torch.Tensor, threshold: float = 6.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) @ W^T for W = w_q * w_absmax / 127 (N, K): the int8 part plus the float part of the outliers.

    Returns (y (M, N) float32, outlier_cols). The int8 GEMM runs on ql.kernels ("int_mm": exact int32 sums).
    """
    q, row_absmax, cols = vectorwise_quant(x, threshold)
    acc = kernels.int_mm(q, w_q.t())  # (M, N) int32: exact
    y = acc.float() * (row_absmax[:, None] * w_absmax[None, :].float()) / (QMAX * QMAX)  # 1) the int8 part
    if cols.numel():  # 2) the outlier columns in float, against the dequantized int8 weights
        w_cols = w_q[:, cols].float() * (w_absmax[:, None].float() / QMAX)  # (N, n)
        y = y + x[:, cols].float() @ w_cols.t()
    return y, cols


# ----------------------------------------------------------------------------- 2) the module
class Int8OutlierLinear(_CachedKernels):
    """nn.Linear computed as LLM.int8(): vector-wise int8 matmul + float matmul of the outlier columns.

    Buffers (canonical, portable): weight_q (N, K) int8, weight_scale (N,) = absmax / 127, bias. Build with
    `Int8OutlierLinear(qt, bias, threshold=6.0)` from int8 per-row codes, or `from_float(linear)`.
    `last_outlier_fraction` is the share of input columns that took the float path in the last call.
    """

    def __init__(self, weight: QTensor, bias: torch.Tensor | None = None, threshold: float = 6.0) -> None:
        super().__init__()
        if not isinstance(weight, QTensor) or weight.qtype != int8 or weight.granularity != PerChannel(0) or \
                len(weight.shape) != 2 or not weight.symmetric:
            raise ValueError("Int8OutlierLinear takes symmetric int8 codes per output row, e.g. "
                             "ql.quantize_tensor(w, ql.int8, ql.PerChannel(0)); to quantize a layer use from_float")
        self.out_features, self.in_features = weight.shape
        self.threshold = _check_threshold(threshold)
        self.register_buffer("weight_q", weight.int_repr().to(torch.int8).contiguous())
        self.register_buffer("weight_scale", weight.scale_values().float().reshape(-1))  # (N,) = absmax / 127
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.last_outlier_fraction = 0.0

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: torch.Tensor | None = None, threshold: float = 6.0) -> Int8OutlierLinear:
        return cls(qt, bias, threshold)

    @classmethod
    def from_float(cls, linear: nn.Linear, threshold: float = 6.0) -> Int8OutlierLinear:
        codes, absmax = quantize_weight(linear.weight.float())
        qt = from_codes(codes, absmax / QMAX, None, int8, PerChannel(0), symmetric=True)
        return cls(qt, linear.bias, threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_finite(x, "Int8OutlierLinear's input", NON_FINITE_INPUT)
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        y, cols = int8_matmul_outliers(x2, self.weight_q, self.weight_scale * QMAX, self.threshold)
        self.last_outlier_fraction = cols.numel() / self.in_features
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize_weight(self) -> torch.Tensor:
        return self.weight_q.float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"


# ----------------------------------------------------------------------------- 3) the config
@dataclass(frozen=True)
class LLMInt8Config(QuantConfig):
    """Swap nn.Linear layers for Int8OutlierLinear. threshold: activation magnitude from which a value is an
    outlier (6.0, the paper's and Hugging Face's default; 0 disables the decomposition)."""

    threshold: float = 6.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_threshold(self.threshold)


@register_handler(LLMInt8Config)
def _llm_int8(model: nn.Module, config: LLMInt8Config, calib_data) -> nn.Module:
    swap_modules(model, config, lambda name, m: Int8OutlierLinear.from_float(m, config.threshold))
    return model


def _register_quantized() -> None:
    from .api import register_quantized_module

    register_quantized_module(Int8OutlierLinear)


_register_quantized()

__all__ = ["vectorwise_quant", "quantize_weight", "int8_matmul_outliers", "Int8OutlierLinear", "LLMInt8Config"]
