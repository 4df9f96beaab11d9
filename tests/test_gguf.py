"""qlab.gguf against the `gguf` package 0.19.0 (gguf-py, llama.cpp's own Python reader/writer).

Oracles:
- Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: `gguf.quants.quantize` (numpy ports of ggml-quants.c's reference quantizers)
  must give the same bytes, bit for bit, on random data and on the edge cases of each rounding rule.
- every type: `gguf.quants.dequantize` must give bit-identical float32 values from the same bytes (qlab's own
  bytes, and random bytes).
- Q4_K, Q6_K: gguf 0.19.0 cannot quantize them, so qlab's quantizers are checked three ways: gguf decodes
  their bytes to exactly qlab's values; a naive scalar-loop port of llama.cpp's reference quantizers (float32
  numpy scalars, sums in C's sequential order, bytes written index by index) gives the same bytes; and the
  error sits where a uniform quantizer's step predicts.
- hand-computed Q8_0 and Q4_0 blocks, bytes written out from the format's definition.
"""

import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

from qlab import gguf as qg  # noqa: E402

LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
KQUANTS = ("Q4_K", "Q6_K")
KINDS = ("normal", "vector", "scaled", "zeros", "single", "negative_max", "grid", "constant", "positive",
         "float16", "bfloat16")


def make_input(kind: str, seed: int = 0) -> torch.Tensor:
    """A test tensor whose last dimension is 256 (a whole number of blocks for every type)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(3, 2, 256, generator=g)
    if kind == "vector":  # 1-D: gguf returns 1-D bytes
        return torch.randn(256, generator=g)
    if kind == "scaled":  # every block of 32 at its own magnitude, 1e-3 .. 1e3
        scale = 10 ** (6 * torch.rand(4, 8, 1, generator=g) - 3)
        return (torch.randn(4, 8, 32, generator=g) * scale).reshape(4, 256)
    if kind == "zeros":
        return torch.zeros(2, 256)
    if kind == "single":  # one nonzero value per row, either sign, anywhere
        x = torch.zeros(4, 256)
        x[0, 5], x[1, 40], x[2, 255], x[3, 0] = 3.0, -0.7, 1e-3, -250.0
        return x
    if kind == "negative_max":  # the largest |x| of each block is negative; then +-m ties in both orders
        x = torch.randn(3, 256, generator=g)
        blocks = x.view(-1, 32)
        idx = blocks.abs().argmax(-1)
        blocks[torch.arange(blocks.shape[0]), idx] = -1.5 * blocks.abs().amax(-1)
        x[2, :32], x[2, 32:64] = 0.25, -0.25
        x[2, 1], x[2, 3], x[2, 33], x[2, 35] = -2.0, 2.0, 2.0, -2.0
        return x
    if kind == "grid":  # multiples of 0.5: many exact rounding ties
        return torch.randint(-16, 17, (4, 256), generator=g).float() * 0.5
    if kind == "constant":  # flat blocks of either sign
        return torch.tensor([[0.3], [-0.3]]).expand(2, 256).contiguous()
    if kind == "positive":  # all-positive blocks: Q4_1's min > 0, Q4_K clamps its min to 0
        return torch.rand(3, 256, generator=g) + 1.0
    if kind == "float16":
        return torch.randn(2, 256, generator=g).half()
    if kind == "bfloat16":
        return torch.randn(2, 256, generator=g).bfloat16()
    raise ValueError(kind)


def tie_rows(qtype: str) -> torch.Tensor:
    """Blocks whose scale is a power of two, so x / d lands exactly on k + 0.5 for most elements: each type's
    tie rule decides them (half away from zero for Q8_0, half up elsewhere)."""
    rows = []
    halves = lambda lo, hi: [m + 0.5 for m in range(lo, hi)]  # noqa: E731
    for k in (-4, 0, 3):
        for sign in (1.0, -1.0):
            row = {"Q8_0": [127.0] + halves(-16, 15),
                   "Q4_0": [-8.0] + halves(-8, 8) + list(range(-8, 7)),
                   "Q5_0": [-16.0] + halves(-16, 15),
                   "Q4_1": [-8.0, 7.0] + halves(-8, 7) + list(range(-8, 7)),
                   "Q5_1": [-16.0, 15.0] + halves(-16, 14)}[qtype]
            values = sign * 2.0**k * torch.tensor(row, dtype=torch.float32)
            rows.append(values[torch.randperm(32, generator=torch.Generator().manual_seed(len(rows)))])
    return torch.stack(rows)  # (6, 32)


def oracle_array(x: torch.Tensor) -> np.ndarray:
    """The numpy array gguf gets (bfloat16 has no numpy dtype: its exact float32 values)."""
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def gguf_dequantize(data: torch.Tensor, qtype: str) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(data.numpy(), GGMLQuantizationType[qtype]))


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{(a != b).sum()} values differ"


# ----------------------------------------------------------------------------- bytes identical to gguf's
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_bytes_match_gguf(qtype, kind):
    x = make_input(kind)
    ours = qg.quantize(x, qtype)
    theirs = torch.from_numpy(quants.quantize(oracle_array(x), GGMLQuantizationType[qtype]))
    assert ours.dtype == torch.uint8 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    assert_bitwise_equal(qg.dequantize(ours, qtype, x.shape), gguf_dequantize(theirs, qtype))


@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_rounding_ties_match_gguf(qtype):
    x = tie_rows(qtype)
    assert torch.equal(qg.quantize(x, qtype), torch.from_numpy(quants.quantize(x.numpy(), GGMLQuantizationType[qtype])))


@pytest.mark.parametrize("qtype", [*LEGACY, *KQUANTS])
def test_dequantize_random_bytes_like_gguf(qtype):
    """Any bytes (with finite float16 scales) decode to gguf's values bit for bit."""
    block_size, type_size = qg.TYPE_SIZES[qtype]
    data = torch.randint(0, 256, (5, 4 * type_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    blocks = data.view(-1, type_size)
    for high_byte in {"Q4_1": (1, 3), "Q5_1": (1, 3), "Q4_K": (1, 3), "Q6_K": (209,)}.get(qtype, (1,)):
        blocks[:, high_byte] &= 0x3B  # exponent < 31: no Inf/NaN scale
    assert_bitwise_equal(qg.dequantize(data, qtype, (5, 4 * block_size)), gguf_dequantize(data, qtype))


# ----------------------------------------------------------------------------- K-quants: gguf decodes qlab's bytes
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquant_bytes_decode_in_gguf_to_our_values(qtype, kind):
    x = make_input(kind)
    data = qg.quantize(x, qtype)
    assert data.shape == quants.quant_shape_to_byte_shape(x.shape, GGMLQuantizationType[qtype])
    ours = qg.dequantize(data, qtype, x.shape)
    assert_bitwise_equal(ours, gguf_dequantize(data, qtype))
    if kind in ("zeros", "constant"):  # blocks of one value come back to within float16 precision
        assert torch.allclose(ours, x.float(), rtol=1e-3, atol=0)


def test_gguf_cannot_quantize_kquants():
    """Why the K-quants have no byte oracle: gguf 0.19.0 only decodes them."""
    for qtype in KQUANTS:
        with pytest.raises(NotImplementedError):
            quants.quantize(np.zeros((1, 256), np.float32), GGMLQuantizationType[qtype])


def test_error_matches_the_uniform_quantizer_estimate():
    """Relative MSE on N(0, 1) weights (16384 values). A uniform step D has MSE ~ D^2 / 12:
    Q4_1: 15 steps over the range of 32 normals (E ~ 4.1 sigma): D ~ 0.27, 6.2e-3 (measured 6.1e-3).
    Q4_K: the same 16 levels, but a weighted least-squares fit of scale and min per 32 (with 6-bit scales):
          measured 5.2e-3, better than Q4_1 and Q4_0 at a lower size than Q4_1 (4.5 bits).
    Q6_K: 64 levels, scale = max |x| of 16 normals (~1.8 sigma) / 32: D ~ 0.056, 2.6e-4 (measured 3.0e-4,
          int8 sub-block scales); between Q5_1 (1.4e-3) and Q8_0 (3.0e-5)."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))

    def rel_mse(qtype: str) -> float:
        x_hat = qg.dequantize(qg.quantize(x, qtype), qtype, x.shape)
        return ((x_hat - x) ** 2).mean().item() / x.square().mean().item()

    err = {qtype: rel_mse(qtype) for qtype in qg.QTYPES}
    assert 4.5e-3 < err["Q4_K"] < 5.8e-3 and 2.6e-4 < err["Q6_K"] < 3.4e-4
    assert err["Q8_0"] < err["Q6_K"] < err["Q5_1"] < err["Q5_0"] < err["Q4_K"] < err["Q4_1"] < err["Q4_0"]


# ----------------------------------------------------------------------------- K-quants: a scalar-loop port
F = np.float32


def c_nearest_int(v) -> int:
    """nearest_int as ggml-quants.c writes it: add 1.5 * 2**23 in float, read the mantissa bits."""
    bits = int((F(v) + F(12582912.0)).view(np.int32))
    return (bits & 0x007FFFFF) - 0x00400000


def fp16(v) -> np.float16:
    return np.float16(F(v))


def qkx2_loops(x, w, nmax=15, rmin=F(-1.0), rdelta=F(0.1), nstep=20):
    n = len(x)
    lo, hi, sum_w = x[0], x[0], w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        lo, hi = min(lo, x[i]), max(hi, x[i])
        sum_w += w[i]
        sum_x += w[i] * x[i]
    lo = min(lo, F(0))
    if hi == lo:
        return F(0), -lo, [0] * n
    iscale = F(nmax) / (hi - lo)
    scale = F(1) / iscale
    L = [max(0, min(nmax, c_nearest_int(iscale * (x[i] - lo)))) for i in range(n)]
    best = F(0)
    for i in range(n):
        diff = scale * L[i] + lo - x[i]
        best += w[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / (hi - lo)
        Laux = [max(0, min(nmax, c_nearest_int(iscale * (x[i] - lo)))) for i in range(n)]
        sum_l = sum_l2 = sum_xl = F(0)
        for i in range(n):
            sum_l += w[i] * Laux[i]
            sum_l2 += w[i] * Laux[i] * Laux[i]
            sum_xl += w[i] * Laux[i] * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min, this_scale = F(0), sum_xl / sum_l2
            cur = F(0)
            for i in range(n):
                diff = this_scale * Laux[i] + this_min - x[i]
                cur += w[i] * (diff * diff)
            if cur < best:
                L, best, scale, lo = Laux, cur, this_scale, this_min
    return scale, -lo, L


def q4_k_loops(x: np.ndarray) -> bytes:
    L, scales, mins = [], [], []
    for j in range(8):
        xs = x[32 * j: 32 * j + 32]
        sum_x2 = F(0)
        for v in xs:
            sum_x2 += v * v
        av_x = np.sqrt(sum_x2 / F(32))
        scale, the_min, Lj = qkx2_loops(xs, [av_x + abs(v) for v in xs])
        scales.append(scale), mins.append(the_min), L.extend(Lj)
    max_scale, max_min = max(F(0), *scales), max(F(0), *mins)
    inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
    inv_min = F(63) / max_min if max_min > 0 else F(0)
    ls = [min(63, c_nearest_int(inv_scale * s) & 0xFF) for s in scales]
    lm = [min(63, c_nearest_int(inv_min * m) & 0xFF) for m in mins]
    packed = [0] * 12
    for j in range(8):
        if j < 4:
            packed[j], packed[j + 4] = ls[j], lm[j]
        else:
            packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            packed[j - 4] |= (ls[j] >> 4) << 6
            packed[j] |= (lm[j] >> 4) << 6
    d, dmin = fp16(max_scale / F(63)), fp16(max_min / F(63))
    for j in range(8):
        dj = F(d) * ls[j]
        if dj == 0:
            continue
        dm = F(dmin) * lm[j]
        for i in range(32):
            L[32 * j + i] = max(0, min(15, c_nearest_int((x[32 * j + i] + dm) / dj)))
    qs = [L[64 * c + i] | (L[64 * c + 32 + i] << 4) for c in range(4) for i in range(32)]
    return d.tobytes() + dmin.tobytes() + bytes(packed) + bytes(qs)


def qx_loops(x, nmax=32):
    amax, signed_max = F(0), F(0)
    for v in x:
        if abs(v) > amax:
            amax, signed_max = abs(v), v
    if amax < F(1e-15):
        return F(0), [0] * len(x)

    def fit(iscale):
        ls = [max(-nmax, min(nmax - 1, c_nearest_int(iscale * v))) for v in x]
        sumlx = suml2 = F(0)
        for v, l in zip(x, ls):
            sumlx += v * v * v * l
            suml2 += v * v * l * l
        return ls, sumlx, suml2

    ls, sumlx, suml2 = fit(F(-nmax) / signed_max)
    scale = sumlx / suml2 if suml2 else F(0)
    best = scale * sumlx
    for step in [*range(-9, 0), *range(1, 10)]:
        ls_i, sumlx, suml2 = fit(-(nmax + F(0.1) * step) / signed_max)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            ls, scale = ls_i, sumlx / suml2
            best = scale * sumlx
    return scale, [l + nmax for l in ls]


def q6_k_loops(x: np.ndarray) -> bytes:
    L, scales = [], []
    for b in range(16):
        scale, Lb = qx_loops(x[16 * b: 16 * b + 16])
        scales.append(scale), L.extend(Lb)
    max_abs, max_scale = F(0), F(0)
    for s in scales:
        if abs(s) > max_abs:
            max_abs, max_scale = abs(s), s
    if max_abs < F(1e-15):
        return bytes(210)
    iscale = F(-128) / max_scale
    d = fp16(F(1) / iscale)
    sc = [min(127, c_nearest_int(iscale * s)) for s in scales]
    for j in range(16):
        dj = F(d) * sc[j]
        if dj == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, c_nearest_int(x[16 * j + i] / dj))) + 32
    ql, qh = [0] * 128, [0] * 64
    for half in range(2):
        q = L[128 * half: 128 * half + 128]
        for i in range(32):
            ql[64 * half + i] = (q[i] & 0xF) | (q[i + 64] & 0xF) << 4
            ql[64 * half + 32 + i] = (q[i + 32] & 0xF) | (q[i + 96] & 0xF) << 4
            qh[32 * half + i] = (q[i] >> 4) | (q[i + 32] >> 4) << 2 | (q[i + 64] >> 4) << 4 | (q[i + 96] >> 4) << 6
    return bytes(ql) + bytes(qh) + np.array(sc, np.int8).tobytes() + d.tobytes()


@pytest.mark.parametrize("kind", ["normal", "scaled", "single", "negative_max", "grid", "constant", "positive"])
@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquant_bytes_match_scalar_loops(qtype, kind):
    x = make_input(kind, seed=2).float().reshape(-1, 256)[:2]  # two super-blocks: the loops are slow
    loops = {"Q4_K": q4_k_loops, "Q6_K": q6_k_loops}[qtype]
    expected = b"".join(loops(row) for row in x.numpy())
    assert bytes(qg.quantize(x, qtype).reshape(-1).tolist()) == expected


@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquant_bytes_match_scalar_loops_on_sensitive_blocks(qtype):
    """Super-blocks at magnitudes 1e-3 .. 1e3 (every third with an offset), including ones where a 1-ulp slip
    changes the bytes: found by searching these 2000 for blocks that torch's own .sum() order (2-3% of
    blocks) or torch's float32 sqrt (0.5% of Q4_K blocks; not correctly rounded on CPU) would change."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 256, generator=g) * 10 ** (6 * torch.rand(2000, 1, generator=g) - 3)
    x[::3] += x[::3].abs().mean(-1, keepdim=True)
    rows = [*range(6), *{"Q4_K": (143, 273, 296, 330), "Q6_K": (61, 169, 171, 185)}[qtype]]
    loops = {"Q4_K": q4_k_loops, "Q6_K": q6_k_loops}[qtype]
    assert bytes(qg.quantize(x[rows], qtype).reshape(-1).tolist()) == b"".join(loops(r) for r in x[rows].numpy())


def test_kquant_scale_invariants():
    """The largest sub-block scale takes the top code: 63 in Q4_K (also the largest min), -128 in Q6_K."""
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    s = qg.quantize(x, "Q4_K")[:, 4:16]  # the 12 packed scale bytes
    sc = torch.cat([s[:, :4] & 63, (s[:, 8:] & 0xF) | (s[:, :4] >> 6) << 4], dim=-1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:] >> 4) | (s[:, 4:8] >> 6) << 4], dim=-1)
    assert (sc.amax(-1) == 63).all() and (m.amax(-1) == 63).all()
    assert (qg.quantize(x, "Q6_K")[:, 192:208].view(torch.int8).amin(-1) == -128).all()
    assert not qg.quantize(torch.zeros(1, 256), "Q6_K").any() and not qg.quantize(torch.zeros(1, 256), "Q4_K").any()


# ----------------------------------------------------------------------------- hand-computed blocks
def test_q8_0_block_by_hand():
    # amax 127 -> d = 1 (fp16 0x3C00, stored little-endian 00 3C); q = roundf(x): halves away from zero
    x = torch.tensor([127.0, -127.0, 0.5, -0.5, 1.5, -2.5, 3.25, -3.75] + [0.0] * 24)
    q = [127, -127, 1, -1, 2, -3, 3, -4] + [0] * 24
    expected = bytes([0x00, 0x3C]) + bytes(v & 0xFF for v in q)  # int8 two's complement: -127 = 0x81
    data = qg.quantize(x, "Q8_0")
    assert bytes(data.tolist()) == expected
    assert qg.dequantize(data, "Q8_0", (32,)).tolist() == [float(v) for v in q]


def test_q4_0_block_by_hand():
    # max |x| is -8 (x[0], before +8 at x[1]) -> d = -8 / -8 = 1; q = min(15, trunc(x + 8.5))
    x = torch.zeros(32)
    x[0], x[1], x[2], x[3], x[4] = -8.0, 8.0, 0.5, -0.5, 3.7  # q: 0, 15 (16 clipped), 9, 8, 12
    x[16], x[17], x[18] = 7.0, -7.5, 1.49  # q: 15, 1, 9; the other zeros: 8
    # byte j = q[j] | q[j + 16] << 4
    qs = [0x0 | 0xF << 4, 0xF | 0x1 << 4, 0x9 | 0x9 << 4, 0x88, 0xC | 0x8 << 4] + [0x88] * 11
    data = qg.quantize(x, "Q4_0")
    assert bytes(data.tolist()) == bytes([0x00, 0x3C] + qs)
    expected = torch.zeros(32)
    expected[[0, 1, 2, 4, 16, 17, 18]] = torch.tensor([-8.0, 7.0, 1.0, 4.0, 7.0, -7.0, 1.0])  # d * (q - 8)
    assert torch.equal(qg.dequantize(data, "Q4_0", (32,)), expected)


# ----------------------------------------------------------------------------- sizes
def test_sizes_and_bits_per_weight_match_gguf():
    expected_bpw = {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K": 4.5, "Q6_K": 6.5625}
    assert set(qg.QTYPES) == set(expected_bpw)
    for qtype, bpw in expected_bpw.items():
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
        assert qg.TYPE_SIZES[qtype] == (block_size, type_size)
        assert qg.bits_per_weight(qtype) == bpw == 8 * type_size / block_size
        assert qg.GGML_TYPE_IDS[qtype] == GGMLQuantizationType[qtype].value


def test_rounding_helpers():
    v = torch.tensor([0.5, -0.5, 1.5, -2.5, 0.49999997, 2.4, -0.0])
    assert qg.round_half_away(v).tolist() == [1.0, -1.0, 2.0, -3.0, 0.0, 2.0, -0.0]
    assert qg.nearest_int(v).tolist() == [0.0, -0.0, 2.0, -2.0, 0.0, 2.0, -0.0]
    assert [c_nearest_int(F(t)) for t in v.tolist()] == [0, 0, 2, -2, 0, 2, 0]


# ----------------------------------------------------------------------------- errors that teach
def test_errors():
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match=r"qtype='Q3_K' is not a GGUF type .* use one of \('Q8_0', 'Q4_0'"):
        qg.quantize(x, "Q3_K")
    with pytest.raises(ValueError, match=r"did you mean 'Q4_K'"):
        qg.quantize(x, "q4_k")
    with pytest.raises(ValueError, match=r"Q4_K needs rows whose length is a multiple of 256, got 100: pad the "
                                         r"last dimension to 256"):
        qg.quantize(torch.randn(3, 100), "Q4_K")
    with pytest.raises(ValueError, match=r"got 96: pad .* to 256, or use a type with smaller blocks \(Q8_0, Q4_0"):
        qg.quantize(torch.randn(96), "Q6_K")
    with pytest.raises(ValueError, match=r"Q8_0 quantizes rows of blocks, got shape \(0, 32\)"):
        qg.quantize(torch.zeros(0, 32), "Q8_0")
    with pytest.raises(ValueError, match=r"quantize takes a float tensor .* got torch.int32"):
        qg.quantize(torch.ones(32, dtype=torch.int32), "Q8_0")
    bad = x.clone()
    bad[1, 7], bad[0, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"x holds 2 NaN or Inf value\(s\) .* clean or clamp"):
        qg.quantize(bad, "Q4_0")
    with pytest.raises(ValueError, match=r"Q8_0's float16 scale d overflows"):
        qg.quantize(torch.full((32,), 1e7), "Q8_0")
    data = qg.quantize(x, "Q6_K")
    with pytest.raises(ValueError, match=r"Q6_K stores a tensor of shape \(2, 512\) in 840 bytes \(4 blocks of 210\), "
                                         r"got 420: check the qtype and the shape"):
        qg.dequantize(data, "Q6_K", (2, 512))
    with pytest.raises(ValueError, match=r"dequantize takes the uint8 bytes .* got torch.int8"):
        qg.dequantize(data.view(torch.int8), "Q6_K", (2, 256))
    with pytest.raises(ValueError, match=r"Q4_K needs rows whose length is a multiple of 256, got 210"):
        qg.dequantize(data, "Q4_K", data.shape)
    with pytest.raises(ValueError, match="not a GGUF type"):
        qg.bits_per_weight("F16")
