"""Bit packing: store sub-byte codes densely, two 4-bit codes per byte.

Layout (the one bitsandbytes and most int4 kernels use for a flat buffer): the tensor is flattened in
row-major order, padded with one zero code if it has an odd number of elements, and element 2i goes to
the LOW nibble of byte i, element 2i+1 to the HIGH nibble:

    byte i = (q[2i] & 0xF) | ((q[2i+1] & 0xF) << 4)

Signed codes are stored as 4-bit two's complement (-1 -> 0b1111), so unpacking must be told whether
the codes were signed; it sign-extends the nibble when they were.
"""

from __future__ import annotations

import math

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (signed in [-8, 7] or unsigned in [0, 15]) two per byte.

    Args:
        q: integer tensor of any shape.

    Returns:
        uint8 tensor of shape (ceil(q.numel() / 2),).
    """
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError("pack_int4 expects an integer tensor of codes, e.g. the output of ql.quantize(x, ..., ql.int4)")
    flat = q.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < -8 or int(flat.max()) > 15 or (int(flat.min()) < 0 and int(flat.max()) > 7)):
        raise ValueError(
            f"codes in [{int(flat.min())}, {int(flat.max())}] do not fit in 4 bits; "
            "pack signed codes in [-8, 7] or unsigned codes in [0, 15]"
        )
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = (flat & 0xF).to(torch.uint8).reshape(-1, 2)  # (N/2, 2): [low, high]
    return nibbles[:, 0] | (nibbles[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size, signed: bool = True) -> torch.Tensor:
    """Inverse of `pack_int4`: recover codes of `shape` (int8 if `signed`, else uint8)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError("unpack_int4 expects the uint8 tensor returned by ql.pack_int4")
    shape = tuple(shape)
    n = math.prod(shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"a packed buffer of {packed.numel()} bytes holds {2 * packed.numel()} codes, "
            f"but shape {shape} needs {n}; pass the shape the codes had before packing"
        )
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat & 0xF, flat >> 4], dim=-1).reshape(-1)[:n]  # (N,)
    if signed:
        codes = nibbles.to(torch.int8)
        codes = torch.where(codes >= 8, codes - 16, codes)  # sign-extend the nibble
        return codes.reshape(shape)
    return nibbles.reshape(shape)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to store `numel` codes of `bits` bits each when packed densely."""
    return math.ceil(numel * bits / 8)
