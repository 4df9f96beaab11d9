"""QTensor: a quantized tensor that owns its codes, qparams and real storage size.

Its fields are the canonical, machine-independent layout every quantized module persists and every
exporter (AutoGPTQ, GGUF, ONNX) reads: codes bit-packed in qlab's documented order (ql.pack), scale,
zero_point, and optionally g_idx. Kernels derive their own layouts from it and never save them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .granularity import Granularity, PerGroup, PerTensor
from .packing import pack, storage_bits, unpack
from .primitives import choose_qparams, dequantize, quantize
from .qtypes import QType


@dataclass
class QTensor:
    """Integer codes plus the qparams that turn them back into real numbers.

    Attributes:
        qdata: the stored codes. Types of fewer than 8 bits are bit-packed by `ql.pack(q, bits)` into a flat
            uint8 tensor (4-bit: two codes per byte; 2-bit: four), so `qdata.numel()` is the packed size;
            8-bit types keep one code per int8/uint8 element in the original shape.
        scale, zero_point: per-slice qparams (shapes in qlab.core.granularity). `scale` may itself be a
            QTensor (double quantization): it is dequantized first.
        qtype, granularity, symmetric: how the codes were made.
        shape: the shape of the original tensor; dtype: its dtype.
        g_idx: optional (K,) int tensor, PerGroup only: column k of the weight uses group g_idx[k] of the
            qparams instead of k // group_size (GPTQ's activation order).
    """

    qdata: torch.Tensor
    scale: torch.Tensor | QTensor
    zero_point: torch.Tensor
    qtype: QType
    granularity: Granularity
    shape: torch.Size
    symmetric: bool = True
    dtype: torch.dtype = torch.float32
    g_idx: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        """True if several codes share each byte of `qdata`."""
        return storage_bits(self.qtype.bits) < 8

    def int_repr(self) -> torch.Tensor:
        """The codes, one per element, in the original shape (unpacked if needed)."""
        if self.packed:
            return unpack(self.qdata, self.shape, self.qtype.bits, signed=self.qtype.signed)
        return self.qdata

    def scale_values(self) -> torch.Tensor:
        """The scales as float32 (dequantized first when they are quantized themselves)."""
        return self.scale.dequantize().float() if isinstance(self.scale, QTensor) else self.scale

    def dequantize(self) -> torch.Tensor:
        """The real values the codes stand for, in the original dtype."""
        q, scale, zero_point = self.int_repr(), self.scale_values(), self.zero_point
        if self.g_idx is None:
            return dequantize(q, scale, zero_point, self.granularity).to(self.dtype)
        g = self.g_idx.long()  # (K,): the qparam column of every weight column
        return ((q.to(torch.int32) - zero_point[:, g]).float() * scale[:, g]).to(self.dtype)

    def to(self, device: torch.device | str) -> QTensor:
        """The same QTensor with every tensor on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, qdata=move(self.qdata), scale=self.scale.to(device) if isinstance(self.scale, QTensor)
                       else move(self.scale), zero_point=move(self.zero_point), g_idx=move(self.g_idx))

    @property
    def nbytes(self) -> int:
        """Real storage in bytes: packed codes + scales + zero points (+ g_idx).

        A symmetric QTensor stores no zero points (they are all 0 by construction), so none are counted.
        """
        scale_bytes = self.scale.nbytes if isinstance(self.scale, QTensor) else self.scale.numel() * self.scale.element_size()
        total = self.qdata.numel() * self.qdata.element_size() + scale_bytes
        if not self.symmetric:
            total += self.zero_point.numel() * self.zero_point.element_size()
        if self.g_idx is not None:
            total += self.g_idx.numel() * self.g_idx.element_size()
        return total

    def __repr__(self) -> str:
        return (
            f"QTensor(shape={tuple(self.shape)}, qtype={self.qtype!r}, granularity={self.granularity}, "
            f"nbytes={self.nbytes})"
        )


def from_codes(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qtype: QType,
    granularity: Granularity,
    symmetric: bool = True,
    dtype: torch.dtype = torch.float32,
    g_idx: torch.Tensor | None = None,
) -> QTensor:
    """A QTensor from codes someone else chose (GPTQ, AWQ, a checkpoint): packs them in qlab's order."""
    if q.is_floating_point():
        raise ValueError(f"from_codes takes integer codes, got {q.dtype}; quantize first (ql.quantize)")
    if g_idx is not None and not isinstance(granularity, PerGroup):
        raise ValueError(f"g_idx reorders groups, so it needs PerGroup granularity, got {granularity}")
    q = q.to(qtype.storage_dtype)
    if zero_point is None:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    qdata = pack(q, qtype.bits) if storage_bits(qtype.bits) < 8 else q
    return QTensor(qdata, scale, zero_point.to(torch.int32), qtype, granularity, q.shape, symmetric, dtype, g_idx)


def quantize_tensor(
    x: torch.Tensor,
    qtype: QType,
    granularity: Granularity = PerTensor(),
    symmetric: bool = True,
) -> QTensor:
    """Quantize `x` into a QTensor (codes bit-packed for types of fewer than 8 bits)."""
    scale, zero_point = choose_qparams(x, qtype, granularity, symmetric)
    q = quantize(x, scale, zero_point, qtype, granularity, symmetric)
    return from_codes(q, scale, zero_point, qtype, granularity, symmetric, x.dtype)
