"""The three primitives of uniform affine quantization: choose qparams, quantize, dequantize.

A real value x is represented by an integer code q through a `scale` (step size, a positive float)
and a `zero_point` (the code that stands for the real value 0):

    q     = clamp(round(x / scale) + zero_point, qmin, qmax)      quantize
    x_hat = (q - zero_point) * scale                              dequantize

round() is round-half-to-even (torch.round). Two ways to choose (scale, zero_point):

  symmetric   zero_point = 0,  scale = absmax / qmax
              signed codes are clamped to the *restricted* range [-qmax, qmax] (int8: [-127, 127]),
              so the grid is symmetric and -128 is never used.
  asymmetric  the range [min, max] is first widened to include 0 (so 0 is exactly representable:
              zero padding and ReLU zeros cost no error), then
              scale = (max - min) / (qmax - qmin),  zero_point = clamp(round(qmin - min / scale), qmin, qmax)
              and codes use the full range [qmin, qmax] (uint8: [0, 255]).

A slice whose values are all zero (or too tiny to matter) gets scale = 1, never 0, NaN or Inf.
Every function takes a granularity (see `qlab.core.granularity`) that says which elements share qparams.

Bad data is refused, never rounded into plausible numbers: NaN or Inf in x (`qlab.core.checks`), a scale
that is not positive and finite, a zero point that is not an integer code of the type, float codes.
"""

from __future__ import annotations

import torch

from .checks import check_finite
from .granularity import Granularity, PerTensor, expand, slices
from .qtypes import QType


def _check_float(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.as_tensor(...)")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; "
            f"convert it first, e.g. {name}.float()"
        )


def _check_qtype(qtype: QType) -> None:
    if not isinstance(qtype, QType):
        raise ValueError(f"qtype must be a ql.QType such as ql.int8 or ql.uint4, got {qtype!r}")


def _span(t: torch.Tensor) -> str:
    """'v' for one value, 'lo to hi' for several: what an error message shows of a qparam tensor."""
    return f"{t.min().item():.4g}" if t.numel() == 1 else f"{t.min().item():.4g} to {t.max().item():.4g}"


def _check_qparams(
    scale: torch.Tensor | float, zero_point: torch.Tensor | int, device: torch.device, qtype: QType | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) tensors, refused unless every scale is positive and finite and the zero
    points are integers (codes of `qtype`, when given). One device sync when they are fine."""
    if isinstance(zero_point, float) or (isinstance(zero_point, torch.Tensor) and zero_point.is_floating_point()):
        raise ValueError(f"zero_point must hold integers (it is a code), got {zero_point!r}; round it first, "
                         "e.g. torch.round(z).to(torch.int32), or take it from ql.choose_qparams")
    scale = torch.as_tensor(scale, dtype=torch.float32, device=device)
    zero_point = torch.as_tensor(zero_point, device=device)
    scale_ok = ((scale > 0) & torch.isfinite(scale)).all()
    in_range = True if qtype is None else ((zero_point >= qtype.qmin) & (zero_point <= qtype.qmax)).all()
    if not bool(scale_ok & in_range):
        if not bool(scale_ok):
            raise ValueError(f"scale must be positive and finite everywhere, got {_span(scale)}; "
                             "compute it with ql.choose_qparams")
        raise ValueError(f"zero_point must be a code of {qtype!r}, in [{qtype.qmin}, {qtype.qmax}], got "
                         f"{_span(zero_point)}; take it from ql.choose_qparams with the same qtype")
    return scale, zero_point.to(torch.int32)


def _float32_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The scales chosen for x as float32, refusing NaN/Inf data and ranges no float32 scale can cover.

    One check on the few scales, not on all of x: NaN and Inf in x carry into min, max and the scale.
    """
    scale = scale.float()
    if not bool(torch.isfinite(scale).all()):
        check_finite(x)  # raises if x holds NaN or Inf, with the count and position
        raise ValueError(f"x spans [{x.min().item():.4g}, {x.max().item():.4g}], too wide for float32 scales (largest "
                         f"float32: {torch.finfo(torch.float32).max:.4g}); divide x by a power of two first (and "
                         "multiply the dequantized result back), or use more bits")
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(scale > tiny, scale, torch.ones_like(scale))


def choose_qparams(
    x: torch.Tensor,
    qtype: QType,
    granularity: Granularity = PerTensor(),
    symmetric: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick (scale, zero_point) so that the codes of `qtype` cover the values of `x`.

    Args:
        x: floating-point tensor (weights or activations).
        qtype: the integer type of the codes, e.g. ql.int8.
        granularity: which elements share one pair (default: the whole tensor).
        symmetric: zero_point = 0 and scale = absmax / qmax if True; else min/max affine (module docstring).

    Returns:
        scale (float32) and zero_point (int32), both of shape `qlab.core.granularity.qparam_shape(x, granularity)`.
    """
    _check_float(x)
    _check_qtype(qtype)
    s = slices(x.detach().float(), granularity)  # each slice along the last axis
    if s.shape[-1] == 0:
        raise ValueError(f"cannot choose qparams for an empty tensor of shape {tuple(x.shape)}")
    if symmetric:
        scale = _float32_scale(x, s.abs().amax(dim=-1) / qtype.qmax)
        if not qtype.signed and bool((s.amin() < 0).item()):  # (ReLU outputs are fine: -0.0 < 0 is False)
            raise ValueError(f"symmetric {qtype!r} has zero_point 0 and no negative codes, but x goes down to "
                             f"{s.amin().item():.4g}; use a signed type (ql.int{qtype.bits}) for symmetric, or "
                             f"symmetric=False to give {qtype!r} a zero point")
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return scale, zero_point
    lo = s.amin(dim=-1).clamp(max=0.0)  # widen the range to include 0
    hi = s.amax(dim=-1).clamp(min=0.0)
    levels = qtype.qmax - qtype.qmin
    scale = (hi - lo) / levels  # float32, as torch.ao computes it
    # max - min of finite float32 data can overflow float32 (+-3e38 gives 6e38): redo those slices in float64
    scale = _float32_scale(x, torch.where(torch.isinf(scale), (hi.double() - lo.double()) / levels, scale))
    zero_point = torch.round(qtype.qmin - lo / scale).clamp(qtype.qmin, qtype.qmax).to(torch.int32)
    return scale, zero_point


def _code_range(qtype: QType, symmetric: bool) -> tuple[int, int]:
    """Lowest and highest allowed code: signed symmetric quantization uses the restricted [-qmax, qmax]."""
    if qtype.signed and symmetric:
        return -qtype.qmax, qtype.qmax
    return qtype.qmin, qtype.qmax


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    qtype: QType,
    granularity: Granularity = PerTensor(),
    symmetric: bool | None = None,
) -> torch.Tensor:
    """Map `x` to integer codes: clamp(round(x / scale) + zero_point, qmin, qmax).

    symmetric=True clamps signed codes to the restricted range [-qmax, qmax]; symmetric=False uses the
    full [qmin, qmax] (an asymmetric int8 grid whose zero point happens to be 0 keeps code -128).
    None (the default) means symmetric exactly when every zero point is 0: pass the flag you gave
    choose_qparams when you have it.

    Returns:
        a tensor of x's shape holding the codes, dtype int8 (signed qtype) or uint8 (unsigned),
        one code per element (not bit-packed; see ql.pack_int4 and ql.quantize_tensor for that).
    """
    _check_float(x)
    _check_qtype(qtype)
    check_finite(x)
    scale, zero_point = _check_qparams(scale, zero_point, x.device, qtype)
    s = expand(scale, x, granularity)
    z = expand(zero_point, x, granularity)
    if symmetric is None:
        symmetric = not bool((zero_point != 0).any())
    lowest, highest = _code_range(qtype, symmetric)
    q = (torch.round(x.float() / s) + z).clamp(lowest, highest)
    return q.to(qtype.storage_dtype)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    granularity: Granularity = PerTensor(),
) -> torch.Tensor:
    """Map integer codes back to real values: (q - zero_point) * scale, as float32.

    Like quantize, it refuses float codes, a scale that is not positive and finite, and a float zero point.
    """
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor of integer codes, got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex():
        raise ValueError(f"q must hold integer codes (ql.quantize returns int8 or uint8), got dtype {q.dtype}; "
                         "quantize first, or convert codes that were stored as floats: q.round().to(torch.int32)")
    scale, zero_point = _check_qparams(scale, zero_point, q.device)
    s = expand(scale, q, granularity)
    z = expand(zero_point, q, granularity)
    return (q.to(torch.int32) - z).float() * s


def fake_quantize(
    x: torch.Tensor,
    qtype: QType,
    granularity: Granularity = PerTensor(),
    symmetric: bool = True,
) -> torch.Tensor:
    """Quantize then dequantize `x` with qparams chosen from `x` itself: the value each element becomes.

    Returns a tensor of x's shape and dtype. No gradient flows through round() here; for training use
    the straight-through estimator in qlab's QAT module.
    """
    scale, zero_point = choose_qparams(x, qtype, granularity, symmetric)
    q = quantize(x, scale, zero_point, qtype, granularity, symmetric)
    return dequantize(q, scale, zero_point, granularity).to(x.dtype)
