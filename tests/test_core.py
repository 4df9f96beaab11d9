"""qlab.core against a naive per-element oracle written straight from the conventions in the chapter."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlab as ql

QTYPES = [ql.int8, ql.uint8, ql.int4, ql.uint4, ql.int2]


# ---------------------------------------------------------------- the oracle: plain Python, one slice at a time
def naive_qparams(values: list[float], qtype: ql.QType, symmetric: bool) -> tuple[float, int]:
    if symmetric:
        scale = max(abs(v) for v in values) / qtype.qmax
        return (scale if scale > torch.finfo(torch.float32).tiny else 1.0), 0
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    scale = (hi - lo) / (qtype.qmax - qtype.qmin)
    scale = scale if scale > torch.finfo(torch.float32).tiny else 1.0
    zp = min(max(round(qtype.qmin - lo / scale), qtype.qmin), qtype.qmax)
    return scale, zp


def naive_code(v: float, scale: float, zp: int, qtype: ql.QType, symmetric: bool) -> int:
    """The spec: symmetric signed codes use the restricted range [-qmax, qmax]; everything else [qmin, qmax]."""
    lowest = -qtype.qmax if (qtype.signed and symmetric) else qtype.qmin
    return min(max(round(v / scale) + zp, lowest), qtype.qmax)


def slice_index(idx: tuple[int, ...], shape: tuple[int, ...], gran) -> tuple[int, ...]:
    """Which qparam slot the element at `idx` uses."""
    if isinstance(gran, ql.PerTensor):
        return ()
    if isinstance(gran, ql.PerChannel):
        return (idx[gran.axis],)
    if isinstance(gran, ql.PerToken):
        return idx[:-1]
    return (*idx[:-1], idx[-1] // gran.group_size)


def naive_quantize(x: torch.Tensor, qtype, gran, symmetric):
    x32 = x.float()
    groups: dict[tuple, list[float]] = {}
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape]).reshape(-1, x.dim()).tolist():
        groups.setdefault(slice_index(tuple(idx), tuple(x.shape), gran), []).append(float(x32[tuple(idx)]))
    qparams = {k: naive_qparams(v, qtype, symmetric) for k, v in groups.items()}
    q = torch.empty(x.shape, dtype=torch.int64)
    x_hat = torch.empty(x.shape, dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape]).reshape(-1, x.dim()).tolist():
        scale, zp = qparams[slice_index(tuple(idx), tuple(x.shape), gran)]
        # torch computes x / scale in float32; do the same so ties land identically
        v = float(torch.tensor(float(x32[tuple(idx)])) / torch.tensor(scale, dtype=torch.float32))
        code = naive_code(v, 1.0, zp, qtype, symmetric)
        q[tuple(idx)] = code
        x_hat[tuple(idx)] = (code - zp) * float(torch.tensor(scale, dtype=torch.float32))
    return qparams, q, x_hat


GRANULARITIES = [
    ((6, 8), ql.PerTensor()),
    ((6, 8), ql.PerChannel(axis=0)),
    ((6, 8), ql.PerChannel(axis=1)),
    ((3, 4, 8), ql.PerChannel(axis=-2)),
    ((3, 4, 8), ql.PerToken()),
    ((6, 8), ql.PerGroup(4)),
    ((2, 3, 8), ql.PerGroup(2)),
    ((16,), ql.PerGroup(8)),
]


@pytest.mark.parametrize("shape,gran", GRANULARITIES, ids=lambda v: str(v))
@pytest.mark.parametrize("qtype", QTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_matches_naive_loop(shape, gran, qtype, symmetric):
    torch.manual_seed(hash((shape, str(gran), qtype.name, symmetric)) % 2**31)
    x = torch.randn(shape) * torch.rand(shape[-1]) * 3  # uneven ranges across the last axis
    if not qtype.signed and symmetric:
        x = x.abs()  # unsigned symmetric is meant for non-negative data (e.g. after ReLU)
    scale, zp = ql.choose_qparams(x, qtype, gran, symmetric)
    q = ql.quantize(x, scale, zp, qtype, gran, symmetric=symmetric)
    x_hat = ql.dequantize(q, scale, zp, gran)
    qparams, q_ref, x_hat_ref = naive_quantize(x, qtype, gran, symmetric)

    assert tuple(scale.shape) == ql.qparam_shape(x, gran)
    for key, (s_ref, z_ref) in qparams.items():
        assert float(scale[key]) == pytest.approx(s_ref, rel=1e-6)
        assert int(zp[key]) == z_ref
    assert q.dtype == (torch.int8 if qtype.signed else torch.uint8)
    assert torch.equal(q.long(), q_ref)
    torch.testing.assert_close(x_hat.double(), x_hat_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ql.fake_quantize(x, qtype, gran, symmetric), x_hat)


def test_hand_computed_int8_case():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 2.0])
    scale, zp = ql.choose_qparams(x, ql.int8, symmetric=True)
    assert float(scale) == pytest.approx(2.0 / 127) and int(zp) == 0
    assert ql.quantize(x, scale, zp, ql.int8).tolist() == [-64, -32, 0, 16, 127]  # -63.5 -> -64 (half to even)

    scale, zp = ql.choose_qparams(x, ql.uint8, symmetric=False)  # range [-1, 2] -> 255 steps
    assert float(scale) == pytest.approx(3.0 / 255)
    assert int(zp) == 85  # round(0 - (-1) / (3/255)) = round(85.0)
    # -0.5 / scale = -42.5 -> -42 (half to even), + 85 = 43
    assert ql.quantize(x, scale, zp, ql.uint8).tolist() == [0, 43, 85, 106, 255]


def test_symmetric_uses_restricted_range():
    x = torch.tensor([-3.0, 1.0])
    scale, zp = ql.choose_qparams(x, ql.int8)
    assert ql.quantize(x * 10, scale, zp, ql.int8).min() == -127  # never -128
    assert ql.int8.qmin == -128 and ql.int8.qmax == 127
    assert (ql.int4.qmin, ql.int4.qmax, ql.uint4.qmax, ql.int2.qmin) == (-8, 7, 15, -2)


def test_asymmetric_zero_is_exact():
    x = torch.relu(torch.randn(1000)) + 0.3  # all positive, range widened to include 0
    scale, zp = ql.choose_qparams(x, ql.uint8, symmetric=False)
    assert int(zp) == 0
    assert ql.dequantize(ql.quantize(torch.zeros(3), scale, zp, ql.uint8), scale, zp).abs().max() == 0


@pytest.mark.parametrize("gran", [ql.PerTensor(), ql.PerChannel(0), ql.PerToken(), ql.PerGroup(2)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_constant_and_zero_slices_are_finite(gran, symmetric):
    x = torch.zeros(3, 4)
    x[1] = 5.0  # a constant row
    x[2] = 1e-41  # subnormal row
    scale, zp = ql.choose_qparams(x, ql.int8, gran, symmetric)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    x_hat = ql.fake_quantize(x, ql.int8, gran, symmetric)
    assert torch.isfinite(x_hat).all()
    torch.testing.assert_close(x_hat[:2], x[:2], rtol=0.01, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype):
    x = torch.randn(8, 16).to(dtype)
    out = ql.fake_quantize(x, ql.int8, ql.PerChannel(0))
    assert out.dtype == dtype
    assert ql.metrics.sqnr_db(x.float(), out.float()) > 35


def test_sqnr_grows_about_6db_per_bit():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    db = [ql.metrics.sqnr_db(w, ql.fake_quantize(w, ql.qtype(b), ql.PerChannel(0))) for b in (4, 5, 6, 7, 8)]
    steps = [b - a for a, b in zip(db, db[1:])]
    assert all(5.0 < s < 7.0 for s in steps), steps


def test_finer_granularity_never_hurts_on_outliers():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w[3] *= 50  # an outlier output channel
    errs = [ql.metrics.mse(w, ql.fake_quantize(w, ql.int4, g)) for g in (ql.PerTensor(), ql.PerChannel(0), ql.PerGroup(32))]
    assert errs[0] > errs[1] > errs[2]


# ---------------------------------------------------------------- packing and QTensor
@given(st.lists(st.integers(-8, 7), min_size=1, max_size=65))
@settings(max_examples=60, deadline=None)
def test_pack_int4_roundtrip_signed(codes):
    q = torch.tensor(codes, dtype=torch.int8)
    packed = ql.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(len(codes) / 2)
    assert torch.equal(ql.unpack_int4(packed, q.shape), q)


def test_pack_int4_layout_by_hand():
    q = torch.tensor([1, -1, 7, -8, 3], dtype=torch.int8)
    # byte 0 = 0x1 | 0xF << 4 ; byte 1 = 0x7 | 0x8 << 4 ; byte 2 = 0x3 (odd count: zero padded)
    assert ql.pack_int4(q).tolist() == [0xF1, 0x87, 0x03]
    u = torch.arange(16, dtype=torch.uint8).reshape(4, 4)
    assert torch.equal(ql.unpack_int4(ql.pack_int4(u), u.shape, signed=False), u)


@pytest.mark.parametrize("qtype,gran,symmetric", [
    (ql.int8, ql.PerChannel(0), True),
    (ql.uint8, ql.PerTensor(), False),
    (ql.int4, ql.PerGroup(32), True),
    (ql.uint4, ql.PerGroup(64), False),
])
def test_qtensor_storage_and_values(qtype, gran, symmetric):
    torch.manual_seed(1)
    w = torch.randn(128, 256)
    qt = ql.quantize_tensor(w, qtype, gran, symmetric)
    torch.testing.assert_close(qt.dequantize(), ql.fake_quantize(w, qtype, gran, symmetric))
    n_scales = qt.scale.numel()
    expected = w.numel() * qtype.bits // 8 + 4 * n_scales + (0 if symmetric else 4 * n_scales)
    assert qt.nbytes == expected
    assert qt.qdata.numel() == w.numel() * qtype.bits // 8


# ---------------------------------------------------------------- errors that teach
def test_errors_say_what_to_change():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"group_size=3 must divide the last axis \(10 elements\); try"):
        ql.choose_qparams(x, ql.int8, ql.PerGroup(3))
    with pytest.raises(ValueError, match="floating-point"):
        ql.choose_qparams(torch.arange(4), ql.int8)
    with pytest.raises(ValueError, match="bits=9 is not supported"):
        ql.qtype(9)
    with pytest.raises(ValueError, match="out of range"):
        ql.choose_qparams(x, ql.int8, ql.PerChannel(axis=2))
    with pytest.raises(ValueError, match="expected shape"):
        ql.quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int32), ql.int8, ql.PerChannel(0))
    with pytest.raises(ValueError, match="do not fit in 4 bits"):
        ql.pack_int4(torch.tensor([-1, 9]))
    with pytest.raises(ValueError, match="positive"):
        ql.PerGroup(0)
    with pytest.raises(ValueError, match="positive and finite"):
        ql.quantize(x, 0.0, 0, ql.int8)


def test_metrics_by_hand():
    x = torch.tensor([3.0, 4.0])
    x_hat = torch.tensor([3.0, 3.0])
    assert ql.metrics.mse(x, x_hat) == pytest.approx(0.5)
    assert ql.metrics.sqnr_db(x, x_hat) == pytest.approx(10 * math.log10(25.0))
    assert ql.metrics.sqnr_db(x, x) == math.inf
    assert ql.metrics.cosine(x, x_hat) == pytest.approx(21 / (5 * math.sqrt(18)))
    with pytest.raises(ValueError, match="must match"):
        ql.metrics.mse(x, torch.zeros(3))


def test_asymmetric_signed_range_keeps_the_lowest_code():
    """Asymmetric int8 whose zero point happens to be 0 still owns code -128 (hand-computed case)."""
    x = torch.tensor([-1.28, 0.3, 1.27])
    scale, zp = ql.choose_qparams(x, ql.int8, symmetric=False)
    assert int(zp) == 0 and float(scale) == pytest.approx(2.55 / 255)  # (1.27 + 1.28) / 255 = 0.01
    assert ql.quantize(x, scale, zp, ql.int8, symmetric=False).tolist() == [-128, 30, 127]
    qt = ql.quantize_tensor(x, ql.int8, symmetric=False)
    assert qt.int_repr().tolist() == [-128, 30, 127]
    assert ql.fake_quantize(x, ql.int8, symmetric=False)[0].item() == pytest.approx(-1.28, abs=1e-6)
    # symmetric: the restricted range [-127, 127]
    assert ql.quantize(x, 0.01, 0, ql.int8, symmetric=True).tolist() == [-127, 30, 127]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_pack_order_by_hand(bits):
    """qlab's documented order, computed by hand: the first element in the lowest bits of each byte."""
    per = 8 // bits
    codes = torch.tensor([(3 * i + 1) % 2**bits for i in range(2 * per + 1)], dtype=torch.uint8)  # odd count: padded
    expected = []
    for b in range(0, len(codes), per):
        expected.append(sum(int(c) << (bits * j) for j, c in enumerate(codes[b:b + per].tolist())))
    packed = ql.pack(codes, bits)
    assert packed.tolist() == expected and packed.numel() == ql.packed_nbytes(codes.numel(), bits)
    assert torch.equal(ql.unpack(packed, codes.shape, bits, signed=False), codes)
    signed = torch.tensor([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] * per, dtype=torch.int8) if bits > 1 else None
    if signed is not None:
        assert torch.equal(ql.unpack(ql.pack(signed, bits), signed.shape, bits, signed=True), signed)


def test_packed_size_is_one_meaning_everywhere():
    w = torch.randn(64, 96)
    for qtype in (ql.int2, ql.qtype(3), ql.int4, ql.int8):
        qt = ql.quantize_tensor(w, qtype, ql.PerTensor())
        codes_bytes = qt.qdata.numel() * qt.qdata.element_size()
        assert codes_bytes == ql.packed_nbytes(w.numel(), qtype.bits)
        assert qt.nbytes == codes_bytes + qt.scale.numel() * 4  # symmetric: codes + one fp32 scale
    assert ql.packed_nbytes(10, 2) == 3 and ql.packed_nbytes(10, 3) == 5 and ql.packed_nbytes(10, 1) == 2


def test_bitsandbytes_puts_the_first_code_in_the_high_nibble():
    """The claim in qlab.core.packing's docstring, checked against bitsandbytes' own NF4 packing:
    x = [1.0, -1.0, 0, ...] has NF4 codes [15, 0, 7, ...]; bitsandbytes stores byte 0 as 0xF0, qlab as 0x0F."""
    F = pytest.importorskip("bitsandbytes.functional")
    x = torch.zeros(64)
    x[0], x[1] = 1.0, -1.0
    packed, _ = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert int(packed.flatten()[0]) == 0xF0
    assert int(ql.pack(torch.tensor([15, 0], dtype=torch.uint8), 4)[0]) == 0x0F
