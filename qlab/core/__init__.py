"""qlab.core: integer types, granularities and the quantize/dequantize primitives."""

from .granularity import PerChannel, PerGroup, PerTensor, PerToken, qparam_shape
from .packing import pack, pack_int4, packed_nbytes, storage_bits, unpack, unpack_int4
from .primitives import choose_qparams, dequantize, fake_quantize, quantize
from .qtensor import QTensor, quantize_tensor
from .qtypes import QType, int2, int4, int8, qtype, uint4, uint8

__all__ = [
    "QType", "qtype", "int8", "uint8", "int4", "uint4", "int2",
    "PerTensor", "PerChannel", "PerGroup", "PerToken", "qparam_shape",
    "choose_qparams", "quantize", "dequantize", "fake_quantize",
    "QTensor", "quantize_tensor",
    "pack", "unpack", "storage_bits", "pack_int4", "unpack_int4", "packed_nbytes",
]
