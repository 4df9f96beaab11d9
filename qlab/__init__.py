"""qlab: the library behind the QLab quantization course.

    import qlab as ql
    scale, zero_point = ql.choose_qparams(w, ql.int8, ql.PerChannel(axis=0))
    q = ql.quantize(w, scale, zero_point, ql.int8, ql.PerChannel(axis=0))
    w_hat = ql.dequantize(q, scale, zero_point, ql.PerChannel(axis=0))
    print(ql.metrics.sqnr_db(w, w_hat))
"""

from . import (
    api,
    awq,
    bias_correction,
    bitnet,
    bn_folding,
    calibration,
    cle,
    data,
    deploy,
    eval,
    export,
    fp8,
    gguf,
    gptq,
    kernels,
    kv_cache,
    labs,
    llm_int8,
    lora,
    metrics,
    models,
    nf4,
    nn,
    observers,
    qat,
    sensitivity,
    smoothquant,
)
from .api import (
    FakeQuantConfig,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
    quantize_,
    register_handler,
    swap_modules,
)
from .bias_correction import bias_correction_
from .bn_folding import fold_batchnorm_
from .cle import equalize_
from .nn import Int4WeightOnlyLinear, Int8WeightOnlyLinear, QuantConv2d, QuantLinear, WeightOnlyLinear
from .observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    qparams_from_range,
)
from .qat import FakeQuantConv2d, FakeQuantLinear, FakeQuantize, LSQFakeQuantize, convert_, fake_quantize_ste, qat_schedule_
from .sensitivity import assign_mixed_precision, layer_sensitivity
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
    pack,
    packed_nbytes,
    qparam_shape,
    qtype,
    quantize,
    quantize_tensor,
    uint4,
    uint8,
    unpack,
    unpack_int4,
)
from .core.qtensor import from_codes
from .awq import AWQConfig
from .gptq import GPTQConfig, RTNConfig
from .bitnet import BitNetConfig
from .fp8 import FP8Config, FP8Linear
from .lora import LoRAConfig, LoRALinear
from .nf4 import NF4Config, NF4Linear
from .llm_int8 import Int8OutlierLinear, LLMInt8Config
from .smoothquant import SmoothQuantConfig
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
    "pack", "unpack", "pack_int4", "unpack_int4", "packed_nbytes", "from_codes",
    "FORMATS", "round_to_format", "nf4_codebook", "representable_values", "spacing",
    "metrics", "data", "eval", "models", "viz",
    "observers", "calibration", "bn_folding", "cle", "bias_correction", "sensitivity", "api", "nn", "qat", "kernels",
    "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver", "HistogramObserver", "MSEObserver",
    "qparams_from_range", "fold_batchnorm_", "equalize_", "bias_correction_", "layer_sensitivity",
    "assign_mixed_precision",
    "quantize_", "QuantConfig", "register_handler", "swap_modules", "Int8DynamicConfig", "Int8StaticConfig", "Int8WeightOnlyConfig", "Int4WeightOnlyConfig",
    "FakeQuantConfig", "QuantLinear", "QuantConv2d", "WeightOnlyLinear", "Int8WeightOnlyLinear", "Int4WeightOnlyLinear",
    "fake_quantize_ste", "LSQFakeQuantize", "FakeQuantize", "FakeQuantLinear", "FakeQuantConv2d",
    "qat_schedule_", "convert_", "llm_int8", "LLMInt8Config", "Int8OutlierLinear", "smoothquant", "SmoothQuantConfig",
    "export", "gptq", "GPTQConfig", "RTNConfig", "awq", "AWQConfig", "nf4", "NF4Config", "NF4Linear", "lora",
    "LoRAConfig", "LoRALinear", "fp8", "FP8Config", "FP8Linear", "gguf", "bitnet", "kv_cache", "labs", "deploy",
    "BitNetConfig",
]
