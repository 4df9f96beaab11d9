"""qlab: the library behind the QLab quantization course.

    import qlab as ql
    scale, zero_point = ql.choose_qparams(w, ql.int8, ql.PerChannel(axis=0))
    q = ql.quantize(w, scale, zero_point, ql.int8, ql.PerChannel(axis=0))
    w_hat = ql.dequantize(q, scale, zero_point, ql.PerChannel(axis=0))
    print(ql.metrics.sqnr_db(w, w_hat))
"""

from . import data, eval, metrics, models
from .core import (
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QTensor,
    QType,
    choose_qparams,
    dequantize,
    fake_quantize,
    int2,
    int4,
    int8,
    pack_int4,
    packed_nbytes,
    qparam_shape,
    qtype,
    quantize,
    quantize_tensor,
    uint4,
    uint8,
    unpack_int4,
)
from .formats import FORMATS, nf4_codebook, representable_values, round_to_format, spacing

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "viz":  # matplotlib is imported only when a plot is asked for
        import importlib

        return importlib.import_module(".viz", __name__)
    raise AttributeError(f"module 'qlab' has no attribute {name!r}")

__all__ = [
    "QType", "qtype", "int8", "uint8", "int4", "uint4", "int2",
    "PerTensor", "PerChannel", "PerGroup", "PerToken", "qparam_shape",
    "choose_qparams", "quantize", "dequantize", "fake_quantize",
    "QTensor", "quantize_tensor",
    "pack_int4", "unpack_int4", "packed_nbytes",
    "FORMATS", "round_to_format", "nf4_codebook", "representable_values", "spacing",
    "metrics", "data", "eval", "models", "viz",
]
