"""Quantized layers that really compute in integers: drop-in replacements for nn.Linear and nn.Conv2d.

W8A8 (weights and activations in 8 bits; the integer GEMM of Jacob et al. 2018,
https://arxiv.org/abs/1712.05877). With x ~ s_x (x_q - z_x) and W ~ s_w w_q (symmetric weights, z_w = 0):

    y[m, n] = s_x[m] * s_w[n] * sum_k (x_q[m, k] - z_x[m]) * w_q[n, k]  +  b[n]
            = s_x[m] * s_w[n] * (acc[m, n] - z_x[m] * rowsum(w_q)[n])   +  b[n],   acc = x_q @ w_q^T  (int32)

so the whole reduction over k runs on int8 codes with an int32 accumulator (`ql.kernels.int_mm`), and the
floats only enter once per output element. The zero-point term needs one row sum of the weight codes;
symmetric activations (z_x = 0, the default) skip it. Unsigned 8-bit codes (uint8, [0, 255]) do not fit
int8, so they are shifted by 128 first and the shift is folded into the zero point:
(x_q - z_x) = ((x_q - 128) - (z_x - 128)).

    QuantLinear         W8A8 linear: activation scales per token at run time (dynamic) or from calibration (static)
    QuantConv2d         the same GEMM on im2col patches (F.unfold): one row per output pixel
    Int8WeightOnlyLinear   int8 weights, float activations: x @ (s_w * w_q)^T
    Int4WeightOnlyLinear   group-wise 4-bit weights, bit-packed, float activations

Build them with `from_float(module, ...)` or, for a whole model, with `ql.quantize_(model, config)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .core.granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken, expand
from .core.packing import pack_int4
from .core.primitives import choose_qparams, dequantize, quantize
from .core.qtypes import QType, int4, int8, uint4, uint8

WEIGHT_GRANULARITIES = (PerChannel(0), PerTensor())


# ----------------------------------------------------------------------------- the math, as tensor functions
def int8_codes(q: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of any qtype up to 8 bits as int8 (what the GEMM takes), with the zero point shifted to match.

    Unsigned codes (uint8 [0, 255], uint4 [0, 15]) are shifted by -128 and so is the zero point; the
    difference (q - zero_point), which is all the GEMM needs, is unchanged. Signed codes already fit.
    """
    if q.dtype == torch.uint8:  # unsigned codes: shift [0, 255] down to [-128, 127]
        return (q.to(torch.int16) - 128).to(torch.int8), zero_point - 128
    return q.to(torch.int8), zero_point


def int8_gemm(x_q: torch.Tensor, x_zero_point: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact integer part of a quantized linear layer: sum_k (x_q[..., k] - z_x) * w_q[n, k], as int32.

    Shapes: x_q (..., K) int8, x_zero_point () or (..., 1) int32, w_q (N, K) int8 -> (..., N) int32.
    """
    acc = kernels.int_mm(x_q.reshape(-1, x_q.shape[-1]), w_q.t())  # (M, N) = x_q @ w_q^T
    acc = acc.reshape(*x_q.shape[:-1], w_q.shape[0])  # (..., N)
    if bool((x_zero_point != 0).any()):
        acc = acc - x_zero_point * w_q.sum(dim=1, dtype=torch.int32)  # (..., 1) * (N,): the zero-point term
    return acc


def rescale(
    acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Back to real numbers: y = s_x * s_w * acc + b.  Shapes: acc (..., N), x_scale () or (..., 1), w_scale () or (N,)."""
    y = acc.float() * x_scale * w_scale
    return (y if bias is None else y + bias).to(dtype)


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


def _check_weight_granularity(granularity: Granularity) -> None:
    if granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(
            f"granularity_w={granularity} does not fit an integer GEMM: each output needs ONE weight scale to "
            "multiply after the sum over k, so use ql.PerChannel(0) or ql.PerTensor(). For group-wise weights "
            "use Int4WeightOnlyConfig(group_size=...), which dequantizes before the matmul"
        )


def _check_weight_qtype(qtype: QType) -> None:
    if not qtype.signed or qtype.bits > 8:
        raise ValueError(f"weight_qtype must be a signed type of at most 8 bits (ql.int8, ql.int4, ...), got {qtype!r}")


# ----------------------------------------------------------------------------- W8A8 modules
class _IntegerGEMM(nn.Module):
    """What QuantLinear and QuantConv2d share: integer weights, and the rule that quantizes the input."""

    def _init_quant(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_qtype: QType,
        granularity_w: Granularity,
        act_qtype: QType,
        act_granularity: Granularity,
        act_qparams,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        _check_weight_granularity(granularity_w)
        _check_weight_qtype(weight_qtype)
        if act_qtype.bits > 8:
            raise ValueError(f"act_qtype must have at most 8 bits, got {act_qtype!r}")
        w = weight.detach().float().reshape(weight.shape[0], -1)  # (N, K): a conv kernel flattened to C*kh*kw
        if weight_qparams is None:
            weight_qparams = choose_qparams(w, weight_qtype, granularity_w, symmetric=True)
        scale, zero_point = weight_qparams
        if bool((torch.as_tensor(zero_point) != 0).any()):
            raise ValueError("integer GEMM weights must be symmetric (zero_point = 0); an asymmetric weight adds a "
                             "term per activation row. Quantize the weight with symmetric=True")
        self.weight_qtype, self.granularity_w, self.act_qtype = weight_qtype, granularity_w, act_qtype
        self.register_buffer("weight_q", quantize(w, scale, 0, weight_qtype, granularity_w).to(torch.int8))  # (N, K)
        self.register_buffer("weight_scale", scale.float().reshape(-1) if scale.dim() else scale.float())  # (N,) or ()
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

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int8 codes of x (..., K) and their scale and zero point, shaped to broadcast: () or (..., 1)."""
        if self.static:
            scale, zero_point = self.act_scale, self.act_zero_point
        else:
            scale, zero_point = choose_qparams(x, self.act_qtype, self.act_granularity, self.act_symmetric)
        q = quantize(x, scale, zero_point, self.act_qtype, self.act_granularity)  # (..., K)
        q, zero_point = int8_codes(q, zero_point)
        return q, expand(scale, x[..., :1], self.act_granularity), expand(zero_point, x[..., :1], self.act_granularity)

    def dequantize_weight(self) -> torch.Tensor:
        """The real weight the codes stand for, (N, K) float32."""
        return self.weight_q.float() * (self.weight_scale[:, None] if self.weight_scale.dim() else self.weight_scale)

    def _quant_repr(self) -> str:
        acts = f"static {self.act_qtype!r}" if self.static else f"dynamic {self.act_qtype!r} {self.act_granularity}"
        return f"weight={self.weight_qtype!r} {self.granularity_w}, act={acts}"


class QuantLinear(_IntegerGEMM):
    """Linear layer computed as int8 x int8 -> int32 (W8A8), then rescaled to float.

    Buffers: weight_q (N, K) int8, weight_scale (N,) or (), bias (N,) float32, and for static
    activations act_scale, act_zero_point (). Build with `QuantLinear.from_float(linear, ...)`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        weight_qtype: QType = int8,
        granularity_w: Granularity = PerChannel(0),
        act_qtype: QType = int8,
        act_granularity: Granularity = PerToken(),
        act_qparams=None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"QuantLinear needs a (out_features, in_features) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._init_quant(weight, bias, weight_qtype, granularity_w, act_qtype, act_granularity, act_qparams, weight_qparams)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        granularity_w: Granularity = PerChannel(0),
        act_granularity: Granularity | None = None,
        act_symmetric: bool = True,
        act_qparams=None,
        weight_qtype: QType = int8,
        act_qtype: QType | None = None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> QuantLinear:
        """Quantize an nn.Linear. act_qparams=None: dynamic (per token by default); a (scale, zero_point)
        pair or an observer: static, per tensor. Activations are int8 if act_symmetric else uint8."""
        act_qtype = act_qtype or (int8 if act_symmetric else uint8)
        act_granularity = act_granularity or (PerToken() if act_qparams is None else PerTensor())
        return cls(linear.weight, linear.bias, weight_qtype=weight_qtype, granularity_w=granularity_w,
                   act_qtype=act_qtype, act_granularity=act_granularity, act_qparams=act_qparams,
                   weight_qparams=weight_qparams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale, x_zero_point = self.quantize_input(x)  # (..., K) int8 codes; qparams () or (..., 1)
        acc = int8_gemm(x_q, x_zero_point, self.weight_q)  # (..., N) int32 = sum_k (x_q - z_x) w_q
        return rescale(acc, x_scale, self.weight_scale, self.bias, x.dtype)  # s_x s_w acc + b

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._quant_repr()}"


class QuantConv2d(_IntegerGEMM):
    """Conv2d as the same integer GEMM: im2col turns every output pixel into one row of patches.

    A per-token activation scale here is one scale per patch (per output pixel); per tensor is the usual
    choice for convolutions. Supports groups=1 and zero padding.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        *,
        weight_qtype: QType = int8,
        granularity_w: Granularity = PerChannel(0),
        act_qtype: QType = int8,
        act_granularity: Granularity = PerTensor(),
        act_qparams=None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"QuantConv2d supports groups=1, padding_mode='zeros' and numeric padding (got groups={conv.groups}, "
                f"padding_mode={conv.padding_mode!r}, padding={conv.padding!r}); exclude this layer from quantize_"
            )
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        self._init_quant(conv.weight, conv.bias, weight_qtype, granularity_w, act_qtype, act_granularity, act_qparams, weight_qparams)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        *,
        granularity_w: Granularity = PerChannel(0),
        act_granularity: Granularity = PerTensor(),
        act_symmetric: bool = True,
        act_qparams=None,
        weight_qtype: QType = int8,
        act_qtype: QType | None = None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> QuantConv2d:
        """Quantize an nn.Conv2d (same arguments as QuantLinear.from_float; activations per tensor by default)."""
        act_qtype = act_qtype or (int8 if act_symmetric else uint8)
        return cls(conv, weight_qtype=weight_qtype, granularity_w=granularity_w, act_qtype=act_qtype,
                   act_granularity=act_granularity, act_qparams=act_qparams, weight_qparams=weight_qparams)

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
        x_q, x_scale, x_zero_point = self.quantize_input(self.im2col(x))  # (B, L, C*kh*kw) int8
        acc = int8_gemm(x_q, x_zero_point, self.weight_q)  # (B, L, O) int32
        y = rescale(acc, x_scale, self.weight_scale, self.bias, x.dtype)  # (B, L, O)
        return y.transpose(1, 2).reshape(x.shape[0], self.out_channels, *self.output_size(x))  # (B, O, H', W')

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, {self._quant_repr()}")


# ----------------------------------------------------------------------------- weight-only modules
class Int8WeightOnlyLinear(nn.Module):
    """int8 weights (one scale per output channel), float activations: y = x @ (s_w * w_q)^T + b.

    Saves memory and bandwidth (1 byte per weight instead of 4); the math stays in floating point.
    """

    def __init__(self, linear: nn.Linear, granularity_w: Granularity = PerChannel(0)) -> None:
        super().__init__()
        _check_weight_granularity(granularity_w)
        self.out_features, self.in_features = linear.weight.shape
        w = linear.weight.detach().float()
        scale, _ = choose_qparams(w, int8, granularity_w, symmetric=True)
        self.register_buffer("weight_q", quantize(w, scale, 0, int8, granularity_w))  # (N, K) int8
        self.register_buffer("weight_scale", scale.expand(self.out_features).clone())  # (N,)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.int8_weight_only_mm(x.reshape(-1, self.in_features), self.weight_q, self.weight_scale)  # (M, N)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantize_weight(self) -> torch.Tensor:
        return dequantize(self.weight_q, self.weight_scale, 0, PerChannel(0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=ql.int8 PerChannel(axis=0)"


class Int4WeightOnlyLinear(nn.Module):
    """Group-wise 4-bit weights, two codes per byte, float activations.

    layout "tinygemm": the packed layout of torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu);
    layout "plain": ql.pack_int4's layout, run by the reference dequantize-then-matmul. Both hold
    N * K / 2 bytes of codes; "auto" picks tinygemm where the kernel accepts the shape.
    Codes: symmetric int4 in [-7, 7], or (symmetric=False, the default) uint4 in [0, 15] with a zero point.
    """

    def __init__(self, linear: nn.Linear, group_size: int = 128, symmetric: bool = False, layout: str = "auto") -> None:
        super().__init__()
        N, K = linear.weight.shape  # (out_features, in_features)
        if K % group_size:
            divisors = [d for d in (32, 64, 128, 256, 512) if K % d == 0] or [d for d in range(1, K + 1) if K % d == 0][-4:]
            raise ValueError(f"group_size={group_size} must divide in_features={K}; try one of {divisors}")
        if layout not in ("auto", "tinygemm", "plain"):
            raise ValueError(f"layout must be 'auto', 'tinygemm' or 'plain', got {layout!r}")
        device = linear.weight.device
        fits = kernels.cpu.int4_weight_only_supported(N, group_size, device)
        if layout == "tinygemm" and not fits:
            raise ValueError(
                f"the tinygemm int4 kernel needs a CPU tensor, out_features % 16 == 0 and group_size in "
                f"{kernels.cpu.INT4_GROUP_SIZES}; got out_features={N}, group_size={group_size} on {device}. Use layout='plain'"
            )
        self.layout = "tinygemm" if layout == "tinygemm" or (layout == "auto" and fits) else "plain"
        self.in_features, self.out_features, self.group_size, self.symmetric = K, N, group_size, symmetric
        self.qtype = int4 if symmetric else uint4
        w = linear.weight.detach().float()
        scale, zero_point = choose_qparams(w, self.qtype, PerGroup(group_size), symmetric)  # (N, K // g) each
        codes = quantize(w, scale, zero_point, self.qtype, PerGroup(group_size))  # (N, K)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        if self.layout == "tinygemm":
            self.register_buffer("weight_packed", kernels.cpu.pack_int4_weight(codes, symmetric))  # (N, K // 2) uint8
            self.register_buffer("scales_and_zeros", kernels.cpu.scales_and_zeros(scale, zero_point, symmetric))  # (K // g, N, 2)
        else:
            self.register_buffer("weight_packed", pack_int4(codes))  # (N * K // 2,) uint8
            self.register_buffer("scale", scale)  # (N, K // g)
            self.register_buffer("zero_point", None if symmetric else zero_point)  # (N, K // g) int32

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) @ W^T -> (M, N) on this layout's kernel."""
        if self.layout == "tinygemm":
            return kernels.int4_weight_only_mm(x, self.weight_packed, self.group_size, self.scales_and_zeros)
        zero_point = torch.zeros_like(self.scale, dtype=torch.int32) if self.zero_point is None else self.zero_point
        return kernels.int4_weight_only_mm_reference(
            x, self.weight_packed, self.scale, zero_point, (self.out_features, self.in_features), self.group_size, self.symmetric
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, self.in_features))  # (M, N)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantize_weight(self) -> torch.Tensor:
        """The (N, K) float32 weight the codes stand for (tinygemm layout: read back through the kernel as I @ W^T)."""
        eye = torch.eye(self.in_features, device=self.weight_packed.device)  # (K, K)
        return self._matmul(eye).t().float()  # (N, K)

    @property
    def packed_nbytes(self) -> int:
        """Bytes of packed codes plus qparams: what a batch-1 matmul must read from memory."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "bias")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={self.qtype!r} PerGroup({self.group_size}), layout={self.layout!r}")

