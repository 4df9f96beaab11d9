"""Quantized layers that really compute in integers: drop-in replacements for nn.Linear and nn.Conv2d.

W8A8 (weights and activations in 8 bits; the integer GEMM of Jacob et al. 2018,
https://arxiv.org/abs/1712.05877). With x ~ s_x (x_q - z_x) and W ~ s_w w_q (symmetric weights, z_w = 0):

    y[m, n] = s_x[m] * s_w[n] * sum_k (x_q[m, k] - z_x[m]) * w_q[n, k]  +  b[n]
            = s_x[m] * s_w[n] * (acc[m, n] - z_x[m] * rowsum(w_q)[n])   +  b[n],   acc = x_q @ w_q^T  (int32)

so the whole reduction over k runs on int8 codes with an int32 accumulator, and the floats only enter once
per output element (`ql.kernels`: op "linear_w8a8", on fbgemm, torch._int_mm or the exact reference).

    QuantLinear            W8A8 linear: activation scales per token at run time (dynamic) or from calibration (static)
    QuantConv2d            the same GEMM on im2col patches: one row per output pixel
    WeightOnlyLinear       codes of any width and granularity, float activations: x @ dequantize(W)^T
    Int8WeightOnlyLinear   int8 weights, one scale per output channel
    Int4WeightOnlyLinear   group-wise 4-bit weights, bit-packed

One constructor convention: every module is built from a QTensor of weight codes, `Module(qt, bias, ...)`
or `Module.from_qtensor(qt, bias, ...)`, so an algorithm (GPTQ, AWQ, a checkpoint reader) can hand it the
codes it chose; `from_float(module, ...)` is `from_qtensor(ql.quantize_tensor(module.weight, ...))`.

What a module saves (`state_dict`) is the canonical layout only: codes (packed in qlab's order for < 8 bits),
scale, zero point, bias and static activation qparams. A kernel's own layout (fbgemm's prepacked weight,
the tinygemm int4 layout) is derived on first use per device and kept in a KernelCache that is never
saved, so a checkpoint loads the same on any machine and any kernel. The cache is dropped by
`load_state_dict` and by `.to()`; code that edits the buffers in place must call `layer._kernel_cache.clear()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .core.checks import check_finite
from .core.granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken
from .core.primitives import quantize
from .core.qtensor import QTensor, from_codes, quantize_tensor
from .core.qtypes import QType, int4, int8, qtype, uint4, uint8
from .kernels import ActQuant, KernelCache

WEIGHT_GRANULARITIES = (PerChannel(0), PerTensor())
NON_FINITE_INPUT = ("clean or mask the data: integer codes cannot hold NaN or Inf. The batch holds it or an earlier "
                    "layer produced it (look for the first module whose output is not finite)")


def static_qparams(act_qparams) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) from a pair, or from an observer (anything with `calculate_qparams()`)."""
    if hasattr(act_qparams, "calculate_qparams"):
        act_qparams = act_qparams.calculate_qparams()
    if not (isinstance(act_qparams, (tuple, list)) and len(act_qparams) == 2):
        raise ValueError(
            "act_qparams must be a (scale, zero_point) pair or an observer with calculate_qparams(); "
            f"got {type(act_qparams).__name__}"
        )
    scale, zero_point = (torch.as_tensor(t) for t in act_qparams)
    if scale.numel() != 1 or zero_point.numel() != 1:
        raise ValueError(
            f"static activation qparams must be per tensor (one scale), got scale of shape {tuple(scale.shape)}; "
            "a per-token or per-channel activation scale cannot be fixed ahead of time and factored out of the GEMM"
        )
    return scale.reshape(()).float(), zero_point.reshape(()).to(torch.int32)


def act_qtype_for(act_qtype: QType | None, act_symmetric: bool | None) -> QType:
    """The activation code type from act_qtype and/or act_symmetric (signed codes are the symmetric ones)."""
    if act_qtype is None:
        return int8 if act_symmetric in (None, True) else uint8
    if act_symmetric is not None and act_symmetric != act_qtype.signed:
        raise ValueError(
            f"act_symmetric={act_symmetric} contradicts act_qtype={act_qtype!r}: symmetric activations use signed "
            f"codes (ql.int8), asymmetric ones unsigned codes with a zero point (ql.uint8); pass one of the two"
        )
    return act_qtype


def _check_weight_granularity(granularity: Granularity) -> None:
    if granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(
            f"weight_granularity={granularity} does not fit an integer GEMM: each output needs ONE weight scale "
            "to multiply after the sum over k, so use ql.PerChannel(0) or ql.PerTensor(). For group-wise weights "
            "use Int4WeightOnlyConfig(group_size=...), which dequantizes before the matmul"
        )


def _check_qtensor(weight, what: str) -> None:
    if not isinstance(weight, QTensor):
        raise ValueError(
            f"{what} is built from a QTensor of weight codes (ql.quantize_tensor(w, ...)), got {type(weight).__name__}; "
            f"to quantize a float layer use {what}.from_float(layer)"
        )


class _CachedKernels(nn.Module):
    """Holds the KernelCache and drops it whenever the canonical buffers are replaced."""

    def __init__(self) -> None:
        super().__init__()
        self._kernel_cache = KernelCache()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._kernel_cache.clear()

    def _apply(self, fn, recurse=True):
        self._kernel_cache.clear()
        return super()._apply(fn, recurse)


# ----------------------------------------------------------------------------- W8A8 modules
class _IntegerGEMM(_CachedKernels):
    """What QuantLinear and QuantConv2d share: int8 weight codes, and the rule that quantizes the input."""

    def _init_quant(self, weight: QTensor, bias, act_qtype: QType, act_granularity: Granularity, act_qparams) -> None:
        _check_weight_granularity(weight.granularity)
        if not weight.qtype.signed or weight.qtype.bits > 8:
            raise ValueError(f"weight_qtype must be a signed type of at most 8 bits (ql.int8, ql.int4, ...), "
                             f"got {weight.qtype!r}")
        if bool((weight.zero_point != 0).any()):
            raise ValueError("integer GEMM weights must be symmetric (zero_point = 0); an asymmetric weight adds a "
                             "term per activation row. Quantize the weight with symmetric=True")
        if act_qtype.bits > 8:
            raise ValueError(f"act_qtype must have at most 8 bits, got {act_qtype!r}")
        codes = weight.int_repr().reshape(weight.shape[0], -1).to(torch.int8)  # (N, K): a conv kernel flattened
        self.weight_qtype, self.weight_granularity, self.act_qtype = weight.qtype, weight.granularity, act_qtype
        self.register_buffer("weight_q", codes.contiguous())
        scale = weight.scale_values().float()
        self.register_buffer("weight_scale", scale.reshape(-1) if scale.dim() else scale)  # (N,) or ()
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # (N,)
        if act_qparams is None:  # dynamic: qparams from each input
            if act_granularity not in (PerToken(), PerTensor()):
                raise ValueError(f"dynamic activations need ql.PerToken() or ql.PerTensor(), got {act_granularity}")
            self.act_granularity = act_granularity
            self.register_buffer("act_scale", None)
            self.register_buffer("act_zero_point", None)
        else:  # static: qparams fixed by calibration
            if act_granularity != PerTensor():
                raise ValueError(f"static activations are quantized per tensor; got act_granularity={act_granularity}")
            self.act_granularity = PerTensor()
            scale, zero_point = static_qparams(act_qparams)
            self.register_buffer("act_scale", scale)
            self.register_buffer("act_zero_point", zero_point)

    @property
    def static(self) -> bool:
        """True if the activation qparams were fixed by calibration."""
        return self.act_scale is not None

    @property
    def act_symmetric(self) -> bool:
        return self.act_qtype.signed

    @property
    def act(self) -> ActQuant:
        """How the input is quantized, as the kernels take it."""
        return ActQuant(self.act_qtype, self.act_granularity, self.act_scale, self.act_zero_point)

    def qweight(self) -> QTensor:
        """The weight codes and scales as a QTensor ((N, K); a conv kernel flattened to C*kh*kw)."""
        return from_codes(self.weight_q, self.weight_scale, None, self.weight_qtype, self.weight_granularity, True)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """s_x s_w (x_q - z_x) w_q^T + b for x (..., K) -> (..., N) in x's dtype, on the registry's kernel."""
        x2 = x.reshape(-1, x.shape[-1]).float()  # (M, K)
        if getattr(self, "input_scale", None) is not None:  # explicit SmoothQuant factors (1/s), before quantizing
            x2 = x2 * self.input_scale
        y = kernels.call("linear_w8a8", x2, self.weight_q, self.weight_scale, self.act, self._kernel_cache)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def dequantize_weight(self) -> torch.Tensor:
        """The real weight the codes stand for, (N, K) float32."""
        return self.weight_q.float() * (self.weight_scale[:, None] if self.weight_scale.dim() else self.weight_scale)

    def _quant_repr(self) -> str:
        acts = f"static {self.act_qtype!r}" if self.static else f"dynamic {self.act_qtype!r} {self.act_granularity}"
        return f"weight={self.weight_qtype!r} {self.weight_granularity}, act={acts}"


def _weight_qtensor(weight: torch.Tensor, weight_qtype: QType, weight_granularity: Granularity,
                    weight_qparams: tuple[torch.Tensor, torch.Tensor] | None) -> QTensor:
    """Symmetric codes of a float weight (N, ...) with the given or freshly chosen per-channel/tensor qparams."""
    _check_weight_granularity(weight_granularity)
    w = weight.detach().float()
    if weight_qparams is None:
        return quantize_tensor(w, weight_qtype, weight_granularity, symmetric=True)
    scale, zero_point = (torch.as_tensor(t) for t in weight_qparams)
    if bool((zero_point != 0).any()):
        raise ValueError("integer GEMM weights must be symmetric (zero_point = 0); an asymmetric weight adds a "
                         "term per activation row. Quantize the weight with symmetric=True")
    q = quantize(w, scale, 0, weight_qtype, weight_granularity, symmetric=True)
    return from_codes(q, scale.float(), None, weight_qtype, weight_granularity, True)


class QuantLinear(_IntegerGEMM):
    """Linear layer computed as int8 x int8 -> int32 (W8A8), then rescaled to float.

    Buffers: weight_q (N, K) int8, weight_scale (N,) or (), bias (N,) float32, and for static
    activations act_scale, act_zero_point (). input_scale (K,), when given, multiplies the input before it
    is quantized (SmoothQuant's 1/s where no norm can absorb it; from_float takes it from a SmoothedLinear).
    Build with `QuantLinear(qt, bias, ...)` from weight codes or `QuantLinear.from_float(linear, ...)`.
    """

    def __init__(
        self,
        weight: QTensor,
        bias: torch.Tensor | None = None,
        *,
        act_qtype: QType = int8,
        act_granularity: Granularity = PerToken(),
        act_qparams=None,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        _check_qtensor(weight, "QuantLinear")
        if len(weight.shape) != 2:
            raise ValueError(f"QuantLinear needs a (out_features, in_features) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._init_quant(weight, bias, act_qtype, act_granularity, act_qparams)
        if input_scale is not None:
            input_scale = torch.as_tensor(input_scale).detach().float().reshape(-1)
            if input_scale.numel() != self.in_features or not bool(torch.isfinite(input_scale).all()):
                raise ValueError(f"input_scale must hold {self.in_features} finite factors (one per input channel), "
                                 f"got {input_scale.numel()}")
            input_scale = input_scale.clone()
        self.register_buffer("input_scale", input_scale)

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: torch.Tensor | None = None, **act) -> QuantLinear:
        return cls(qt, bias, **act)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        weight_qtype: QType = int8,
        weight_granularity: Granularity = PerChannel(0),
        act_qtype: QType | None = None,
        act_symmetric: bool | None = None,
        act_granularity: Granularity | None = None,
        act_qparams=None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> QuantLinear:
        """Quantize an nn.Linear. act_qparams=None: dynamic (per token by default); a (scale, zero_point)
        pair or an observer: static, per tensor. Activations are int8 if symmetric (the default), else uint8."""
        qt = _weight_qtensor(linear.weight, weight_qtype, weight_granularity, weight_qparams)
        act_granularity = act_granularity or (PerToken() if act_qparams is None else PerTensor())
        return cls(qt, linear.bias, act_qtype=act_qtype_for(act_qtype, act_symmetric),
                   act_granularity=act_granularity, act_qparams=act_qparams,
                   input_scale=getattr(linear, "input_scale", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_finite(x, "QuantLinear's input", NON_FINITE_INPUT)
        return self.matmul(x)  # quantize x, integer GEMM, rescale, + bias

    def extra_repr(self) -> str:
        smoothed = ", smoothed input" if self.input_scale is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._quant_repr()}{smoothed}"


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class QuantConv2d(_IntegerGEMM):
    """Conv2d as the same integer GEMM: im2col turns every output pixel into one row of patches.

    A per-token activation scale here is one scale per patch (per output pixel); per tensor is the usual
    choice for convolutions. Supports groups=1 and zero padding.
    """

    def __init__(
        self,
        weight: QTensor,
        bias: torch.Tensor | None = None,
        stride=1,
        padding=0,
        dilation=1,
        *,
        act_qtype: QType = int8,
        act_granularity: Granularity = PerTensor(),
        act_qparams=None,
    ) -> None:
        super().__init__()
        _check_qtensor(weight, "QuantConv2d")
        if len(weight.shape) != 4 or isinstance(padding, str):
            raise ValueError(f"QuantConv2d needs an (O, C, kh, kw) weight and numeric padding, got shape "
                             f"{tuple(weight.shape)}, padding={padding!r}")
        self.out_channels, self.in_channels = weight.shape[:2]
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self._init_quant(weight, bias, act_qtype, act_granularity, act_qparams)

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                     **act) -> QuantConv2d:
        return cls(qt, bias, stride, padding, dilation, **act)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        *,
        weight_qtype: QType = int8,
        weight_granularity: Granularity = PerChannel(0),
        act_qtype: QType | None = None,
        act_symmetric: bool | None = None,
        act_granularity: Granularity = PerTensor(),
        act_qparams=None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> QuantConv2d:
        """Quantize an nn.Conv2d (same arguments as QuantLinear.from_float; activations per tensor by default)."""
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"QuantConv2d supports groups=1, padding_mode='zeros' and numeric padding (got groups={conv.groups}, "
                f"padding_mode={conv.padding_mode!r}, padding={conv.padding!r}); exclude this layer from quantize_"
            )
        qt = _weight_qtensor(conv.weight, weight_qtype, weight_granularity, weight_qparams)
        return cls(qt, conv.bias, conv.stride, conv.padding, conv.dilation,
                   act_qtype=act_qtype_for(act_qtype, act_symmetric), act_granularity=act_granularity,
                   act_qparams=act_qparams)

    def im2col(self, x: torch.Tensor) -> torch.Tensor:
        """Patches (B, L, C*kh*kw): row l holds the inputs that output pixel l sees (same as F.unfold, transposed).

        Built as a strided view of the zero-padded input (Tensor.unfold), which on CPU is far faster than F.unfold.
        """
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        x = F.pad(x, (pw, pw, ph, ph))  # (B, C, H + 2ph, W + 2pw)
        windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # (B, C, H', W', kh_eff, kw_eff)
        windows = windows[..., ::dh, ::dw]  # (B, C, H', W', kh, kw): dilation skips inputs
        B, C, Ho, Wo = windows.shape[:4]
        return windows.permute(0, 2, 3, 1, 4, 5).reshape(B, Ho * Wo, C * kh * kw)  # (B, L, C*kh*kw)

    def output_size(self, x: torch.Tensor) -> tuple[int, int]:
        """(H_out, W_out) of the convolution for input x (B, C, H, W)."""
        return tuple(  # type: ignore[return-value]
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_finite(x, "QuantConv2d's input", NON_FINITE_INPUT)
        y = self.matmul(self.im2col(x))  # (B, L, O): one GEMM row per output pixel
        return y.transpose(1, 2).reshape(x.shape[0], self.out_channels, *self.output_size(x))  # (B, O, H', W')

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, {self._quant_repr()}")


# ----------------------------------------------------------------------------- weight-only modules
class WeightOnlyLinear(_CachedKernels):
    """Weight codes of any width and granularity, float activations: y = x @ dequantize(W)^T + b.

    Saves memory and bandwidth; the math stays in floating point (op "linear_weight_only": aten's int8/int4
    kernels with bf16 activations at small M, the FP32 reference otherwise). Buffers, all canonical:
    weight_qdata (codes; bit-packed in qlab's order below 8 bits), weight_scale, weight_zero_point (None if
    symmetric), weight_g_idx (None unless GPTQ act order), bias.
    """

    def __init__(self, weight: QTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        _check_qtensor(weight, type(self).__name__)
        if len(weight.shape) != 2:
            raise ValueError(f"{type(self).__name__} needs an (out_features, in_features) weight, got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight_qtype, self.weight_granularity, self.symmetric = weight.qtype, weight.granularity, weight.symmetric
        self.register_buffer("weight_qdata", weight.qdata)
        self.register_buffer("weight_scale", weight.scale_values().float())
        self.register_buffer("weight_zero_point", None if weight.symmetric else weight.zero_point.to(torch.int32))
        self.register_buffer("weight_g_idx", weight.g_idx)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: torch.Tensor | None = None) -> WeightOnlyLinear:
        return cls(qt, bias)

    def qweight(self) -> QTensor:
        """The stored weight as a QTensor (a view of the buffers, nothing copied)."""
        zero_point = self.weight_zero_point
        if zero_point is None:
            zero_point = torch.zeros(self.weight_scale.shape, dtype=torch.int32, device=self.weight_scale.device)
        return QTensor(self.weight_qdata, self.weight_scale, zero_point, self.weight_qtype, self.weight_granularity,
                       torch.Size((self.out_features, self.in_features)), self.symmetric, torch.float32, self.weight_g_idx)

    def _contiguous_groups(self) -> tuple[torch.Tensor, QTensor] | None:
        """GPTQ act order stores g_idx (column k uses group g_idx[k]); the fast kernels want groups of
        consecutive columns. Sorting the columns by group gives exactly that when every group has
        group_size members: W[:, perm] with x[:, perm] computes the same product. Derived once, cached,
        never saved (None if the groups are uneven: the reference kernel reads g_idx directly)."""
        key = ("g_idx order", str(self.weight_qdata.device))
        if key not in self._kernel_cache:
            g = self.weight_g_idx.long()
            gs = self.weight_granularity.group_size
            counts = torch.bincount(g, minlength=self.weight_scale.shape[1])
            entry = None
            if bool((counts == gs).all()):
                perm = torch.argsort(g, stable=True)  # (K,) columns of group 0, then group 1, ...
                qt = self.qweight()
                entry = (perm, from_codes(qt.int_repr()[:, perm], qt.scale, None if qt.symmetric else qt.zero_point,
                                          qt.qtype, qt.granularity, qt.symmetric))
            self._kernel_cache[key] = entry
        return self._kernel_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d, qt = x.reshape(-1, self.in_features), self.qweight()
        if self.weight_g_idx is not None and (reordered := self._contiguous_groups()) is not None:
            perm, qt = reordered
            x2d = x2d[:, perm]
        y = kernels.call("linear_weight_only", x2d, qt, self._kernel_cache)
        y = y.reshape(*x.shape[:-1], self.out_features)  # (..., N)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantize_weight(self) -> torch.Tensor:
        """The (N, K) float32 weight the codes stand for."""
        return self.qweight().dequantize()

    @property
    def packed_nbytes(self) -> int:
        """Bytes of codes plus qparams: what a batch-1 matmul must read from memory."""
        return self.qweight().nbytes

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={self.weight_qtype!r} {self.weight_granularity}")


class Int8WeightOnlyLinear(WeightOnlyLinear):
    """int8 weights (one scale per output channel by default), float activations.

    On CPUs with int8 dot products, calls with at most 16 rows run on fbgemm's int8 kernel, which
    quantizes each activation row to int8 inside the call (as llama.cpp's Q8_0 does): 3-5x faster, and a
    relative output error of about 0.009 instead of 0.005. `ql.kernels.disable("fbgemm int8 dot (cpu)")`
    keeps the activations in float.
    """

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_granularity: Granularity = PerChannel(0)) -> Int8WeightOnlyLinear:
        _check_weight_granularity(weight_granularity)
        return cls(quantize_tensor(linear.weight.detach().float(), int8, weight_granularity, symmetric=True), linear.bias)


def _group_divisors(K: int) -> list[int]:
    return [d for d in (32, 64, 128, 256, 512) if K % d == 0] or [d for d in range(1, K + 1) if K % d == 0][-4:]


class Int4WeightOnlyLinear(WeightOnlyLinear):
    """Group-wise 4-bit weights, two codes per byte, float activations.

    Codes: symmetric int4 in [-7, 7], or (symmetric=False, the default) uint4 in [0, 15] with a zero point
    per group.
    """

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False) -> Int4WeightOnlyLinear:
        K = linear.weight.shape[1]
        if not isinstance(group_size, int) or group_size < 1 or K % group_size:
            raise ValueError(f"group_size={group_size} must divide in_features={K}; try one of {_group_divisors(K)}")
        w = linear.weight.detach().float()
        return cls(quantize_tensor(w, int4 if symmetric else uint4, PerGroup(group_size), symmetric), linear.bias)

    @property
    def group_size(self) -> int:
        return self.weight_granularity.group_size
