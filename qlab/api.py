"""quantize_(model, config): one entry point that swaps a model's layers for quantized ones, in place.

    ql.quantize_(model, ql.Int8DynamicConfig())                              # W8A8, activation scales per token at run time
    ql.quantize_(model, ql.Int8StaticConfig(), calib_data=batches)           # W8A8, activation scales from calibration
    ql.quantize_(model, ql.Int8WeightOnlyConfig())                           # int8 weights, float math
    ql.quantize_(model, ql.Int4WeightOnlyConfig(group_size=128))             # 4-bit group-wise weights
    ql.quantize_(model, ql.FakeQuantConfig(weight_bits=4, act_bits=4), calib_data=batches)   # ready for QAT

Every config is a frozen dataclass checked when it is built. `include` / `exclude` are fnmatch patterns
over module names as `model.named_modules()` spells them ("blocks.*.mlp.*", "lm_head"); a layer is
quantized when its type fits the config, some include pattern matches and no exclude pattern does.

Static calibration: the calib_data batches run through the model (eval mode, no grad) while each target
layer's input goes to an observer; the layer then gets the observer's (scale, zero_point). The default
observer tracks the min and max over all batches; pass `observer=` any zero-argument factory of objects
with `__call__(x)` and `calculate_qparams()` to use another one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .core.granularity import Granularity, PerChannel, PerTensor, PerToken
from .core.qtypes import QType, int8, uint8
from .nn import WEIGHT_GRANULARITIES, Int4WeightOnlyLinear, Int8WeightOnlyLinear, QuantConv2d, QuantLinear
from .calibration import calibrate, run_batch
from .observers import MinMaxObserver
from .qat import FakeQuantConv2d, FakeQuantize, FakeQuantLinear, act_fake_quant, weight_fake_quant


def _patterns(value, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(p, str) for p in value):
        raise ValueError(f"{name} must be a pattern string or a tuple of them, like ('blocks.*', 'lm_head'); got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class _Selection:
    """include / exclude fnmatch patterns over module names, shared by every config."""

    include: tuple[str, ...] | str = ("*",)
    exclude: tuple[str, ...] | str = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))

    def selects(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )


def _check_w(granularity_w: Granularity) -> None:
    if granularity_w not in WEIGHT_GRANULARITIES:
        raise ValueError(
            f"granularity_w={granularity_w} cannot be factored out of an integer GEMM; use ql.PerChannel(0) or "
            "ql.PerTensor() (for group-wise weights use Int4WeightOnlyConfig(group_size=...))"
        )


@dataclass(frozen=True)
class Int8DynamicConfig(_Selection):
    """W8A8, dynamic: int8 weights offline; each activation row gets its scale when it arrives.

    Targets nn.Linear and nn.Conv2d (convolutions quantize their im2col patches with act_granularity).
    """

    granularity_w: Granularity = PerChannel(0)
    act_granularity: Granularity = PerToken()
    act_symmetric: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_w(self.granularity_w)
        if self.act_granularity not in (PerToken(), PerTensor()):
            raise ValueError(f"act_granularity must be ql.PerToken() or ql.PerTensor(), got {self.act_granularity!r}")


@dataclass(frozen=True)
class Int8StaticConfig(_Selection):
    """W8A8, static: int8 weights; one activation scale per layer input, fixed by calibration (needs calib_data).

    observer: zero-argument factory of observers (default: min/max over all calibration batches). It must
    return qparams for ql.int8 if act_symmetric else ql.uint8.
    """

    granularity_w: Granularity = PerChannel(0)
    act_granularity: Granularity = PerTensor()
    act_symmetric: bool = True
    observer: Callable[[], object] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_w(self.granularity_w)
        if self.act_granularity != PerTensor():
            raise ValueError(
                f"static activation scales are per tensor (act_granularity=ql.PerTensor()), got {self.act_granularity!r}; "
                "a per-token scale depends on the token, so it must be computed at run time: use Int8DynamicConfig"
            )

    @property
    def act_qtype(self) -> QType:
        return int8 if self.act_symmetric else uint8


@dataclass(frozen=True)
class Int8WeightOnlyConfig(_Selection):
    """int8 weights with one scale per output channel, float activations. Targets nn.Linear."""

    granularity_w: Granularity = PerChannel(0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_w(self.granularity_w)


@dataclass(frozen=True)
class Int4WeightOnlyConfig(_Selection):
    """4-bit weights with one (scale, zero_point) per `group_size` inputs, float activations. Targets nn.Linear.

    layout: "auto" (torch's CPU int4 kernel where it fits, else the reference), "tinygemm" or "plain".
    """

    group_size: int = 128
    symmetric: bool = False
    layout: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer such as 32, 64 or 128")
        if self.layout not in ("auto", "tinygemm", "plain"):
            raise ValueError(f"layout must be 'auto', 'tinygemm' or 'plain', got {self.layout!r}")


@dataclass(frozen=True)
class FakeQuantConfig(_Selection):
    """QAT: wrap nn.Linear / nn.Conv2d so weights (symmetric, signed) and inputs are fake-quantized in training.

    act_bits=None fake-quantizes weights only. Activations are per tensor: unsigned with a zero point
    (act_symmetric=False, right for ReLU outputs) or signed symmetric. learnable=True uses LSQ step sizes
    and then needs calib_data to initialise them before the optimizer is built.
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    granularity_w: Granularity = PerChannel(0)
    act_symmetric: bool = False
    learnable: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_w(self.granularity_w)
        for name, bits in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if bits is not None and (not isinstance(bits, int) or not 2 <= bits <= 8):
                raise ValueError(f"{name}={bits!r} must be an integer in [2, 8] (the integer layers hold codes in int8)")


Config = Int8DynamicConfig | Int8StaticConfig | Int8WeightOnlyConfig | Int4WeightOnlyConfig | FakeQuantConfig

# ----------------------------------------------------------------------------- which layers each config quantizes
TARGETS: dict[type, tuple[type, ...]] = {
    Int8DynamicConfig: (nn.Linear, nn.Conv2d),
    Int8StaticConfig: (nn.Linear, nn.Conv2d),
    Int8WeightOnlyConfig: (nn.Linear,),
    Int4WeightOnlyConfig: (nn.Linear,),
    FakeQuantConfig: (nn.Linear, nn.Conv2d),
}

QUANTIZED = (QuantLinear, QuantConv2d, Int8WeightOnlyLinear, Int4WeightOnlyLinear, FakeQuantLinear, FakeQuantConv2d)


def select_modules(model: nn.Module, config: Config) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer `config` would quantize, in model order."""
    kinds = TARGETS[type(config)]
    chosen = [
        (name, m) for name, m in model.named_modules()
        if name and type(m) in kinds and not isinstance(m, QUANTIZED) and config.selects(name)
    ]
    if not chosen:
        layers = [n for n, m in model.named_modules() if type(m) in kinds]
        raise ValueError(
            f"{type(config).__name__}(include={config.include}, exclude={config.exclude}) selects no "
            f"{'/'.join(k.__name__ for k in kinds)} layer; the model has {layers[:8]}{' ...' if len(layers) > 8 else ''}"
        )
    return chosen


# ----------------------------------------------------------------------------- one swap rule per config
def _swap_dynamic(m: nn.Module, c: Int8DynamicConfig, observer) -> nn.Module:
    quant = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
    return quant.from_float(m, granularity_w=c.granularity_w, act_granularity=c.act_granularity, act_symmetric=c.act_symmetric)


def _swap_static(m: nn.Module, c: Int8StaticConfig, observer) -> nn.Module:
    quant = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
    return quant.from_float(m, granularity_w=c.granularity_w, act_granularity=PerTensor(),
                            act_symmetric=c.act_symmetric, act_qparams=observer)


def _swap_int8_weight_only(m: nn.Module, c: Int8WeightOnlyConfig, observer) -> nn.Module:
    return Int8WeightOnlyLinear(m, c.granularity_w)


def _swap_int4_weight_only(m: nn.Module, c: Int4WeightOnlyConfig, observer) -> nn.Module:
    return Int4WeightOnlyLinear(m, c.group_size, c.symmetric, c.layout)


def _swap_fake_quant(m: nn.Module, c: FakeQuantConfig, observer) -> nn.Module:
    act = None if c.act_bits is None else act_fake_quant(c.act_bits, c.act_symmetric, c.learnable)
    fake = FakeQuantConv2d if isinstance(m, nn.Conv2d) else FakeQuantLinear
    return fake.from_float(m, weight_fake_quant(m.weight, c.weight_bits, c.granularity_w, c.learnable), act)


SWAP: dict[type, Callable] = {
    Int8DynamicConfig: _swap_dynamic,
    Int8StaticConfig: _swap_static,
    Int8WeightOnlyConfig: _swap_int8_weight_only,
    Int4WeightOnlyConfig: _swap_int4_weight_only,
    FakeQuantConfig: _swap_fake_quant,
}


def quantize_(model: nn.Module, config: Config, calib_data: Iterable | None = None) -> nn.Module:
    """Quantize `model` in place according to `config` and return it.

    Args:
        model: any nn.Module; its nn.Linear / nn.Conv2d layers selected by the config are replaced.
        config: one of Int8DynamicConfig, Int8StaticConfig, Int8WeightOnlyConfig, Int4WeightOnlyConfig,
            FakeQuantConfig.
        calib_data: an iterable of input batches (tensor, tuple of args, or dict of kwargs). Required by
            Int8StaticConfig and by FakeQuantConfig(learnable=True); optional for FakeQuantConfig, where it
            sets the initial activation ranges.
    """
    if type(config) not in SWAP:
        raise ValueError(f"config must be one of {[c.__name__ for c in SWAP]}, got {type(config).__name__}")
    needs_data = isinstance(config, Int8StaticConfig) or (isinstance(config, FakeQuantConfig) and config.learnable and config.act_bits)
    if needs_data and calib_data is None:
        raise ValueError(
            f"{type(config).__name__} needs calib_data: activation ranges come from running real inputs through the "
            "model, e.g. quantize_(model, config, calib_data=ql.data.digits_calibration_batches()). "
            "Without data, use Int8DynamicConfig, which measures each activation at run time"
        )
    targets = select_modules(model, config)
    observers = dict.fromkeys(name for name, _ in targets)
    if calib_data is not None and isinstance(config, Int8StaticConfig):
        make = config.observer or (lambda: MinMaxObserver(qtype=config.act_qtype, symmetric=config.act_symmetric))
        stats = calibrate(model, calib_data, make, module_names=[name for name, _ in targets], progress=False)
        observers = {name: stats[name].input for name, _ in targets}
    for name, m in targets:
        model.set_submodule(name, SWAP[type(config)](m, config, observers[name]))
    if calib_data is not None and isinstance(config, FakeQuantConfig):
        observe_ranges(model, calib_data)  # a PTQ starting point for QAT
    return model


@torch.no_grad()
def observe_ranges(model: nn.Module, calib_data: Iterable) -> None:
    """Run calib_data with the model in eval mode except its fake quantizers, which record the ranges."""
    was_training = model.training
    model.eval()
    for m in model.modules():
        if isinstance(m, FakeQuantize):
            m.train()
    n = 0
    for batch in calib_data:
        run_batch(model, batch)
        n += 1
    model.train(was_training)
    if n == 0:
        raise ValueError("calib_data is empty; pass a few representative batches, e.g. ql.data.digits_calibration_batches()")
