"""GGUF / llama.cpp block quantization formats: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q4_K, Q6_K.

Gerganov et al., llama.cpp / ggml, `ggml/src/ggml-common.h` (block layouts) and `ggml/src/ggml-quants.c`
(the `quantize_row_*_ref` quantizers), https://github.com/ggml-org/llama.cpp ; the file format:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md

Every format cuts each row (the last dimension) into blocks and stores each block as a fixed number of bytes:
float16 scales first (little-endian), then the codes. `quantize(x, "Q4_0")` returns those bytes exactly as a
.gguf file holds them: uint8 of shape (*x.shape[:-1], row_bytes), the shape `gguf.quants.quantize` returns.

    type  block bytes  layout (x = value, q = code)                                            bits/weight
    Q8_0    32    34   d fp16 | q int8[32]                               x = d * q                 8.5
    Q4_0    32    18   d fp16 | qs[16]: byte j = q[j] | q[j+16] << 4     x = d * (q - 8)           4.5
    Q4_1    32    20   d fp16 | m fp16 | qs[16] (as Q4_0)                x = d * q + m             5.0
    Q5_0    32    22   d fp16 | qh u32 (bit j = bit 4 of q[j]) | qs[16]  x = d * (q - 16)          5.5
    Q5_1    32    24   d fp16 | m fp16 | qh u32 | qs[16]                 x = d * q + m             6.0
    Q4_K   256   144   d, dmin fp16 | scales[12]: 8 x (6-bit sc, 6-bit m) | qs[128]
                       x = (d * sc) * q - dmin * m, one (sc, m) per sub-block of 32               4.5
    Q6_K   256   210   ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales int8[16] | d fp16
                       x = (d * sc) * (q - 32), one sc per sub-block of 16                       6.5625

Rounding, as gguf 0.19.0's numpy quantizers implement llama.cpp's (tests/test_gguf.py checks the bytes):
- Q8_0:  d = amax / 127 in float32; q = round(x * (1/d)) HALF AWAY FROM ZERO (C's roundf), made with the
         float32 1/d although the file keeps fp16(d): dequantization uses a slightly different scale.
- Q4_0:  max = the SIGNED value of largest |x| (the first one on a tie); d = max / -8;
         q = min(15, trunc(x * (1/d) + 8.5)): round half UP, so max itself maps to q = 0 (x_hat = -8d ~ max).
- Q5_0:  the same with 16: d = max / -16, q = min(31, trunc(x * (1/d) + 16.5)).
- Q4_1:  d = (max - min) / 15, q = min(15, trunc((x - min) * (1/d) + 0.5)) (round half up), m = min.
- Q5_1:  the same with 31 levels above min.
  A block of zeros has d = 0 and 1/d is taken as 0 (all codes 0 for Q8_0, 8 for Q4_0, 16 for Q5_0).
- Q4_K, Q6_K: llama.cpp's `nearest_int` (the +12582912.f trick): round half to EVEN, i.e. torch.round.
  gguf 0.19.0 can only decode the K-quants (its `quantize` raises NotImplementedError), so qlab's K-quant
  quantizers follow `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref` step by step (no importance matrix),
  and the tests check that gguf decodes qlab's bytes to exactly qlab's values, and that a scalar-loop port
  (float32 numpy scalars, C's order of operations) gives the same bytes.

Three torch habits would change a last bit, and with it a code, so the K-quants avoid them: `c / t` is
computed as reciprocal(t) * c (two roundings; written torch.div(c, t) here), `.sum()` adds in its own order
(`sum_in_order` adds left to right like the C), and float32 `sqrt` on CPU is not always correctly rounded
(taken in float64 here). A C build that fuses a * b + c into one FMA may still differ from llama.cpp's
reference in the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import MappingProxyType

import torch

# (elements per block, bytes per block), as gguf.constants.GGML_QUANT_SIZES
TYPE_SIZES: MappingProxyType[str, tuple[int, int]] = MappingProxyType({
    "Q8_0": (32, 2 + 32), "Q4_0": (32, 2 + 16), "Q4_1": (32, 2 + 2 + 16), "Q5_0": (32, 2 + 4 + 16),
    "Q5_1": (32, 2 + 2 + 4 + 16), "Q4_K": (256, 2 + 2 + 12 + 128), "Q6_K": (256, 128 + 64 + 16 + 2),
})
# the ggml_type number a .gguf file writes for each (gguf.GGMLQuantizationType)
GGML_TYPE_IDS: MappingProxyType[str, int] = MappingProxyType(
    {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
)
QTYPES = tuple(TYPE_SIZES)
GROUP_MAX_EPS = 1e-15  # llama.cpp: a (sub-)block whose largest |x| is below this is stored as zeros


def bits_per_weight(qtype: str) -> float:
    """Stored bits per element of `qtype`, scales included: 8 * bytes per block / elements per block."""
    block_size, type_size = TYPE_SIZES[_check_qtype(qtype)]
    return 8 * type_size / block_size


# ----------------------------------------------------------------------------- 1) rounding and bytes
def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: to the nearest integer, a half away from zero (torch.round goes to even). Exact in float32:
    floor and the fraction a - floor(a) are exact, so no `a + 0.5` that could round up (0.49999997 + 0.5 == 1)."""
    a = v.abs()
    whole = a.floor()
    return torch.copysign(whole + (a - whole >= 0.5).float(), v)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: adding 1.5 * 2**23 in float rounds to the nearest integer, a half to even
    (for |v| < 2**22, always the case here): torch.round."""
    return torch.round(v)


def sum_in_order(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension left to right in float32, as C's `for (i...) s += t[i]` does.

    torch's .sum() adds in another order. The K-quant fits solve normal equations (D = sum w * sum w l^2 -
    (sum w l)^2 cancels), so the order moves a fitted min in its 3rd digit and can flip a 6-bit code: to give
    llama.cpp's bytes, the sums follow its order. Shapes: (..., n) -> (...)."""
    columns = t.movedim(-1, 0).contiguous()  # (n, ...): one contiguous slice per step
    total = torch.zeros_like(columns[0])
    for column in columns:
        total = total + column
    return total


def _to_fp16_bytes(v: torch.Tensor, field: str, qtype: str) -> torch.Tensor:
    """float32 (n,) -> its float16 as 2 little-endian bytes (n, 2), the way GGUF stores every scale."""
    h = v.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError(f"{qtype}'s float16 {field} overflows (|{field}| = {v.abs().max().item():.4g} > 65504): "
                         "scale the tensor down before quantizing it, or keep it in F16/F32")
    return h.reshape(-1, 1).view(torch.uint8)


def _from_fp16_bytes(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) little-endian bytes -> float32 (n, 1)."""
    return b.contiguous().view(torch.float16).float()


def _shifts(bits: int, count: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, bits * count, bits, dtype=torch.uint8, device=device)


def _pack_fields(v: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., k, n) fields of `bits` bits -> (..., n) bytes: field i goes to bits [i*bits, (i+1)*bits)."""
    shifts = _shifts(bits, v.shape[-2], v.device)[:, None]  # (k, 1)
    return (v << shifts).sum(-2).to(torch.uint8)  # the fields do not overlap: sum == bitwise or


def _unpack_fields(b: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `_pack_fields`: (..., n) bytes -> (..., k, n) fields."""
    return (b.unsqueeze(-2) >> _shifts(bits, k, b.device)[:, None]) & ((1 << bits) - 1)


# ----------------------------------------------------------------------------- 2) blocks of 32: Q8_0, Qn_0, Qn_1
def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d in float32 (torch.div: correctly rounded, see the module doc), and 0 where d == 0 (an all-zero
    block), as gguf does."""
    return torch.where(d == 0, torch.zeros_like(d), torch.div(1.0, d))


def _quantize_q8_0(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    d = blocks.abs().amax(-1, keepdim=True) / 127  # 1) (n, 1) float32
    q = round_half_away(blocks * _inverse(d))  # 2) with the float32 1/d
    return torch.cat([_to_fp16_bytes(d, "scale d", qtype), q.to(torch.int8).view(torch.uint8)], dim=-1)  # 3)


def _dequantize_q8_0(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).float() * _from_fp16_bytes(blocks[:, :2])


def _pack_low_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) codes -> (n, 16) bytes: byte j = low 4 bits of q[j] | low 4 bits of q[j + 16] << 4."""
    return _pack_fields(q.view(-1, 2, 16) & 0xF, 4)


def _quantize_legacy(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """Q4_0 / Q5_0 (a signed scale, codes around 2**(bits-1)) and Q4_1 / Q5_1 (a scale and the block min)."""
    bits, with_min = int(qtype[1]), qtype.endswith("_1")
    if with_min:
        low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)  # 1) (n, 1)
        d = (high - low) / (2**bits - 1)  # 2)
        q = torch.trunc((blocks - low) * _inverse(d) + 0.5)  # 3) round half up
        head = [_to_fp16_bytes(d, "scale d", qtype), _to_fp16_bytes(low, "min m", qtype)]
    else:
        signed_max = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # 1) argmax: first of a tie
        d = signed_max / -(2 ** (bits - 1))  # 2) so signed_max -> q = 0
        q = torch.trunc(blocks * _inverse(d) + (2 ** (bits - 1) + 0.5))  # 3) round half up, centred
        head = [_to_fp16_bytes(d, "scale d", qtype)]
    q = q.clamp(0, 2**bits - 1).to(torch.uint8)  # (n, 32)
    if bits == 5:  # 4) the 5th bits: a little-endian u32 whose bit j belongs to q[j]
        head.append(_pack_fields((q >> 4).view(-1, 4, 8).transpose(1, 2), 1))  # (n, 8, 4) -> (n, 4)
    return torch.cat([*head, _pack_low_nibbles(q)], dim=-1)


def _dequantize_legacy(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    bits, with_min = int(qtype[1]), qtype.endswith("_1")
    d = _from_fp16_bytes(blocks[:, :2])  # (n, 1)
    start = 4 if with_min else 2
    q = _unpack_fields(blocks[:, -16:], 4, 2).reshape(-1, 32)  # (n, 2, 16) -> (n, 32): q[j], q[j + 16]
    if bits == 5:
        q = q | (_unpack_fields(blocks[:, start:start + 4], 1, 8).transpose(1, 2).reshape(-1, 32) << 4)
    if with_min:
        return d * q.float() + _from_fp16_bytes(blocks[:, 2:4])
    return d * (q.float() - 2 ** (bits - 1))


# ----------------------------------------------------------------------------- 3) K-quants: super-blocks of 256
def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int = 15, rmin: float = -1.0,
                     rdelta: float = 0.1, nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's weighted least-squares search for x ~ scale * L - the_min, L in [0, nmax], on each row.

    1) min = min(x) clamped to <= 0; start from scale = (max - min) / nmax and score it by sum w (x_hat - x)^2
    2) for iscale = (rmin + rdelta * i + nmax) / (max - min), i = 0..nstep: L = nearest_int(iscale (x - min)),
       then solve the weighted least squares for (scale, min) given L (min clamped to <= 0); keep the best.
       As in the C, `min` is the best min so far: a candidate that wins moves the grid the next ones use.
    A flat row (max == min) gets scale 0, codes 0 and the_min = -min.
    Shapes: x, weights (rows, n) float32 -> scale (rows,), the_min (rows,) (>= 0), L (rows, n) float codes.
    """
    low, high = x.amin(-1).clamp(max=0), x.amax(-1)  # (rows,)
    flat = high == low
    low = torch.where(flat, high - 1, low)  # any finite grid for flat rows: their result is replaced at the end
    sum_w, sum_x = sum_in_order(weights), sum_in_order(weights * x)

    def codes(numerator: float | torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        iscale = torch.div(numerator, high - minimum)  # (rows,)
        return nearest_int(iscale[:, None] * (x - minimum[:, None])).clamp(0, nmax)

    def error(scale: torch.Tensor, minimum: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        diff = scale[:, None] * L + minimum[:, None] - x
        return sum_in_order(weights * (diff * diff))

    scale, minimum, L = torch.div(1.0, torch.div(nmax, high - low)), low, codes(nmax, low)  # 1)
    best = error(scale, minimum, L)
    for i in range(nstep + 1):  # 2)
        Laux = codes(torch.tensor(rdelta, dtype=torch.float32) * i + rmin + nmax, minimum)  # float32, as in C
        wl = weights * Laux  # (rows, n)
        sum_l, sum_l2, sum_xl = sum_in_order(wl), sum_in_order(wl * Laux), sum_in_order(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0  # a positive offset is not allowed: refit the scale alone with min = 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_error = error(this_scale, this_min, Laux)
        better = (D > 0) & (this_error < best)
        best = torch.where(better, this_error, best)
        scale, minimum = torch.where(better, this_scale, scale), torch.where(better, this_min, minimum)
        L = torch.where(better[:, None], Laux, L)
    return torch.where(flat, 0.0, scale), torch.where(flat, -high, -minimum), torch.where(flat[:, None], 0.0, L)


def make_qx_quants(x: torch.Tensor, nmax: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's symmetric scale search (rmse_type=1, weights x^2) for x ~ scale * l, l in [-nmax, nmax-1].

    1) max = the signed value of largest |x| (first on a tie); iscale = -nmax / max; l = nearest_int(iscale x)
    2) scale = sum w x l / sum w l^2 (the least-squares scale for those codes)
    3) for iscale = -(nmax + 0.1 i) / max, i = -9..9 (not 0): keep the codes maximising (sum w x l)^2 / sum w l^2
    A row whose max |x| < GROUP_MAX_EPS gets scale 0 and codes 0 (stored as l + nmax, like the C).
    Shapes: x (rows, n) float32 -> scale (rows,), L = l + nmax (rows, n) float codes in [0, 2 nmax).
    """
    signed_max = x.gather(-1, x.abs().argmax(-1, keepdim=True))[:, 0]  # 1)
    tiny = signed_max.abs() < GROUP_MAX_EPS
    signed_max = torch.where(tiny, torch.ones_like(signed_max), signed_max)
    w = x * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        l = nearest_int(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return l, sum_in_order(w * x * l), sum_in_order(w * l * l)

    l, sumlx, suml2 = fit(torch.div(-nmax, signed_max))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))  # 2)
    best = scale * sumlx
    for i in [*range(-9, 0), *range(1, 10)]:  # 3)
        step = torch.tensor(0.1, dtype=torch.float32) * i + nmax
        l_i, sumlx_i, suml2_i = fit(torch.div(-step, signed_max))
        better = (suml2_i > 0) & (sumlx_i * sumlx_i > best * suml2_i)
        scale = torch.where(better, sumlx_i / suml2_i, scale)
        best = torch.where(better, scale * sumlx_i, best)
        l = torch.where(better[:, None], l_i, l)
    return torch.where(tiny, 0.0, scale), torch.where(tiny[:, None], 0.0, l + nmax)


def _quantize_q4_k(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    n = blocks.shape[0]
    sub = blocks.view(n * 8, 32)  # 8 sub-blocks of 32 per super-block
    # 1) w = rms + |x|; sqrt in float64 then rounded once, which is exactly C's sqrtf
    weights = (sum_in_order(sub * sub)[:, None] / 32).double().sqrt().float() + sub.abs()
    scales, mins, L = make_qkx2_quants(sub, weights)  # 2) (n*8,), (n*8,), (n*8, 32)
    scales, mins, L = scales.view(n, 8), mins.view(n, 8), L.view(n, 8, 32)
    # 3) super-block scales: C starts from +0 and takes a strictly larger value (so never -0.0, which clamp keeps)
    max_scale, max_min = [torch.where(v > 0, v, 0.0) for v in (scales.amax(-1), mins.amax(-1))]
    inv_scale = torch.where(max_scale > 0, torch.div(63.0, max_scale), 0.0)[:, None]
    inv_min = torch.where(max_min > 0, torch.div(63.0, max_min), 0.0)[:, None]
    # 4) 6-bit sub-block scale and min; C stores nearest_int in a uint8_t, then MIN(63, .)
    ls = (nearest_int(inv_scale * scales).to(torch.int32) & 0xFF).clamp(max=63).to(torch.uint8)
    lm = (nearest_int(inv_min * mins).to(torch.int32) & 0xFF).clamp(max=63).to(torch.uint8)
    d16, dmin16 = _to_fp16_bytes(max_scale / 63, "scale d", qtype), _to_fp16_bytes(max_min / 63, "min dmin", qtype)
    d = _from_fp16_bytes(d16) * ls.float()  # (n, 8): the scales the file will hold
    dm = _from_fp16_bytes(dmin16) * lm.float()
    requant = nearest_int((blocks.view(n, 8, 32) + dm[..., None]) / d[..., None]).clamp(0, 15)  # 5)
    L = torch.where(d[..., None] != 0, requant, L).to(torch.uint8)  # C skips a sub-block whose scale is 0
    packed_scales = torch.cat([ls[:, :4] | (ls[:, 4:] >> 4) << 6, lm[:, :4] | (lm[:, 4:] >> 4) << 6,
                               (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4], dim=-1)  # (n, 12)
    qs = _pack_fields(L.view(n, 4, 2, 32), 4).view(n, 128)  # chunk c: sub-block 2c low, 2c + 1 high nibble
    return torch.cat([d16, dmin16, packed_scales, qs], dim=-1)


def _dequantize_q4_k(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    n = blocks.shape[0]
    s = blocks[:, 4:16]
    sc = torch.cat([s[:, :4] & 63, (s[:, 8:] & 0xF) | (s[:, :4] >> 6) << 4], dim=-1).float()  # (n, 8)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:] >> 4) | (s[:, 4:8] >> 6) << 4], dim=-1).float()
    q = _unpack_fields(blocks[:, 16:].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32).float()
    d, dmin = _from_fp16_bytes(blocks[:, :2]), _from_fp16_bytes(blocks[:, 2:4])
    return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(n, 256)


def _quantize_q6_k(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    n = blocks.shape[0]
    scales, L = make_qx_quants(blocks.view(n * 16, 16), nmax=32)  # 1) 16 sub-blocks of 16
    scales, L = scales.view(n, 16), L.view(n, 16, 16)
    max_scale = scales.gather(-1, scales.abs().argmax(-1, keepdim=True))  # 2) signed, largest |scale| (n, 1)
    zero = max_scale.abs() < GROUP_MAX_EPS  # such a super-block is stored as all zero bytes
    iscale = torch.where(zero, 0.0, torch.div(-128.0, torch.where(zero, 1.0, max_scale)))
    d16 = _to_fp16_bytes(torch.where(zero, 0.0, torch.div(1.0, iscale)), "scale d", qtype)  # 3) d = max_scale / -128
    sc = nearest_int(iscale * scales).clamp(max=127)  # 4) int8 sub-block scales; max_scale -> -128
    d = _from_fp16_bytes(d16) * sc  # (n, 16)
    requant = nearest_int(blocks.view(n, 16, 16) / d[..., None]).clamp(-32, 31) + 32  # 5)
    L = torch.where(d[..., None] != 0, requant, torch.where(zero[..., None], 0.0, L))
    L = L.to(torch.uint8).view(n, 2, 4, 32)  # halves of 128, quarters of 32
    # quarter r = 2f + p: byte 32p + l of a half holds quarter p (f = 0) low and quarter p + 2 (f = 1) high
    ql = _pack_fields((L & 0xF).view(n, 2, 2, 2, 32).transpose(-3, -2), 4).reshape(n, 128)  # (n, 2, p, f, 32)
    qh = _pack_fields(L >> 4, 2).view(n, 64)  # byte l: quarters 0..3 in bits 0-1, 2-3, 4-5, 6-7
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), d16], dim=-1)


def _dequantize_q6_k(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    n = blocks.shape[0]
    low = _unpack_fields(blocks[:, :128].reshape(n, 2, 2, 32), 4, 2)  # (n, 2, p, f, 32)
    low = low.transpose(-3, -2).reshape(n, 2, 4, 32)  # quarter r = 2f + p
    high = _unpack_fields(blocks[:, 128:192].reshape(n, 2, 32), 2, 4)  # (n, 2, 4, 32)
    q = (low | high << 4).reshape(n, 16, 16).float() - 32
    sc = blocks[:, 192:208].view(torch.int8).float()  # (n, 16)
    d = _from_fp16_bytes(blocks[:, 208:210])
    return ((d * sc)[..., None] * q).reshape(n, 256)


# ----------------------------------------------------------------------------- 4) the public functions
_LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
# qtype -> f(blocks (n_blocks, block_size) float32, qtype) -> bytes (n_blocks, type_size), and the inverse
_QUANTIZE = {"Q8_0": _quantize_q8_0, **dict.fromkeys(_LEGACY, _quantize_legacy), "Q4_K": _quantize_q4_k,
             "Q6_K": _quantize_q6_k}
_DEQUANTIZE = {"Q8_0": _dequantize_q8_0, **dict.fromkeys(_LEGACY, _dequantize_legacy), "Q4_K": _dequantize_q4_k,
               "Q6_K": _dequantize_q6_k}


def _check_qtype(qtype: str) -> str:
    if qtype not in TYPE_SIZES:
        hint = f" (did you mean {qtype.upper()!r}?)" if isinstance(qtype, str) and qtype.upper() in TYPE_SIZES else ""
        raise ValueError(f"qtype={qtype!r} is not a GGUF type qlab.gguf implements{hint}; use one of {QTYPES}")
    return qtype


def _check_rows(shape: Sequence[int], qtype: str) -> None:
    if len(shape) == 0 or math.prod(shape) == 0:
        raise ValueError(f"{qtype} quantizes rows of blocks, got shape {tuple(shape)}: give a non-empty tensor "
                         "with at least one dimension")
    block_size, n = TYPE_SIZES[qtype][0], shape[-1]
    if n % block_size:
        others = [t for t, (b, _) in TYPE_SIZES.items() if n % b == 0]
        alt = f", or use a type with smaller blocks ({', '.join(others)})" if others else ""
        raise ValueError(f"{qtype} needs rows whose length is a multiple of {block_size}, got {n}: pad the last "
                         f"dimension to {block_size * math.ceil(n / block_size)}{alt}")


def quantize(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """The GGUF bytes of `x` in `qtype`, row by row (the rounding rules are in the module doc).

    Args:
        x: a float tensor (float32, float16, bfloat16 or float64; computed in float32 as llama.cpp does) whose
            last dimension is a multiple of the block size (32, or 256 for the K-quants).
        qtype: one of QTYPES.
    Returns:
        uint8 (*x.shape[:-1], x.shape[-1] // block_size * type_size): what a .gguf file stores, and what
        `gguf.quants.quantize(x.numpy(), GGMLQuantizationType[qtype])` returns.
    """
    _check_qtype(qtype)
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"quantize takes a float tensor (float32, float16, bfloat16 or float64), got {got}: "
                         "GGUF quantizes float weights; convert with .float() if the values are meant as numbers")
    _check_rows(x.shape, qtype)
    flat = x.detach().float()
    if not torch.isfinite(flat).all():
        bad = (~torch.isfinite(flat)).sum().item()
        raise ValueError(f"x holds {bad} NaN or Inf value(s) (in float32): {qtype}'s block scales would be NaN or "
                         "Inf and the whole block lost; clean or clamp the tensor first")
    block_size, type_size = TYPE_SIZES[qtype]
    blocks = flat.reshape(-1, block_size)  # (n_blocks, block_size)
    data = _QUANTIZE[qtype](blocks, qtype)  # (n_blocks, type_size)
    return data.reshape(*x.shape[:-1], x.shape[-1] // block_size * type_size)


def dequantize(data: torch.Tensor, qtype: str, shape: Sequence[int]) -> torch.Tensor:
    """The float32 values that GGUF bytes `data` of type `qtype` stand for, in `shape`.

    Args:
        data: uint8 bytes as `quantize` returns them (any shape with the right number of bytes).
        qtype: one of QTYPES.
        shape: the tensor's shape; its last dimension is a multiple of the block size.
    Returns:
        float32 `shape`, computed with the same float32 operations, in the same order, as
        `gguf.quants.dequantize` (and llama.cpp's dequantize_row_*), so the values agree bit for bit.
    """
    _check_qtype(qtype)
    shape = tuple(shape)
    _check_rows(shape, qtype)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        got = data.dtype if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"dequantize takes the uint8 bytes that quantize returns, got {got}; "
                         "for a numpy array use torch.from_numpy(array.view(numpy.uint8))")
    block_size, type_size = TYPE_SIZES[qtype]
    n_blocks = math.prod(shape) // block_size
    if data.numel() != n_blocks * type_size:
        raise ValueError(f"{qtype} stores a tensor of shape {shape} in {n_blocks * type_size} bytes ({n_blocks} "
                         f"blocks of {type_size}), got {data.numel()}: check the qtype and the shape")
    return _DEQUANTIZE[qtype](data.reshape(n_blocks, type_size), qtype).reshape(shape)


__all__ = ["TYPE_SIZES", "GGML_TYPE_IDS", "QTYPES", "GROUP_MAX_EPS", "bits_per_weight", "round_half_away",
           "nearest_int", "sum_in_order", "make_qkx2_quants", "make_qx_quants", "quantize", "dequantize"]
