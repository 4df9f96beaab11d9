"""Number formats below float32 (FP16, BF16, FP8, FP4, NF4): their specs and round-to-format.

A *minifloat* stores a number in ``1 + e + m`` bits: a sign bit ``s``, an exponent
field ``E`` of ``e`` bits and a mantissa (fraction) field ``M`` of ``m`` bits::

    fp16      s EEEEE MMMMMMMMMM       e=5, m=10, bias=15
    bf16      s EEEEEEEE MMMMMMM       e=8, m=7,  bias=127
    fp8_e4m3  s EEEE MMM               e=4, m=3,  bias=7
    fp8_e5m2  s EEEEE MM               e=5, m=2,  bias=15
    fp4       s EE M                   e=2, m=1,  bias=1

The bits decode to a value as::

    normal     (E >= 1):  (-1)^s * 2^(E - bias) * (1 + M / 2^m)
    subnormal  (E == 0):  (-1)^s * 2^(1 - bias) * (0 + M / 2^m)

So inside one *binade* [2^k, 2^(k+1)) the representable numbers are evenly spaced,
``2^(k - m)`` apart, and the spacing doubles from one binade to the next: the
relative error of rounding is about ``2^-(m+1)`` everywhere, which is why floats
suit weights and activations whose magnitudes span many orders. Subnormals keep
the spacing of the smallest binade all the way down to zero.

What the all-ones exponent field means differs between formats, and decides the
largest finite value:

- IEEE style (fp32, fp16, bf16, fp8_e5m2): ``E = 11...1`` is reserved for ±inf
  (``M = 0``) and NaN (``M != 0``).
- OCP "fn" style (fp8_e4m3): no infinity; only ``E = 1111, M = 111`` is NaN, so
  ``E = 1111`` still holds finite values and the maximum is 1.75 * 2^8 = 448.
- No specials (fp4 E2M1, OCP MX spec): every encoding is a finite number.

NF4 (QLoRA, https://arxiv.org/abs/2305.14314) is not a float format: its 16
levels are quantiles of a standard normal distribution, rescaled to [-1, 1]. A
block of weights is divided by its absolute maximum before being rounded to the
nearest level; :func:`round_to_format` with ``"nf4"`` does only the rounding step.

Everything here is computed from the bit layout; torch's own casts
(``x.half()``, ``x.to(torch.float8_e4m3fn)``) are used only as oracles in tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from types import MappingProxyType

import torch

__all__ = [
    "FloatFormat",
    "NF4Format",
    "FORMATS",
    "nf4_codebook",
    "round_to_format",
    "representable_values",
    "spacing",
]


@dataclass(frozen=True)
class FloatFormat:
    """Spec of a sign/exponent/mantissa floating-point format, derived from its bit layout.

    You give the layout (``exponent_bits``, ``mantissa_bits``, ``bias``) and how the
    all-ones exponent is used (``has_inf``, ``has_nan``); the range fields
    (``max_finite``, ``min_normal``, ``min_subnormal``, ...) are computed from it.
    Define your own format to experiment, e.g.
    ``FloatFormat("fp6_e3m2", exponent_bits=3, mantissa_bits=2, has_inf=False,
    has_nan=False, saturates=True)``, and pass it to :func:`round_to_format`.

    Args:
        name: short name, e.g. ``"fp8_e4m3"``.
        exponent_bits: ``e``, width of the exponent field.
        mantissa_bits: ``m``, width of the fraction field (explicitly stored bits).
        bias: exponent bias; ``None`` means the usual ``2^(e-1) - 1``.
        has_inf: the all-ones exponent with ``M = 0`` encodes ±inf (IEEE style;
            then every other ``M`` there is NaN, so ``has_nan`` must be True).
        has_nan: some encoding is NaN. Without ``has_inf`` this is the OCP "fn"
            style: only all-ones exponent *and* all-ones mantissa is NaN.
        saturates: what overflow does in :func:`round_to_format`. True: clamp to
            ±max_finite (inf inputs too). False: ±inf if the format has it, else NaN.
        description: one line for tables in the book.

    Computed fields:
        bits: ``1 + e + m``.
        min_exponent: exponent of the smallest normal binade, ``1 - bias``.
        max_exponent: exponent of the binade holding ``max_finite``.
        max_finite: largest finite value.
        min_normal: ``2^min_exponent``.
        min_subnormal: ``2^(min_exponent - m)``, the smallest positive value.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int | None = None
    has_inf: bool = True
    has_nan: bool = True
    saturates: bool = False
    description: str = ""
    bits: int = field(init=False)
    min_exponent: int = field(init=False)
    max_exponent: int = field(init=False)
    max_finite: float = field(init=False)
    min_normal: float = field(init=False)
    min_subnormal: float = field(init=False)

    def __post_init__(self) -> None:
        e, m = self.exponent_bits, self.mantissa_bits
        if e < 1 or m < 0:
            raise ValueError(
                f"{self.name}: need exponent_bits >= 1 and mantissa_bits >= 0, got e={e}, m={m}"
            )
        if self.has_inf and not self.has_nan:
            raise ValueError(
                f"{self.name}: has_inf=True reserves the whole all-ones exponent (IEEE style), "
                "whose non-zero mantissas are NaN; set has_nan=True"
            )
        if self.has_nan and not self.has_inf and m == 0:
            raise ValueError(
                f"{self.name}: the 'fn' NaN encoding (all-ones exponent and mantissa) needs "
                "mantissa_bits >= 1"
            )
        if not (self.saturates or self.has_inf or self.has_nan):
            raise ValueError(
                f"{self.name}: with no inf and no NaN, overflow has nowhere to go; "
                "set saturates=True"
            )
        bias = 2 ** (e - 1) - 1 if self.bias is None else self.bias

        # Largest finite encoding: IEEE reserves the top exponent field; "fn" reserves
        # only its all-ones mantissa; a format without specials reserves nothing.
        top_field = 2**e - 2 if self.has_inf else 2**e - 1
        top_mantissa = 2**m - 2 if (self.has_nan and not self.has_inf) else 2**m - 1
        min_exponent = 1 - bias
        max_exponent = top_field - bias
        if max_exponent < min_exponent:
            raise ValueError(f"{self.name}: bias={bias} leaves no normal numbers")
        # Results are returned as float32, so the format must be a subset of float32.
        if m > 23 or max_exponent > 127 or min_exponent - m < -149:
            raise ValueError(
                f"{self.name}: e={e}, m={m}, bias={bias} does not fit inside float32 "
                "(need m <= 23, max exponent <= 127, smallest subnormal >= 2^-149)"
            )
        set_ = object.__setattr__  # frozen dataclass: computed fields are set once here
        set_(self, "bias", bias)
        set_(self, "bits", 1 + e + m)
        set_(self, "min_exponent", min_exponent)
        set_(self, "max_exponent", max_exponent)
        set_(self, "max_finite", math.ldexp(2**m + top_mantissa, max_exponent - m))
        set_(self, "min_normal", math.ldexp(1.0, min_exponent))
        set_(self, "min_subnormal", math.ldexp(1.0, min_exponent - m))


@dataclass(frozen=True)
class NF4Format:
    """Spec of NF4, the 4-bit NormalFloat codebook of QLoRA: 16 levels, no exponent or mantissa.

    Values are meant to be block-absmax-normalized to [-1, 1] first (divide each
    block of weights by its largest magnitude); each one is then stored as the
    4-bit index of the nearest level. The float-layout fields are ``None`` so that
    code looping over :data:`FORMATS` can tell the two kinds apart.
    """

    name: str = "nf4"
    bits: int = 4
    levels: tuple[float, ...] = field(default_factory=lambda: tuple(nf4_codebook().tolist()))
    exponent_bits: None = None
    mantissa_bits: None = None
    bias: None = None
    max_finite: float = 1.0
    min_normal: None = None
    min_subnormal: None = None
    has_inf: bool = False
    has_nan: bool = False
    saturates: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.levels) != 2**self.bits:
            raise ValueError(f"{self.name}: need {2**self.bits} levels, got {len(self.levels)}")
        if list(self.levels) != sorted(self.levels):
            raise ValueError(f"{self.name}: levels must be in ascending order")


Format = FloatFormat | NF4Format


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 levels of QLoRA (Dettmers et al. 2023, eq. 4), float32, ascending.

    NF4 spends its levels where normally distributed weights are dense. Let
    ``Q = inverse CDF of N(0, 1)`` and pick the probability offset
    ``delta = 1 - (1/(2*16) + 1/(2*15)) / 2 = 0.96770833...`` (the paper's average of
    the offsets for 16 and 15 levels, so that the extreme quantile is finite):

    1) 8 positive quantiles ``Q(p)`` for 8 probabilities evenly spaced from
       ``delta`` down towards 0.5 (0.5 itself, i.e. 0, excluded),
    2) 7 negative ones, ``-Q(p)`` for 7 probabilities evenly spaced from ``delta``
       down towards 0.5 (excluded),
    3) an exact zero (so zero-padding and exact zeros survive quantization),
    4) divide by ``Q(delta)``, so both halves reach exactly ±1.

    The asymmetry (8 positive, 7 negative, one zero) uses all 16 codes while
    keeping an exact 0.
    """
    delta = 1 - (1 / (2 * 16) + 1 / (2 * 15)) / 2
    normal_ppf = NormalDist().inv_cdf

    def quantiles(n: int) -> list[float]:
        # n probabilities evenly spaced on [delta, 0.5), high to low
        return [normal_ppf(delta + (0.5 - delta) * i / n) for i in range(n)]

    positive = quantiles(8)  # 8 levels
    negative = [-q for q in quantiles(7)]  # 7 levels
    levels = torch.tensor(sorted(negative + [0.0] + positive), dtype=torch.float64)
    return (levels / normal_ppf(delta)).to(torch.float32)


_FP32 = FloatFormat("fp32", 8, 23, bias=127, description="IEEE single precision, the reference")
_FP16 = FloatFormat(
    "fp16", 5, 10, bias=15, description="IEEE half precision: 11 significant bits, max 65504"
)
_BF16 = FloatFormat(
    "bf16", 8, 7, bias=127, description="bfloat16: fp32's range with 8 significant bits"
)
_FP8_E4M3 = FloatFormat(
    "fp8_e4m3", 4, 3, bias=7, has_inf=False, has_nan=True, saturates=True,
    description="OCP FP8 E4M3 (torch float8_e4m3fn): more precision, max 448, no inf",
)
_FP8_E5M2 = FloatFormat(
    "fp8_e5m2", 5, 2, bias=15, has_inf=True, has_nan=True, saturates=True,
    description="OCP FP8 E5M2: fp16's range with 3 significant bits, max 57344",
)
_FP4 = FloatFormat(
    "fp4", 2, 1, bias=1, has_inf=False, has_nan=False, saturates=True,
    description="OCP MX FP4 E2M1: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, no inf/NaN",
)
_NF4 = NF4Format(
    description="QLoRA NormalFloat4: 16 normal quantiles on block-absmax-normalized values",
)

FORMATS: MappingProxyType[str, Format] = MappingProxyType(
    {f.name: f for f in (_FP32, _FP16, _BF16, _FP8_E4M3, _FP8_E5M2, _FP4, _NF4)}
)
"""Read-only map from format name to its spec (:class:`FloatFormat` or :class:`NF4Format`)."""


def _resolve(fmt: str | Format) -> Format:
    """The spec for ``fmt`` (a name in :data:`FORMATS` or a spec object)."""
    if isinstance(fmt, FloatFormat | NF4Format):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid names are {sorted(FORMATS)}")
    return FORMATS[fmt]


def _check_float_tensor(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"{what} expects a floating-point tensor, got dtype={x.dtype}; "
            "convert first, e.g. x.float()"
        )


def _round_to_float(x: torch.Tensor, spec: FloatFormat) -> torch.Tensor:
    """Round ``x`` to the nearest value of ``spec``, ties to even; float64 in, float64 out."""
    m = spec.mantissa_bits
    a = x.abs()
    # 1) binade of |x|: |x| = f * 2^k with f in [0.5, 1), so |x| lies in [2^(k-1), 2^k).
    #    Below the smallest normal binade all values share its spacing (subnormals);
    #    above the largest, everything overflows anyway, so clamp both ends.
    _, k = torch.frexp(a)
    exponent = (k - 1).clamp(spec.min_exponent, spec.max_exponent + 1)
    # 2) express |x| in units of the spacing 2^(exponent - m) and round that integer
    #    (the significand with m fraction bits) half to even. Scaling by a power of
    #    two is exact, so this is the only rounding step. A carry (1.111 -> 10.00)
    #    lands exactly on the next binade's first value, which is correct.
    units = torch.ldexp(a, (m - exponent).to(a.dtype))
    rounded = torch.ldexp(torch.round(units), (exponent - m).to(a.dtype))
    # 3) overflow: anything that rounded above max_finite (and ±inf inputs).
    if spec.saturates:
        overflow_value = spec.max_finite
    else:
        overflow_value = math.inf if spec.has_inf else math.nan
    overflow = (rounded > spec.max_finite) | torch.isinf(a)
    rounded = torch.where(overflow, torch.full_like(rounded, overflow_value), rounded)
    # 4) put the sign back (copysign keeps -0.0 and tiny negatives -> -0.0); NaN stays NaN.
    rounded = torch.copysign(rounded, x)
    return torch.where(torch.isnan(x), x, rounded)


def _round_to_codebook(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest level of a sorted codebook, ties to the lower level; float64 in, float64 out."""
    midpoints = (levels[1:] + levels[:-1]) / 2  # decision boundaries, (L-1,)
    # bucketize(right=False) gives i with midpoints[i-1] < x <= midpoints[i]:
    # a value exactly on a midpoint goes to the lower level. Outside values clamp.
    index = torch.bucketize(x, midpoints)
    return torch.where(torch.isnan(x), x, levels[index])


def round_to_format(x: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """The value each element of ``x`` becomes when stored in format ``fmt``.

    Float formats (fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, fp4, or your own
    :class:`FloatFormat`) round to the nearest representable value, ties to the
    one with an even last mantissa bit (IEEE round-to-nearest-even), with
    subnormals (gradual underflow). Overflow means rounding to a value above
    ``max_finite``, so ``max_finite + ulp/2`` is the boundary:

    - fp16, bf16 (IEEE, ``saturates=False``): overflow and ±inf give ±inf, exactly
      like ``x.half()`` / ``x.bfloat16()``.
    - fp8_e4m3, fp8_e5m2, fp4 (``saturates=True``): overflow and ±inf clamp to
      ±max_finite (448, 57344, 6), as hardware "satfinite" conversions and
      FP8 training recipes do. Note ``x.to(torch.float8_e5m2)`` differs: it
      overflows to inf.

    NaN stays NaN and, for float formats, the sign of zero is kept (-1e-30
    becomes -0.0).

    NF4 (``"nf4"``) expects values already normalized to [-1, 1] (divided by the
    block's absolute maximum; see :func:`nf4_codebook`) and returns the nearest
    of the 16 levels; values outside [-1, 1] clamp to ±1, and a value exactly
    halfway between two levels goes to the lower one (as in bitsandbytes'
    comparison tree, which tests ``x > midpoint``). NF4 has a single zero, so -0.0
    becomes 0.0.

    The rounding is computed from the bit layout in float64 (exact for these
    formats, and no double rounding for float64 inputs), not with torch casts.

    Args:
        x: floating-point tensor, any shape and device that supports float64.
        fmt: a name in :data:`FORMATS`, or a :class:`FloatFormat` / :class:`NF4Format`.

    Returns:
        float32 tensor with the shape of ``x`` holding only values of ``fmt``.
    """
    _check_float_tensor(x, "round_to_format")
    spec = _resolve(fmt)
    x64 = x.to(torch.float64)
    if isinstance(spec, NF4Format):
        levels = torch.tensor(spec.levels, dtype=torch.float64, device=x.device)
        out = _round_to_codebook(x64, levels)
    else:
        out = _round_to_float(x64, spec)
    return out.to(torch.float32)


def representable_values(fmt: str | Format, *, nonnegative: bool = False) -> torch.Tensor:
    """All finite values of a small format, decoded from every bit pattern; float32, ascending.

    For a float format each (exponent field ``E``, mantissa field ``M``) pair is
    decoded with the formula in the module docstring; encodings of inf/NaN are
    skipped. Zero appears once (-0.0 is the same number). For NF4 these are the
    16 codebook levels. Handy for plotting where a format puts its values.

    Args:
        fmt: a name in :data:`FORMATS` or a spec, with at most 16 bits.
        nonnegative: keep only values >= 0.

    Returns:
        (N,) float32 tensor, sorted ascending.
    """
    spec = _resolve(fmt)
    if spec.bits > 16:
        raise ValueError(
            f"{spec.name} has 2^{spec.bits} encodings, too many to list; "
            "use a format with at most 16 bits"
        )
    if isinstance(spec, NF4Format):
        values = torch.tensor(spec.levels, dtype=torch.float32)
        return values[values >= 0] if nonnegative else values

    e, m = spec.exponent_bits, spec.mantissa_bits
    E = torch.arange(2**e, dtype=torch.float64)[:, None]  # (2^e, 1) exponent fields
    M = torch.arange(2**m, dtype=torch.float64)[None, :]  # (1, 2^m) mantissa fields
    normal = torch.ldexp(1 + M / 2**m, E - spec.bias)  # (2^e, 2^m)
    subnormal = torch.ldexp(M / 2**m, torch.tensor(float(spec.min_exponent)))  # (1, 2^m)
    magnitudes = torch.where(E == 0, subnormal, normal)
    # Encoding order (E, M) is already ascending; drop the inf/NaN encodings at the top.
    magnitudes = magnitudes.flatten()
    magnitudes = magnitudes[magnitudes <= spec.max_finite].to(torch.float32)
    if nonnegative:
        return magnitudes
    return torch.cat([-magnitudes[1:].flip(0), magnitudes])


def spacing(x: torch.Tensor, fmt: str | FloatFormat) -> torch.Tensor:
    """The ulp of a float format at ``x``: the gap between adjacent values in |x|'s binade.

    ``spacing = 2^(k - m)`` for |x| in [2^k, 2^(k+1)), with k clamped to the
    format's exponent range (so it is ``min_subnormal`` near zero and the top
    binade's gap beyond ``max_finite``). At a power of two this is the gap above
    it (the gap below is half as large), like ``numpy.spacing``. Rounding to
    nearest is off by at most half of it. Inf and NaN give NaN.

    Args:
        x: floating-point tensor.
        fmt: a float format name or :class:`FloatFormat` (NF4's levels have no
            per-binade spacing; use :func:`representable_values`).

    Returns:
        float32 tensor with the shape of ``x``.
    """
    _check_float_tensor(x, "spacing")
    spec = _resolve(fmt)
    if isinstance(spec, NF4Format):
        raise ValueError(
            "spacing is defined for float formats; NF4 levels are not evenly spaced "
            "within binades, see representable_values('nf4')"
        )
    a = x.to(torch.float64).abs()
    _, k = torch.frexp(a)  # frexp(0) gives k = 0: treat zero as the smallest binade
    k = torch.where(a == 0, torch.full_like(k, spec.min_exponent + 1), k)
    exponent = (k - 1).clamp(spec.min_exponent, spec.max_exponent)
    gap = torch.ldexp(torch.ones_like(a), (exponent - spec.mantissa_bits).to(a.dtype))
    return torch.where(torch.isfinite(a), gap, torch.full_like(a, math.nan)).to(torch.float32)
