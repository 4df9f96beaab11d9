"""Integer quantized types: how many bits, signed or not, and the code range they give.

A b-bit integer type stores 2**b codes:

    signed   (two's complement)  qmin = -2**(b-1)   qmax = 2**(b-1) - 1     int8: [-128, 127]
    unsigned                     qmin = 0           qmax = 2**b - 1         uint8: [0, 255]

Symmetric quantization uses the *restricted* signed range [-qmax, qmax] (int8: [-127, 127]) so that
the grid is symmetric around zero; see `qlab.core.primitives`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class QType:
    """An integer quantized type: `bits` wide, `signed` or not.

    Args:
        name: a short label such as "int8" (used in error messages and reprs).
        bits: width of one code, 1..8.
        signed: two's-complement codes if True, non-negative codes if False.
    """

    name: str
    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"bits={self.bits!r} is not supported; qlab's integer types are 1..8 bits wide "
                f"(ql.int8, ql.uint8, ql.int4, ql.uint4, ql.int2, or ql.qtype(bits, signed))"
            )
        if self.signed and self.bits < 2:
            raise ValueError("a signed type needs at least 2 bits; use signed=False for 1-bit codes")

    @property
    def qmin(self) -> int:
        """Smallest code."""
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest code."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """The torch dtype that holds one unpacked code (int8 or uint8)."""
        return torch.int8 if self.signed else torch.uint8

    def __repr__(self) -> str:
        return f"ql.{self.name}"


def qtype(bits: int, signed: bool = True) -> QType:
    """The integer type with `bits` bits, e.g. `qtype(3)` is a signed 3-bit type with codes [-4, 3]."""
    return QType(f"{'int' if signed else 'uint'}{bits}", bits, signed)


int8 = qtype(8, signed=True)
uint8 = qtype(8, signed=False)
int4 = qtype(4, signed=True)
uint4 = qtype(4, signed=False)
int2 = qtype(2, signed=True)
