"""Tests for qlab.formats: rounding from the bit layout, against torch's casts and bitsandbytes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlab.formats import (
    FORMATS,
    FloatFormat,
    NF4Format,
    nf4_codebook,
    representable_values,
    round_to_format,
    spacing,
)

# name -> torch dtype that stores exactly that format (the oracle)
TORCH_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FLOAT_NAMES = [name for name, spec in FORMATS.items() if isinstance(spec, FloatFormat)]


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equality of float32 tensors, except that any NaN matches any NaN."""
    assert actual.dtype == expected.dtype == torch.float32
    assert actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN positions differ"
    a, e = actual[~nan], expected[~nan]
    bad = a.view(torch.int32) != e.view(torch.int32)  # bitwise: also checks -0.0 vs 0.0
    assert not bad.any(), f"{int(bad.sum())} mismatches: got {a[bad][:5]}, expected {e[bad][:5]}"


def all_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every value of a 8- or 16-bit dtype (one per bit pattern), as float32."""
    bits = torch.finfo(dtype).bits
    int_dtype = {8: torch.uint8, 16: torch.int16}[bits]
    return torch.arange(2**bits).to(int_dtype).view(dtype).float()


def random_float32(n: int, low_exp: int, high_exp: int, seed: int = 0) -> torch.Tensor:
    """n float32 values N(0,1) * 2^k with k uniform in [low_exp, high_exp]: many scales."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(low_exp, high_exp + 1, (n,), generator=g).double()
    return torch.ldexp(torch.randn(n, generator=g, dtype=torch.float64), k).float()


def ties_and_neighbours(dtype: torch.dtype) -> torch.Tensor:
    """Midpoints between consecutive values of dtype (exact ties) and the float32s next to them."""
    values = all_bit_patterns(dtype)
    values = values[torch.isfinite(values)].unique().double()  # sorted
    mid = ((values[1:] + values[:-1]) / 2).float()  # exact: needs one more bit than dtype has
    up = torch.nextafter(mid, torch.full_like(mid, math.inf))
    down = torch.nextafter(mid, torch.full_like(mid, -math.inf))
    return torch.cat([mid, up, down])


def oracle_inputs(dtype: torch.dtype) -> torch.Tensor:
    finfo = torch.finfo(dtype)
    mantissa_bits = -math.frexp(finfo.eps)[1] + 1  # eps = 2^-m
    lo = math.frexp(finfo.tiny)[1] - mantissa_bits - 4  # a bit below the smallest subnormal
    hi = math.frexp(finfo.max)[1] + 1  # a bit above the largest value
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan])
    return torch.cat([random_float32(50_000, lo, hi), ties_and_neighbours(dtype), specials])


# ---------------------------------------------------------------- format specs


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_float_specs_match_torch_finfo(name):
    spec, dtype = FORMATS[name], TORCH_DTYPES[name]
    finfo = torch.finfo(dtype)
    assert spec.bits == finfo.bits
    assert spec.max_finite == finfo.max
    assert spec.min_normal == finfo.smallest_normal
    assert 2.0**-spec.mantissa_bits == finfo.eps
    int_dtype = {8: torch.uint8, 16: torch.int16, 32: torch.int32}[finfo.bits]
    assert spec.min_subnormal == torch.tensor([1]).to(int_dtype).view(dtype).item()  # bits 0...01


def test_spec_values_by_hand():
    assert FORMATS["fp16"].max_finite == 65504
    assert (FORMATS["fp8_e4m3"].bias, FORMATS["fp8_e4m3"].max_finite) == (7, 448)
    assert FORMATS["fp8_e4m3"].min_subnormal == 2.0**-9
    assert (FORMATS["fp8_e4m3"].has_inf, FORMATS["fp8_e4m3"].has_nan) == (False, True)
    assert (FORMATS["fp8_e5m2"].bias, FORMATS["fp8_e5m2"].max_finite) == (15, 57344)
    assert FORMATS["fp8_e5m2"].min_subnormal == 2.0**-16
    fp4 = FORMATS["fp4"]
    assert (fp4.bits, fp4.exponent_bits, fp4.mantissa_bits, fp4.max_finite) == (4, 2, 1, 6.0)
    assert not fp4.has_inf and not fp4.has_nan and fp4.saturates
    nf4 = FORMATS["nf4"]
    assert isinstance(nf4, NF4Format)
    assert nf4.bits == 4 and nf4.exponent_bits is None and nf4.max_finite == 1.0
    assert torch.equal(torch.tensor(nf4.levels), nf4_codebook())
    assert set(FORMATS) == {"fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp4", "nf4"}


def test_custom_formats_follow_ocp_mx_fp6():
    # OCP MX FP6: E3M2 max 28, E2M3 max 7.5, no inf/NaN.
    e3m2 = FloatFormat("fp6_e3m2", 3, 2, has_inf=False, has_nan=False, saturates=True)
    e2m3 = FloatFormat("fp6_e2m3", 2, 3, has_inf=False, has_nan=False, saturates=True)
    assert (e3m2.bias, e3m2.max_finite, e3m2.min_subnormal) == (3, 28.0, 0.0625)
    assert (e2m3.bias, e2m3.max_finite, e2m3.min_subnormal) == (1, 7.5, 0.125)
    out = round_to_format(torch.tensor([29.0, 0.03, 0.04]), e3m2)
    assert_same(out, torch.tensor([28.0, 0.0, 0.0625]))


# ---------------------------------------------------------------- fixed points


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_every_16bit_pattern_is_a_fixed_point(name):
    x = all_bit_patterns(TORCH_DTYPES[name])  # all 65536, including ±inf and NaNs
    assert_same(round_to_format(x, name), x)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_every_finite_fp8_pattern_is_a_fixed_point(name):
    x = all_bit_patterns(TORCH_DTYPES[name])
    finite_or_nan = ~torch.isinf(x)
    assert_same(round_to_format(x[finite_or_nan], name), x[finite_or_nan])
    # E5M2's ±inf patterns saturate to ±57344 (our choice for saturating formats)
    infs = x[~finite_or_nan]
    assert_same(round_to_format(infs, name), infs.sign() * FORMATS[name].max_finite)


@pytest.mark.parametrize("name", list(TORCH_DTYPES)[1:])
def test_representable_values_decode_like_torch(name):
    x = all_bit_patterns(TORCH_DTYPES[name])
    expected = (x[torch.isfinite(x)] + 0.0).unique()  # sorted; -0.0 + 0.0 = +0.0 merges the zeros
    assert_same(representable_values(name), expected)
    assert_same(representable_values(name, nonnegative=True), expected[expected >= 0])


def test_fp4_values():
    expected = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert_same(representable_values("fp4", nonnegative=True), expected)
    assert_same(representable_values("fp4"), torch.cat([-expected[1:].flip(0), expected]))


# ---------------------------------------------------------------- oracle: torch casts


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_ieee16_rounding_matches_torch_cast(name):
    x = oracle_inputs(TORCH_DTYPES[name])  # includes overflow to inf and underflow to ±0
    assert_same(round_to_format(x, name), x.to(TORCH_DTYPES[name]).float())


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_rounding_matches_torch_cast_in_range(name):
    spec, dtype = FORMATS[name], TORCH_DTYPES[name]
    x = oracle_inputs(dtype)
    # values that round to at most max_finite (below max + half an ulp); overflow: by hand below
    half_ulp_above_max = spacing(torch.tensor([spec.max_finite]), name).item() / 2
    x = x[x.abs() < spec.max_finite + half_ulp_above_max]
    assert_same(round_to_format(x, name), x.to(dtype).float())


def test_float32_input_is_unchanged_by_fp32():
    x = oracle_inputs(torch.float16)
    assert_same(round_to_format(x, "fp32"), x)


def test_float64_input_is_rounded_once():
    # 1 + 2^-11 + 2^-40 is just above the fp16 tie 1 + 2^-11, so it rounds up to 1 + 2^-10.
    # Going through float32 first would drop 2^-40, land on the tie, and round to even (1.0).
    x = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert_same(round_to_format(x, "fp16"), torch.tensor([1 + 2**-10]))
    assert x.float().half().item() == 1.0  # the double rounding we avoid


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_is_float32_with_input_shape(dtype):
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = round_to_format(x, "fp8_e4m3")
    assert out.dtype == torch.float32 and out.shape == (3, 4, 5)
    assert_same(out, x.float().to(torch.float8_e4m3fn).float())


# ---------------------------------------------------------------- hand-computed cases

INF, NAN = math.inf, math.nan
HAND_CASES = {
    "fp4": [
        (2.5, 2.0),  # tie between 2 (M=0) and 3 (M=1): even mantissa
        (5.0, 4.0),  # tie between 4 and 6: 4 has the even mantissa
        (7.0, 6.0),  # saturates
        (-7.0, -6.0),
        (1e30, 6.0),
        (INF, 6.0),
        (-INF, -6.0),
        (0.25, 0.0),  # tie between 0 and the subnormal 0.5: 0 is even
        (0.75, 1.0),  # tie between 0.5 (M=1) and 1.0 (M=0)
        (1.25, 1.0),
        (1.75, 2.0),
        (-0.1, -0.0),
    ],
    "fp8_e4m3": [
        (500.0, 448.0),  # saturates
        (464.0, 448.0),  # the tie 448|480 (480 would be the NaN encoding S.1111.111)
        (1e6, 448.0),
        (INF, 448.0),
        (-INF, -448.0),
        (2.0**-9, 2.0**-9),  # smallest subnormal
        (2.0**-10, 0.0),  # tie between 0 and 2^-9
        (1.5 * 2.0**-10, 2.0**-9),
        (-(2.0**-11), -0.0),
        (NAN, NAN),
    ],
    "fp8_e5m2": [
        (60000.0, 57344.0),
        (61440.0, 57344.0),  # torch's cast gives inf here and above
        (1e9, 57344.0),
        (INF, 57344.0),
        (2.0**-16, 2.0**-16),
        (2.0**-17, 0.0),
    ],
    "fp16": [
        (65504.0 + 16, INF),  # max + half ulp is a tie; rounding to even goes up to 2^16: overflow
        (65519.0, 65504.0),
        (-65520.0, -INF),
        (INF, INF),
        (2.0**-24, 2.0**-24),
        (2.0**-25, 0.0),
        (2.0**-25 * (1 + 2.0**-23), 2.0**-24),  # the float32 just above the tie
        (-(2.0**-26), -0.0),
    ],
}


@pytest.mark.parametrize("name", list(HAND_CASES))
def test_hand_computed_cases(name):
    x, expected = zip(*HAND_CASES[name])
    assert_same(round_to_format(torch.tensor(x), name), torch.tensor(expected))


def test_e5m2_saturation_differs_from_torch_cast():
    x = torch.tensor([61440.0, INF])
    assert_same(round_to_format(x, "fp8_e5m2"), torch.tensor([57344.0, 57344.0]))
    assert torch.isinf(x.to(torch.float8_e5m2).float()).all()


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_signed_zero_is_kept(name):
    out = round_to_format(torch.tensor([-0.0, 0.0]), name)
    assert torch.equal(torch.signbit(out), torch.tensor([True, False]))


# ---------------------------------------------------------------- spacing


def test_spacing_by_hand():
    assert spacing(torch.tensor([1.0]), "fp16").item() == torch.finfo(torch.float16).eps
    assert spacing(torch.tensor([0.0]), "fp8_e4m3").item() == 2.0**-9
    assert spacing(torch.tensor([1e9]), "fp8_e4m3").item() == 32.0  # top binade [256, 448]
    assert torch.isnan(spacing(torch.tensor([INF, NAN]), "fp16")).all()


@pytest.mark.parametrize("name", ["fp16", "fp8_e4m3", "fp8_e5m2", "fp4"])
def test_spacing_is_the_gap_to_the_next_value(name):
    values = representable_values(name, nonnegative=True)  # ascending
    gaps = values[1:] - values[:-1]
    assert_same(spacing(values[:-1], name), gaps)


# ---------------------------------------------------------------- NF4


def test_nf4_codebook_shape():
    levels = nf4_codebook()
    assert levels.dtype == torch.float32 and levels.shape == (16,)
    assert torch.all(levels[1:] > levels[:-1])
    assert levels[0] == -1 and levels[-1] == 1 and levels[7] == 0
    assert (levels > 0).sum() == 8 and (levels < 0).sum() == 7


def test_nf4_codebook_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    expected = bnbf.get_4bit_type("nf4", device="cpu").float()
    torch.testing.assert_close(nf4_codebook(), expected, atol=1e-6, rtol=0)


def test_nf4_rounding_is_nearest_level():
    levels = nf4_codebook().double()
    x = torch.cat([torch.linspace(-1.5, 1.5, 20_001, dtype=torch.float64), levels])
    expected = levels[(x[:, None] - levels[None, :]).abs().argmin(dim=1)]  # (N, 16) -> (N,)
    assert_same(round_to_format(x, "nf4"), expected.float())


def test_nf4_ties_go_to_the_lower_level():
    levels = nf4_codebook().double()
    midpoints = (levels[1:] + levels[:-1]) / 2  # exact in float64
    assert_same(round_to_format(midpoints, "nf4"), levels[:-1].float())


def test_nf4_clamps_and_keeps_nan():
    out = round_to_format(torch.tensor([-3.0, 7.0, -INF, INF, NAN]), "nf4")
    assert_same(out, torch.tensor([-1.0, 1.0, -1.0, 1.0, NAN]))


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_helpful_errors():
    with pytest.raises(ValueError, match="floating-point tensor.*int64"):
        round_to_format(torch.arange(3), "fp16")
    with pytest.raises(ValueError, match=r"unknown format 'fp7'.*valid names.*fp8_e4m3"):
        round_to_format(torch.zeros(3), "fp7")
    with pytest.raises(TypeError, match="torch.Tensor"):
        round_to_format([1.0, 2.0], "fp16")
    with pytest.raises(ValueError, match="too many to list"):
        representable_values("fp32")
    with pytest.raises(ValueError, match="float formats"):
        spacing(torch.zeros(2), "nf4")


def test_invalid_float_specs_raise():
    with pytest.raises(ValueError, match="set has_nan=True"):
        FloatFormat("bad", 4, 3, has_inf=True, has_nan=False)
    with pytest.raises(ValueError, match="set saturates=True"):
        FloatFormat("bad", 2, 1, has_inf=False, has_nan=False, saturates=False)
    with pytest.raises(ValueError, match="does not fit inside float32"):
        FloatFormat("fp64", 11, 52)


# ---------------------------------------------------------------- properties (hypothesis)

finite_or_inf_float32 = st.floats(width=32, allow_nan=False)


@pytest.mark.parametrize("name", list(FORMATS))
@settings(max_examples=150, deadline=None)
@given(x=finite_or_inf_float32, y=finite_or_inf_float32)
def test_rounding_is_idempotent_monotone_and_odd(name, x, y):
    t = torch.tensor([x, y, -x])
    r = round_to_format(t, name)
    assert_same(round_to_format(r, name), r)  # idempotent
    if x <= y:
        assert r[0] <= r[1]  # monotone
    if name != "nf4":  # the NF4 codebook is not symmetric
        assert r[2] == -r[0]
