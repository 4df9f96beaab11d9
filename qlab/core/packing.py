"""Bit packing: store sub-byte codes densely, 8 / bits codes per byte (bits = 1, 2 or 4).

qlab's order (one order for every width): the tensor is flattened in row-major order, padded with zero
codes to a whole number of bytes, and element i goes to bits [w * (i % c), w * (i % c) + w) of byte i // c,
where w is the storage width and c = 8 // w codes per byte: the FIRST element sits in the LOWEST bits.
For 4 bits:

    byte i = (q[2i] & 0xF) | ((q[2i+1] & 0xF) << 4)          element 2i in the LOW nibble

AutoGPTQ packs eight 4-bit codes per int32 in the same lowest-first order. bitsandbytes uses the
opposite order within a byte (element 2i in the HIGH nibble; tests/test_core.py checks it against
bitsandbytes itself), so its bytes must have their nibbles swapped before `unpack`; GGUF's Q4_0 pairs
element i with element i + 16 of its 32-element block instead of with its neighbour.
Widths that are not 1, 2 or 4 are stored in the next of those (3-bit codes take a nibble each), so the
packed size of n codes of b bits is ceil(n * storage_bits(b) / 8) bytes, as `packed_nbytes` says.
Signed codes are stored as w-bit two's complement (-1 -> 0b1111 in a nibble); `unpack` sign-extends them
when told the codes were signed.
"""

from __future__ import annotations

import math

import torch

STORAGE_BITS = (1, 2, 4, 8)


def storage_bits(bits: int) -> int:
    """The container width a `bits`-bit code is stored in: the smallest of 1, 2, 4, 8 that holds it."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} must be an integer in [1, 8]")
    return next(w for w in STORAGE_BITS if w >= bits)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `pack` uses for `numel` codes of `bits` bits."""
    return math.ceil(numel * storage_bits(bits) / 8)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes of at most `bits` bits (signed or unsigned) into uint8, qlab's order (module doc).

    Returns a uint8 tensor of shape (packed_nbytes(q.numel(), bits),).
    """
    w = storage_bits(bits)
    if w == 8:
        raise ValueError("8-bit codes need no packing; store them as int8 / uint8")
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"pack expects an integer tensor of codes, e.g. the output of ql.quantize(x, ..., ql.int{bits})")
    flat = q.reshape(-1).to(torch.int16)
    lo, hi = -(2 ** (bits - 1)), 2**bits - 1
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi or (int(flat.min()) < 0 and int(flat.max()) > -lo - 1)):
        raise ValueError(
            f"codes in [{int(flat.min())}, {int(flat.max())}] do not fit in {bits} bits; "
            f"pack signed codes in [{lo}, {-lo - 1}] or unsigned codes in [0, {hi}]"
        )
    per = 8 // w
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    fields = (flat & (2**w - 1)).to(torch.uint8).reshape(-1, per)  # (bytes, per): first element first
    shifts = torch.arange(0, 8, w, dtype=torch.uint8)  # 0, w, 2w, ...
    return (fields << shifts).sum(dim=1, dtype=torch.uint8)  # fields never overlap, so sum == bitwise or


def unpack(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size, bits: int, signed: bool = True) -> torch.Tensor:
    """Inverse of `pack`: codes of `shape`, int8 if `signed` else uint8."""
    w = storage_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError("unpack expects the uint8 tensor returned by ql.pack")
    shape = tuple(shape)
    n = math.prod(shape)
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(
            f"a packed buffer of {packed.numel()} bytes holds {packed.numel() * (8 // w)} codes of {bits} bits, "
            f"but shape {shape} needs {n}; pass the shape the codes had before packing"
        )
    shifts = torch.arange(0, 8, w, dtype=torch.uint8, device=packed.device)
    fields = (packed.reshape(-1, 1) >> shifts) & (2**w - 1)  # (bytes, per)
    codes = fields.reshape(-1)[:n]
    if signed:
        codes = codes.to(torch.int8)
        codes = torch.where(codes >= 2 ** (w - 1), codes - 2**w, codes)  # sign-extend the field
    return codes.reshape(shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (signed in [-8, 7] or unsigned in [0, 15]) two per byte: `pack(q, 4)`.

    Returns a uint8 tensor of shape (ceil(q.numel() / 2),); element 2i in the low nibble of byte i.
    """
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError("pack_int4 expects an integer tensor of codes, e.g. the output of ql.quantize(x, ..., ql.int4)")
    return pack(q, 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size, signed: bool = True) -> torch.Tensor:
    """Inverse of `pack_int4`: recover codes of `shape` (int8 if `signed`, else uint8)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError("unpack_int4 expects the uint8 tensor returned by ql.pack_int4")
    return unpack(packed, shape, 4, signed)
