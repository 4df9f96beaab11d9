"""FP8 linear layers: E4M3 / E5M2 codes with per-tensor, per-row or delayed scales, and the scaled FP8 matmul.

Micikevicius et al. 2022, "FP8 Formats for Deep Learning", https://arxiv.org/abs/2209.05433

Two 8-bit float formats (paper Table 1; torch dtypes):

    e4m3  torch.float8_e4m3fn  bias 7,  max 448,   no Inf, NaN = S.1111.111   weights and activations
    e5m2  torch.float8_e5m2    bias 15, max 57344, Inf and NaN (IEEE style)   gradients (range over precision)

FP8's range is too narrow for raw tensors (the paper's section 4.3: a 1.3B GPT cast without a scale reaches
perplexity 11.0 instead of 10.19; with per-tensor scales, 10.29), so every tensor is multiplied by a scale first:

    1) amax  = max |x| over a slice (the tensor, or one row)
    2) scale = fp8_max / amax / 2**margin              Transformer Engine's rule; margin backs off by powers of two
    3) x8    = cast(clamp(x * scale, -fp8_max, fp8_max))   round to nearest even
    4) x_hat = x8 * (1 / scale)                         `dequant_scale`, what torch._scaled_mm takes

and a GEMM of two scaled operands, a8 (M, K) and b8 (K, N), is

    5) y = (a8 @ b8) * scale_a * scale_b               dequant scales: () per tensor, (M, 1) and (1, N) per row

Conventions (tests/test_fp8.py checks each one):
- Clamp BEFORE the cast. torch's own cast of an out-of-range value depends on the format and the version: in
  torch 2.13 `float8_e4m3fn` saturates (1000 -> 448, Inf -> 448) but `float8_e5m2` overflows (61440 -> inf), and
  torch <= 2.11 did not saturate at all. With the clamp, both formats saturate on every version: ±Inf -> ±max.
- NaN stays NaN (clamp keeps it).
- amax that is 0, Inf or NaN gives a finite scale: the `fallback`, 1.0 unless you pass one. Transformer Engine
  keeps the previous step's scale in that case (`AmaxHistory` passes it); TE starts its scale buffer at 1.0,
  so 1.0 is its value at the first step. A NaN or Inf anywhere in a slice therefore makes that slice unscaled.
- A scale that would overflow float32 (amax below ~1e-36) is clamped to float32's max: always finite.

Recipes of `FP8Linear` (weights always use their own current amax, computed once when the layer is built):
    "tensorwise"  one activation scale per call, from the current input (torchao's default, TE's current scaling)
    "rowwise"     one scale per activation row (token) and per weight output channel (torchao's ROWWISE, without
                  its power-of-2 rounding of the scales)
    "delayed"     one activation scale per call from the amax of the PREVIOUS calls (TE's DelayedScaling with
                  amax_compute_algo="max"): no reduction over the input before the GEMM, at the cost of clipping
                  an input larger than any seen in the history window
    "unscaled"    no scale at all (1.0 for weights and activations): the paper's section 4.3 baseline, to see why
                  FP8 needs scales (small weights fall into E4M3's subnormals or flush to 0)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from . import kernels
from .api import QuantConfig, register_handler, register_quantized_module, swap_modules
from .core.checks import check_finite
from .core.granularity import Granularity, PerChannel, PerTensor, PerToken, check_granularity

FORMATS: MappingProxyType[str, torch.dtype] = MappingProxyType(
    {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
)
RECIPES = ("tensorwise", "rowwise", "delayed", "unscaled")
FP8_DTYPES = tuple(FORMATS.values())
TORCH_SCALED_MM_CPU = "torch._scaled_mm (cpu)"
TORCH_SCALED_MM_CUDA = "torch._scaled_mm (cuda)"


def fp8_dtype(fmt: str) -> torch.dtype:
    """The torch dtype of an FP8 format name ("e4m3" or "e5m2")."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not an FP8 format; use 'e4m3' (weights and activations, max 448) "
                         f"or 'e5m2' (gradients, max 57344)")
    return FORMATS[fmt]


def fp8_max(fmt: str) -> float:
    """The largest finite value of an FP8 format: 448.0 for e4m3, 57344.0 for e5m2."""
    return torch.finfo(fp8_dtype(fmt)).max


# ----------------------------------------------------------------------------- 1) scales
def amax_to_scale(amax: torch.Tensor | float, fmt: str, margin: int = 0,
                  fallback: torch.Tensor | float = 1.0) -> torch.Tensor:
    """The QUANTIZE scale for a slice with this amax (Transformer Engine's rule), float32, amax's shape.

    scale = fp8_max / amax / 2**margin, so the largest magnitude lands on fp8_max (or 2**margin below it).
    Where amax is 0, negative, Inf or NaN the scale is `fallback` (TE passes its previous scale, 1.0 at first).
    """
    amax = torch.as_tensor(amax, dtype=torch.float32)
    scale = fp8_max(fmt) / amax / 2.0**margin  # 2)
    usable = torch.isfinite(amax) & (amax > 0)
    scale = torch.where(usable, scale, torch.as_tensor(fallback, dtype=torch.float32, device=amax.device))
    return scale.clamp(max=torch.finfo(torch.float32).max)  # a tiny amax would overflow the scale to inf


def _amax(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """max |x| per slice, keeping dims so it broadcasts against x: () per tensor, (..., 1) per row."""
    a = x.abs()
    if isinstance(granularity, PerTensor):
        return a.amax()  # ()
    if isinstance(granularity, PerToken):
        return a.amax(dim=-1, keepdim=True)  # (..., 1)
    axis = granularity.axis % x.dim()
    others = [d for d in range(x.dim()) if d != axis]
    return a.amax(dim=others, keepdim=True) if others else a  # (1, .., C, .., 1)


def _check_input(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype in FP8_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} takes a float32, float16 or bfloat16 tensor, got {got}; "
                         "convert first (x.float()), or dequantize FP8 codes with qlab.fp8.dequantize")


def quantize(x: torch.Tensor, fmt: str = "e4m3", granularity: Granularity = PerTensor(),
             scale: torch.Tensor | None = None, margin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes of x and the dequant scale that multiplies them back (steps 1-4).

    Args:
        x: a float tensor. fmt: "e4m3" or "e5m2".
        granularity: ql.PerTensor(); ql.PerToken() (one scale per row: activations); ql.PerChannel(0) (one
            per output row of an (N, K) weight; any axis works).
        scale: the QUANTIZE scale (x8 = cast(x * scale)), e.g. from `AmaxHistory.scale_for`; it must broadcast
            against x. None computes it from x's current amax with `amax_to_scale(amax, fmt, margin)`.
        margin: headroom when the scale is computed here: the amax lands 2**margin below fp8_max.
    Returns:
        x8: x's shape in torch.float8_e4m3fn / float8_e5m2. x * scale is clamped to ±fp8_max before the cast
            (so ±Inf and overflow saturate in both formats; torch's e5m2 cast alone would give inf); NaN stays NaN.
        dequant_scale: float32 1 / scale; shape () per tensor, (..., 1) per row, (N, 1) for PerChannel(0).
    """
    _check_input(x, "quantize")
    dtype = fp8_dtype(fmt)
    if not isinstance(granularity, (PerTensor, PerToken, PerChannel)):
        raise ValueError(f"granularity={granularity!r} is not an FP8 scaling here; use ql.PerTensor(), ql.PerToken() "
                         "(one scale per activation row) or ql.PerChannel(0) (one per weight output row); block "
                         "scales (MXFP8's 32 values, DeepSeek's 1x128) are other recipes")
    check_granularity(x, granularity)
    x = x.float()
    if scale is None:
        scale = amax_to_scale(_amax(x, granularity), fmt, margin)  # 1) 2)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    limit = fp8_max(fmt)
    x8 = (x * scale).clamp(-limit, limit).to(dtype)  # 3) clamp first: the cast alone may overflow to inf
    return x8, scale.reciprocal()  # 4) the dequant scale


def dequantize(x8: torch.Tensor, dequant_scale: torch.Tensor) -> torch.Tensor:
    """x_hat = x8 * dequant_scale in float32 (x8: FP8 codes; dequant_scale as `quantize` returned it)."""
    if not isinstance(x8, torch.Tensor) or x8.dtype not in FP8_DTYPES:
        got = x8.dtype if isinstance(x8, torch.Tensor) else type(x8).__name__
        raise ValueError(f"dequantize takes FP8 codes (torch.float8_e4m3fn or float8_e5m2), got {got}")
    return x8.float() * dequant_scale.float()


# ----------------------------------------------------------------------------- 2) the scaled matmul
def check_scaled_mm_operands(a8: torch.Tensor, b8: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> None:
    """Raise ValueError unless a8 (M, K), b8 (K, N) are FP8 and the scales are () / (M, 1) and () / (1, N)."""
    if any(not isinstance(t, torch.Tensor) or t.dtype not in FP8_DTYPES for t in (a8, b8)):
        raise ValueError("scaled_mm multiplies FP8 codes (torch.float8_e4m3fn / float8_e5m2); get them from "
                         "qlab.fp8.quantize")
    if a8.dim() != 2 or b8.dim() != 2 or a8.shape[1] != b8.shape[0]:
        raise ValueError(f"scaled_mm needs a8 (M, K) and b8 (K, N); got shapes {tuple(a8.shape)} and "
                         f"{tuple(b8.shape)} (a weight W (N, K) goes in as W.t())")
    (M, _), N = a8.shape, b8.shape[1]
    for name, s, rowwise in (("scale_a", scale_a, (M, 1)), ("scale_b", scale_b, (1, N))):
        if not isinstance(s, torch.Tensor) or not (s.numel() == 1 or tuple(s.shape) == rowwise):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{name} must be a dequant scale of shape () (per tensor) or {rowwise} (per row), "
                             f"got {got}")


def scaled_mm(a8: torch.Tensor, b8: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype = torch.float32, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(a8 * scale_a) @ (b8 * scale_b) (+ bias), emulated in float32: the op's reference kernel (step 5).

    Shapes: a8 (M, K), b8 (K, N) FP8 codes; scale_a () or (M, 1), scale_b () or (1, N): DEQUANT scales, as
    torch._scaled_mm takes them; bias (N,) -> (M, N) in out_dtype.
    Exact up to the float32 accumulation: a product of two FP8 values (at most 4 + 4 significant bits, exponents
    2^-32 .. 2^32) is exact in float32, the K products are summed in float32 (the accumulator FP8 GEMMs use),
    and the scales multiply each output once, in the GEMM's epilogue.
    """
    check_scaled_mm_operands(a8, b8, scale_a, scale_b)
    acc = a8.float() @ b8.float()  # (M, N): exact products, float32 sums
    y = acc * scale_a.float() * scale_b.float()  # (M, N)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _torch_scaled_mm(a8: torch.Tensor, b8: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                     out_dtype: torch.dtype = torch.float32, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same op on torch._scaled_mm: row-major a, column-major b, 0-d or 2-D row-wise float32 scales."""
    (M, _), N = a8.shape, b8.shape[1]
    a, b = a8.contiguous(), b8.t().contiguous().t()  # (M, K) row-major, (K, N) column-major (free for W.t())
    tensorwise = scale_a.numel() == 1 and scale_b.numel() == 1
    if tensorwise:  # 0-d scales
        sa, sb = scale_a.float().reshape(()), scale_b.float().reshape(())
    else:  # rowwise: both scales 2-D, (M, 1) and (1, N)
        sa, sb = scale_a.float().expand(M, 1).contiguous(), scale_b.float().expand(1, N).contiguous()
    # float32 out, then the bias (CUDA takes only a 16-bit one) and ONE rounding to out_dtype, as the reference;
    # CUDA's rowwise GEMM has no float32 output (pytorch#156771): bf16 there, as torchao does
    gemm_dtype = torch.bfloat16 if a.is_cuda and not tensorwise else torch.float32
    y = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=gemm_dtype).float()  # (M, N)
    return (y if bias is None else y + bias.float()).to(out_dtype)


@functools.lru_cache(maxsize=None)
def torch_scaled_mm_works(device: str, a_dtype: torch.dtype, b_dtype: torch.dtype, rowwise: bool) -> bool:
    """Whether torch._scaled_mm runs this kind of operands on `device` and agrees with `scaled_mm` (tried once)."""
    if not hasattr(torch, "_scaled_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    a = (torch.randint(-8, 9, (16, 32), generator=g) / 4).to(device)  # (M, K) values exact in both formats
    b = (torch.randint(-8, 9, (16, 32), generator=g) / 4).to(device).t()  # (K, N) column-major
    sa, sb = torch.tensor(0.5), torch.tensor(0.25)
    if rowwise:
        sa, sb = sa.expand(16, 1), sb.expand(1, 16)  # (M, 1), (1, N)
    args = (a.to(a_dtype), b.to(b_dtype), sa.to(device), sb.to(device))
    try:
        y = _torch_scaled_mm(*args)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return bool(torch.allclose(y.float(), scaled_mm(*args).float(), rtol=1e-2, atol=1e-2))


def _supports(device_type: str):
    def supports(a8, b8, scale_a, scale_b, out_dtype=torch.float32, bias=None) -> bool:
        if a8.device.type != device_type or b8.device != a8.device:
            return False
        if device_type == "cuda" and (torch.cuda.get_device_capability(a8.device) < (8, 9)
                                      or a8.shape[1] % 16 or b8.shape[1] % 16):
            return False  # FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) or newer; K and N multiples of 16
        rowwise = scale_a.numel() > 1 or scale_b.numel() > 1
        return torch_scaled_mm_works(str(a8.device), a8.dtype, b8.dtype, rowwise)

    return supports


# On CPU torch._scaled_mm scales the operands first, (a.float() * sa) @ (b.float() * sb): it differs from the
# reference by float32 rounding (relative <= 3e-7 measured up to K = 4096) and is no faster than the reference.
# The bound 2^-8 covers a 16-bit out_dtype rounded differently (and CUDA's bf16 rowwise output rounded again).
kernels.register("scaled_mm", kernels.REFERENCE, lambda *args: True, scaled_mm, priority=-100)
kernels.register("scaled_mm", TORCH_SCALED_MM_CPU, _supports("cpu"), _torch_scaled_mm, priority=10, tolerance=2**-8)
kernels.register("scaled_mm", TORCH_SCALED_MM_CUDA, _supports("cuda"), _torch_scaled_mm, priority=10, tolerance=2**-8)


# ----------------------------------------------------------------------------- 3) delayed scaling
class AmaxHistory(nn.Module):
    """Delayed scaling's state: the amax of the last `history_len` tensors seen, and the last scale made from them.

    Buffers (in the state_dict): `history` (history_len,) float32, history[0] the most recent amax, 0 where
    nothing was recorded yet; `scale` () float32, the last scale `scale_for` returned (1.0 at first), which is
    reused where the history's amax is 0 or not finite, as Transformer Engine does.
    The scale is TE's amax_compute_algo="max": fp8_max / max(history) / 2**margin. TE's default history is
    1024 steps (since 2023; TE v0.1 had 1 step, "most_recent"); 16 was torchao's delayed-scaling default
    (`DelayedScalingConfig(history_len=16, scale_fn_name="max")`) until torchao deleted delayed scaling
    in February 2025. Our reference notes do not record why torchao chose 16.
    """

    def __init__(self, history_len: int = 16) -> None:
        super().__init__()
        if not isinstance(history_len, int) or history_len < 1:
            raise ValueError(f"history_len={history_len!r} must be a positive integer (torchao used 16, "
                             "Transformer Engine defaults to 1024)")
        self.register_buffer("history", torch.zeros(history_len))
        self.register_buffer("scale", torch.ones(()))

    @property
    def empty(self) -> bool:
        """True while no non-zero amax has been recorded."""
        return not bool(self.history.any())

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Roll the window (the oldest amax drops out) and record amax(|x|) as history[0]; returns that amax."""
        amax = x.detach().abs().amax().float()
        self.history.copy_(torch.roll(self.history, 1))
        self.history[0] = amax
        return amax

    @torch.no_grad()
    def scale_for(self, fmt: str, margin: int = 0) -> torch.Tensor:
        """The quantize scale from the max over the history; stored in `scale` and returned (a copy)."""
        self.scale.copy_(amax_to_scale(self.history.max(), fmt, margin, fallback=self.scale))
        return self.scale.clone()

    def extra_repr(self) -> str:
        return f"history_len={self.history.numel()}"


# ----------------------------------------------------------------------------- 4) the layer
@register_quantized_module
class FP8Linear(nn.Module):
    """A linear layer computing in FP8: weight codes stored, activations quantized per call, a scaled FP8 GEMM.

    Buffers: weight_fp8 (N, K) FP8 codes; weight_scale, the dequant scale, () or (N, 1) with recipe "rowwise";
    bias (N,) float32 or None; with recipe "delayed", act_amax.history and act_amax.scale (an `AmaxHistory`).
    forward runs `ql.kernels.call("scaled_mm", ...)`. Inference: the FP8 codes get no gradient.
    """

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 fmt: str = "e4m3", recipe: str = "tensorwise", amax_history_len: int = 16, margin: int = 0) -> None:
        super().__init__()
        _check_recipe(recipe)
        if weight_fp8.dim() != 2 or weight_fp8.dtype != fp8_dtype(fmt):
            raise ValueError(f"FP8Linear needs (out_features, in_features) codes in {fp8_dtype(fmt)}, got "
                             f"{weight_fp8.dtype} of shape {tuple(weight_fp8.shape)}; use FP8Linear.from_float")
        self.out_features, self.in_features = weight_fp8.shape
        self.fmt, self.recipe, self.margin = fmt, recipe, margin
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act_amax = AmaxHistory(amax_history_len) if recipe == "delayed" else None

    @classmethod
    def from_float(cls, linear: nn.Linear, fmt: str = "e4m3", recipe: str = "tensorwise",
                   amax_history_len: int = 16, margin: int = 0) -> FP8Linear:
        """Quantize an nn.Linear's weight (per output row with recipe "rowwise", else per tensor); bias stays float."""
        _check_recipe(recipe)
        granularity = PerChannel(0) if recipe == "rowwise" else PerTensor()
        unit = torch.ones(()) if recipe == "unscaled" else None
        w8, w_scale = quantize(linear.weight.detach(), fmt, granularity, unit, margin)  # (N, K), () or (N, 1)
        return cls(w8, w_scale, linear.bias, fmt, recipe, amax_history_len, margin)

    def _act_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """None (dynamic: quantize measures x) or, delayed, the scale from the previous calls' amax."""
        if self.recipe == "unscaled":
            return torch.ones((), device=x.device)
        if self.act_amax is None:
            return None
        if self.act_amax.empty:  # the first call has no history: use the current amax
            scale = amax_to_scale(x.detach().abs().amax(), self.fmt, self.margin)
        else:
            scale = self.act_amax.scale_for(self.fmt, self.margin)
        self.act_amax.update(x)  # this call's amax serves the next calls
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_finite(x, "FP8Linear's input", "clean or mask the data: an FP8 scale computed from NaN or Inf is NaN")
        x2 = x.reshape(-1, self.in_features)  # (M, K): every leading dim is a row
        granularity = PerToken() if self.recipe == "rowwise" else PerTensor()
        x8, x_scale = quantize(x2, self.fmt, granularity, self._act_scale(x2), self.margin)  # (M, K), () or (M, 1)
        y = kernels.call("scaled_mm", x8, self.weight_fp8.t(), x_scale, self.weight_scale.t(), torch.float32, None)
        y = y if self.bias is None else y + self.bias  # (M, N)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)  # (..., N)

    def dequantize_weight(self) -> torch.Tensor:
        """The (N, K) float32 weight the codes stand for."""
        return dequantize(self.weight_fp8, self.weight_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"recipe={self.recipe}, margin={self.margin}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------- 5) the config
def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r} is not an FP8 recipe here; use one of {RECIPES} (block scales such "
                         "as MXFP8 or DeepSeek's 1x128 are not implemented)")


@dataclass(frozen=True)
class FP8Config(QuantConfig):
    """Swap the selected nn.Linear layers for `FP8Linear`: FP8 weights and activations, a scaled FP8 GEMM.

    fmt: "e4m3" (the paper's choice for the forward pass) or "e5m2". recipe: "tensorwise", "rowwise" or
    "delayed" (see the module doc). amax_history_len: the delayed recipe's window. margin: scales are divided
    by 2**margin (headroom against outliers, TE's `margin`).
    """

    fmt: str = "e4m3"
    recipe: str = "tensorwise"
    amax_history_len: int = 16
    margin: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        fp8_dtype(self.fmt)
        _check_recipe(self.recipe)
        if not isinstance(self.amax_history_len, int) or self.amax_history_len < 1:
            raise ValueError(f"amax_history_len={self.amax_history_len!r} must be a positive integer (torchao used "
                             "16, Transformer Engine defaults to 1024)")
        if not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"margin={self.margin!r} must be an integer >= 0: scales are divided by 2**margin "
                             "to leave headroom; 0 puts the amax exactly on the format's max")


@register_handler(FP8Config)
def _fp8(model: nn.Module, config: FP8Config, calib_data) -> nn.Module:
    swap_modules(model, config, lambda name, lin: FP8Linear.from_float(lin, config.fmt, config.recipe,
                                                                       config.amax_history_len, config.margin))
    return model


__all__ = ["FORMATS", "RECIPES", "TORCH_SCALED_MM_CPU", "TORCH_SCALED_MM_CUDA", "fp8_dtype", "fp8_max",
           "amax_to_scale", "quantize", "dequantize", "check_scaled_mm_operands", "scaled_mm",
           "torch_scaled_mm_works", "AmaxHistory", "FP8Linear", "FP8Config"]
