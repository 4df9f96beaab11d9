"""QTensor: a quantized tensor that owns its codes, qparams and real storage size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .granularity import Granularity, PerTensor
from .packing import pack_int4, unpack_int4
from .primitives import choose_qparams, dequantize, quantize
from .qtypes import QType


@dataclass
class QTensor:
    """Integer codes plus the qparams that turn them back into real numbers.

    Attributes:
        qdata: the stored codes. 4-bit (and narrower) types are bit-packed two codes per uint8 byte
            (see ql.pack_int4), so `qdata.numel()` is half the element count; 8-bit types keep one
            code per int8/uint8 element.
        scale, zero_point: per-slice qparams (shapes in qlab.core.granularity).
        qtype, granularity, symmetric: how the codes were made.
        shape: the shape of the original tensor.
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    qtype: QType
    granularity: Granularity
    shape: torch.Size
    symmetric: bool = True
    dtype: torch.dtype = torch.float32

    @property
    def packed(self) -> bool:
        """True if two codes share each byte of `qdata`."""
        return self.qtype.bits <= 4

    def int_repr(self) -> torch.Tensor:
        """The codes, one per element, in the original shape (unpacked if needed)."""
        if self.packed:
            return unpack_int4(self.qdata, self.shape, signed=self.qtype.signed)
        return self.qdata

    def dequantize(self) -> torch.Tensor:
        """The real values the codes stand for, in the original dtype."""
        return dequantize(self.int_repr(), self.scale, self.zero_point, self.granularity).to(self.dtype)

    @property
    def nbytes(self) -> int:
        """Real storage in bytes: packed codes + scales + zero points.

        A symmetric QTensor stores no zero points (they are all 0 by construction), so none are counted.
        """
        total = self.qdata.numel() * self.qdata.element_size() + self.scale.numel() * self.scale.element_size()
        if not self.symmetric:
            total += self.zero_point.numel() * self.zero_point.element_size()
        return total

    def __repr__(self) -> str:
        return (
            f"QTensor(shape={tuple(self.shape)}, qtype={self.qtype!r}, granularity={self.granularity}, "
            f"nbytes={self.nbytes})"
        )


def quantize_tensor(
    x: torch.Tensor,
    qtype: QType,
    granularity: Granularity = PerTensor(),
    symmetric: bool = True,
) -> QTensor:
    """Quantize `x` into a QTensor (codes bit-packed for types of 4 bits or fewer)."""
    scale, zero_point = choose_qparams(x, qtype, granularity, symmetric)
    q = quantize(x, scale, zero_point, qtype, granularity)
    qdata = pack_int4(q) if qtype.bits <= 4 else q
    return QTensor(qdata, scale, zero_point, qtype, granularity, x.shape, symmetric, x.dtype)
