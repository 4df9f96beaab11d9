"""quantize_(model, config | [configs], calib_data=None): one entry point, open to new algorithms.

    ql.quantize_(model, ql.Int8DynamicConfig())                              # W8A8, activation scales per token at run time
    ql.quantize_(model, ql.Int8StaticConfig(), calib_data=batches)           # W8A8, activation scales from calibration
    ql.quantize_(model, ql.Int8WeightOnlyConfig())                           # int8 weights, float math
    ql.quantize_(model, ql.Int4WeightOnlyConfig(group_size=128))             # 4-bit group-wise weights
    ql.quantize_(model, ql.FakeQuantConfig(weight_qtype=ql.int4, act_qtype=ql.uint4), calib_data=batches)  # QAT
    ql.quantize_(model, [ConfigA(...), ConfigB(...)], calib_data=batches)    # a recipe: configs applied in order

Every config is a frozen dataclass derived from `QuantConfig` and checked when it is built. Each config type
has a model-level handler, `handler(model, config, calib_data) -> model`, registered with
`@register_handler(ConfigType)` (torchao's pattern): a handler sees the whole model, so it can record
statistics over many layers, rescale norm -> linear pairs and then swap modules. Handlers that swap layer
by layer use `swap_modules(model, config, make)`.

Which modules a config selects: `targets` (matched with isinstance, so subclasses count), an `include`
fnmatch pattern over the names `model.named_modules()` gives ("blocks.*.mlp.*") and no `exclude` pattern;
modules that qlab already quantized are skipped unless the config sets `wraps_quantized=True` (LoRA over a
quantized base). When nothing is selected, the error lists every candidate module and why it was skipped.

One vocabulary: `weight_qtype`, `act_qtype` (signed codes = symmetric, unsigned = with a zero point),
`weight_granularity`, `act_granularity`. `reduce_range=None` chooses 7-bit activation codes exactly where
fbgemm needs them (x86 CPUs without int8 dot-product instructions, see ql.kernels.cpu).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .calibration import LayerStats, _run, forward_hooks, run_batch
from .core.granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken
from .core.qtypes import QType, int4, int8, qtype, uint4, uint8
from .kernels import cpu as cpu_kernels
from .nn import (
    WEIGHT_GRANULARITIES,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    QuantConv2d,
    QuantLinear,
    WeightOnlyLinear,
    _IntegerGEMM,
)
from .observers import MinMaxObserver
from .qat import FakeQuantConv2d, FakeQuantize, FakeQuantLinear, act_fake_quant, weight_fake_quant

QUANTIZED: tuple[type, ...] = (_IntegerGEMM, WeightOnlyLinear)  # modules whose weights are already codes


def register_quantized_module(cls: type) -> type:
    """Declare a module type as already quantized (skipped by configs unless they wrap quantized modules)."""
    global QUANTIZED
    QUANTIZED = QUANTIZED + (cls,)
    return cls


def _patterns(value, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(p, str) for p in value):
        raise ValueError(f"{name} must be a pattern string or a tuple of them, like ('blocks.*', 'lm_head'); got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class QuantConfig:
    """What every config has: which modules it selects.

    include / exclude: fnmatch patterns over module names. targets: module types, matched with isinstance.
    wraps_quantized: whether modules qlab already quantized may be selected.
    """

    include: tuple[str, ...] | str = ("*",)
    exclude: tuple[str, ...] | str = ()
    targets: tuple[type, ...] = (nn.Linear,)
    wraps_quantized: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        targets = (self.targets,) if isinstance(self.targets, type) else tuple(self.targets)
        if not targets or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in targets):
            raise ValueError(f"targets must be nn.Module types such as (nn.Linear,), got {self.targets!r}")
        object.__setattr__(self, "targets", targets)

    @property
    def needs_calib_data(self) -> bool:
        """True if the handler must run calibration data through the model."""
        return False

    def selects(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        """Why this config would not quantize `module` (None: it would)."""
        if isinstance(module, QUANTIZED) and not self.wraps_quantized:
            return f"already quantized ({type(module).__name__})"
        if not isinstance(module, self.targets):
            return f"not a {'/'.join(t.__name__ for t in self.targets)}"
        if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return f"matches no include pattern {self.include}"
        excluded = [p for p in self.exclude if fnmatch.fnmatchcase(name, p)]
        if excluded:
            return f"excluded by {excluded[0]!r}"
        return None


def _candidates(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    kinds = config.targets + QUANTIZED
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, kinds)]


def select_modules(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module `config` selects, in model order; a teaching error if there is none."""
    candidates = _candidates(model, config)
    chosen = [(n, m) for n, m in candidates if config.skip_reason(n, m) is None]
    if chosen:
        return chosen
    if not candidates:
        kinds = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        raise ValueError(f"{type(config).__name__} targets {[t.__name__ for t in config.targets]}, and the model has no "
                         f"such module; its layer types are {kinds}")
    why = "; ".join(f"{n!r} ({type(m).__name__}): {config.skip_reason(n, m)}" for n, m in candidates)
    raise ValueError(f"{type(config).__name__}(include={config.include}, exclude={config.exclude}) selects no module. "
                     f"Candidates: {why}")


def swap_modules(model: nn.Module, config: QuantConfig, make: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace every module `config` selects by make(name, module), in place; returns the names swapped.

    A module with an input_scale (explicitly smoothed by SmoothQuant) must become one that keeps it; that is
    checked on the first such module before anything is swapped, so the error leaves the model as it was."""
    selected = select_modules(model, config)
    made = {}
    smoothed = [(n, m) for n, m in selected if getattr(m, "input_scale", None) is not None]
    if smoothed:
        name, module = smoothed[0]
        made[name] = make(name, module)
        if getattr(made[name], "input_scale", None) is None:
            raise ValueError(f"{name!r} was smoothed explicitly by SmoothQuant (its input is multiplied by "
                             f"input_scale), which {type(config).__name__} would drop: follow SmoothQuantConfig "
                             "with Int8StaticConfig or Int8DynamicConfig, or quantize an unsmoothed copy")
    for name, module in selected:  # one at a time: the float layer can be freed as soon as it is replaced
        model.set_submodule(name, made.pop(name) if name in made else make(name, module))
    return [name for name, _ in selected]


# ----------------------------------------------------------------------------- handlers
_HANDLERS: dict[type, Callable] = {}


def register_handler(config_type: type) -> Callable[[Callable], Callable]:
    """Decorator: `handler(model, config, calib_data) -> model` runs quantize_ for configs of this type."""
    if not (isinstance(config_type, type) and issubclass(config_type, QuantConfig)):
        raise ValueError(f"register_handler takes a QuantConfig subclass, got {config_type!r}")

    def decorate(handler: Callable) -> Callable:
        _HANDLERS[config_type] = handler
        return handler

    return decorate


def _handler(config: QuantConfig) -> Callable:
    for klass in type(config).__mro__:
        if klass in _HANDLERS:
            return _HANDLERS[klass]
    raise ValueError(f"no handler is registered for {type(config).__name__}; registered configs: "
                     f"{sorted(c.__name__ for c in _HANDLERS)} (add one with @ql.api.register_handler({type(config).__name__}))")


def quantize_(model: nn.Module, config: QuantConfig | Sequence[QuantConfig], calib_data: Iterable | None = None) -> nn.Module:
    """Quantize `model` in place according to one config or a recipe (a list applied in order); returns it.

    Args:
        model: any nn.Module.
        config: a QuantConfig (Int8DynamicConfig, Int8StaticConfig, Int8WeightOnlyConfig, Int4WeightOnlyConfig,
            FakeQuantConfig, or one an algorithm module registers) or a list of them.
        calib_data: an iterable of input batches (tensor, tuple of args, or dict of kwargs); required by
            configs whose `needs_calib_data` is True. A generator is materialized once so every config of a
            recipe sees the same batches.
    """
    configs = [config] if isinstance(config, QuantConfig) else list(config) if isinstance(config, (list, tuple)) else None
    if not configs or not all(isinstance(c, QuantConfig) for c in configs):
        raise ValueError(f"config must be a QuantConfig such as ql.Int8DynamicConfig() or a non-empty list of them; "
                         f"got {config!r}")
    handlers = [_handler(c) for c in configs]  # fail before touching the model
    for c in configs:
        if c.needs_calib_data and calib_data is None:
            raise ValueError(
                f"{type(c).__name__} needs calib_data: activation ranges come from running real inputs through the "
                "model, e.g. quantize_(model, config, calib_data=ql.data.digits_calibration_batches()). "
                "Without data, use Int8DynamicConfig, which measures each activation at run time"
            )
    if calib_data is not None and len(configs) > 1 and not isinstance(calib_data, (list, tuple)):
        calib_data = list(calib_data)
    for c, handler in zip(configs, handlers):
        handler(model, c, calib_data)
    return model


# ----------------------------------------------------------------------------- the integer configs
def _check_weight(weight_qtype: QType, weight_granularity: Granularity) -> None:
    if weight_granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(
            f"weight_granularity={weight_granularity} cannot be factored out of an integer GEMM; use ql.PerChannel(0) "
            "or ql.PerTensor() (for group-wise weights use Int4WeightOnlyConfig(group_size=...))"
        )
    if not isinstance(weight_qtype, QType) or not weight_qtype.signed or weight_qtype.bits > 8:
        raise ValueError(f"weight_qtype must be a signed ql.QType of at most 8 bits (weights are symmetric), "
                         f"got {weight_qtype!r}")


def _check_act_qtype(act_qtype) -> None:
    if not isinstance(act_qtype, QType) or act_qtype.bits > 8:
        raise ValueError(f"act_qtype must be a ql.QType of at most 8 bits such as ql.int8 or ql.uint8, got {act_qtype!r}")


def resolve_reduce_range(reduce_range: bool | None) -> bool:
    """None -> True exactly on x86 CPUs without int8 dot-product instructions, where fbgemm's int16 sums saturate."""
    return (not cpu_kernels.has_int8_dot()) if reduce_range is None else bool(reduce_range)


def reduced(act_qtype: QType, reduce_range: bool | None) -> QType:
    """The activation code type after reduce_range: one bit fewer (7-bit codes) when it applies."""
    if resolve_reduce_range(reduce_range) and act_qtype.bits == 8:
        return qtype(7, signed=act_qtype.signed)
    return act_qtype


@dataclass(frozen=True)
class Int8DynamicConfig(QuantConfig):
    """W8A8, dynamic: int8 weights offline; each activation row gets its scale when it arrives.

    Weights are symmetric (zero point 0, so the GEMM needs no correction term) and per output channel.
    Activations are symmetric int8 per token by default: a dynamic scale fits each row, so there is no
    skew to absorb. Targets nn.Linear and nn.Conv2d (convolutions quantize their im2col patches).
    """

    targets: tuple[type, ...] = (nn.Linear, nn.Conv2d)
    weight_qtype: QType = int8
    weight_granularity: Granularity = PerChannel(0)
    act_qtype: QType = int8
    act_granularity: Granularity = PerToken()
    reduce_range: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_weight(self.weight_qtype, self.weight_granularity)
        _check_act_qtype(self.act_qtype)
        if self.act_granularity not in (PerToken(), PerTensor()):
            raise ValueError(f"act_granularity must be ql.PerToken() or ql.PerTensor(), got {self.act_granularity!r}")


@dataclass(frozen=True)
class Int8StaticConfig(QuantConfig):
    """W8A8, static: int8 weights; one activation scale per layer input, fixed by calibration (needs calib_data).

    Activations default to symmetric int8 (act_qtype=ql.int8): one fixed range must serve both signs of
    most layer inputs; use ql.uint8 for inputs that are non-negative (after ReLU), where a zero point
    doubles the resolution. observer: zero-argument factory of objects with `__call__(x)` and
    `calculate_qparams()` (default: min/max over all calibration batches); it must return qparams for
    the activation code type.
    """

    targets: tuple[type, ...] = (nn.Linear, nn.Conv2d)
    weight_qtype: QType = int8
    weight_granularity: Granularity = PerChannel(0)
    act_qtype: QType = int8
    act_granularity: Granularity = PerTensor()
    reduce_range: bool | None = None
    observer: Callable[[], object] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_weight(self.weight_qtype, self.weight_granularity)
        _check_act_qtype(self.act_qtype)
        if self.act_granularity != PerTensor():
            raise ValueError(
                f"static activation scales are per tensor (act_granularity=ql.PerTensor()), got {self.act_granularity!r}; "
                "a per-token scale depends on the token, so it must be computed at run time: use Int8DynamicConfig"
            )

    @property
    def needs_calib_data(self) -> bool:
        return True


@register_handler(Int8DynamicConfig)
def _int8_dynamic(model: nn.Module, c: Int8DynamicConfig, calib_data) -> nn.Module:
    act_qtype = reduced(c.act_qtype, c.reduce_range)

    def make(name, m):
        quant = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
        return quant.from_float(m, weight_qtype=c.weight_qtype, weight_granularity=c.weight_granularity,
                                act_qtype=act_qtype, act_granularity=c.act_granularity)

    swap_modules(model, c, make)
    return model


def _calibrate_quantized_inputs(model: nn.Module, targets, make_observer, calib_data) -> dict[str, LayerStats]:
    """Observe what each target's W8A8 layer will quantize: its input, times input_scale if it has one
    (an explicitly smoothed linear, ql.smoothquant.SmoothedLinear)."""
    stats = {name: LayerStats(make_observer(), None) for name, _ in targets}

    def hook_for(name: str, module: nn.Module) -> Callable:
        def hook(mod, args, output) -> None:
            x = args[0]
            scale = getattr(module, "input_scale", None)
            stats[name].input(x if scale is None else x * scale.to(x.dtype))

        return hook

    with forward_hooks(model, {name: hook_for(name, m) for name, m in targets}):
        _run(model, calib_data, "calibrate", False)
    return stats


@register_handler(Int8StaticConfig)
def _int8_static(model: nn.Module, c: Int8StaticConfig, calib_data) -> nn.Module:
    act_qtype = reduced(c.act_qtype, c.reduce_range)
    targets = select_modules(model, c)
    make_observer = c.observer or (lambda: MinMaxObserver(qtype=act_qtype, symmetric=act_qtype.signed))
    stats = _calibrate_quantized_inputs(model, targets, make_observer, calib_data)

    def make(name, m):
        quant = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
        return quant.from_float(m, weight_qtype=c.weight_qtype, weight_granularity=c.weight_granularity,
                                act_qtype=act_qtype, act_granularity=PerTensor(), act_qparams=stats[name].input)

    swap_modules(model, c, make)
    return model


# ----------------------------------------------------------------------------- weight-only configs
@dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantConfig):
    """int8 weights, symmetric (a weight distribution is centred on 0), one scale per output channel;
    float activations. Targets nn.Linear."""

    weight_granularity: Granularity = PerChannel(0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_weight(int8, self.weight_granularity)

    @property
    def weight_qtype(self) -> QType:
        return int8


@dataclass(frozen=True)
class Int4WeightOnlyConfig(QuantConfig):
    """4-bit weights with one (scale, zero_point) per `group_size` inputs, float activations. Targets nn.Linear.

    symmetric=False by default: with only 16 levels a group's range rarely sits centred on 0, and a zero
    point per group (uint4 codes) uses all 16 of them (the GPTQ/AWQ default); symmetric=True gives int4
    codes in [-7, 7].
    """

    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer such as 32, 64 or 128")

    @property
    def weight_qtype(self) -> QType:
        return int4 if self.symmetric else uint4

    @property
    def weight_granularity(self) -> Granularity:
        return PerGroup(self.group_size)


@register_handler(Int8WeightOnlyConfig)
def _int8_weight_only(model: nn.Module, c: Int8WeightOnlyConfig, calib_data) -> nn.Module:
    swap_modules(model, c, lambda name, m: Int8WeightOnlyLinear.from_float(m, c.weight_granularity))
    return model


@register_handler(Int4WeightOnlyConfig)
def _int4_weight_only(model: nn.Module, c: Int4WeightOnlyConfig, calib_data) -> nn.Module:
    swap_modules(model, c, lambda name, m: Int4WeightOnlyLinear.from_float(m, c.group_size, c.symmetric))
    return model


# ----------------------------------------------------------------------------- QAT
@dataclass(frozen=True)
class FakeQuantConfig(QuantConfig):
    """QAT: wrap nn.Linear / nn.Conv2d so weights and inputs are fake-quantized in training.

    Weights are symmetric signed codes (weight_qtype, e.g. ql.int4). Activations are per tensor with
    act_qtype: unsigned with a zero point by default (ql.uint8: the inputs of most layers follow a ReLU),
    signed for symmetric; act_qtype=None fake-quantizes weights only. learnable=True uses LSQ step sizes
    and then needs calib_data to initialise them before the optimizer is built.
    """

    targets: tuple[type, ...] = (nn.Linear, nn.Conv2d)
    weight_qtype: QType = int8
    act_qtype: QType | None = uint8
    weight_granularity: Granularity = PerChannel(0)
    learnable: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_weight(self.weight_qtype, self.weight_granularity)
        for name, t in (("weight_qtype", self.weight_qtype), ("act_qtype", self.act_qtype)):
            if t is not None and (not isinstance(t, QType) or not 2 <= t.bits <= 8):
                raise ValueError(f"{name}={t!r} must be a ql.QType of 2 to 8 bits (the integer layers hold codes in int8)")

    @property
    def needs_calib_data(self) -> bool:
        return self.learnable and self.act_qtype is not None

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        if isinstance(module, (FakeQuantLinear, FakeQuantConv2d)):
            return f"already fake-quantized ({type(module).__name__})"
        return super().skip_reason(name, module)


@register_handler(FakeQuantConfig)
def _fake_quant(model: nn.Module, c: FakeQuantConfig, calib_data) -> nn.Module:
    def make(name, m):
        act = None if c.act_qtype is None else act_fake_quant(c.act_qtype.bits, c.act_qtype.signed, c.learnable)
        fake = FakeQuantConv2d if isinstance(m, nn.Conv2d) else FakeQuantLinear
        return fake.from_float(m, weight_fake_quant(m.weight, c.weight_qtype.bits, c.weight_granularity, c.learnable), act)

    swap_modules(model, c, make)
    if calib_data is not None:
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
    try:
        for batch in calib_data:
            run_batch(model, batch)
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("calib_data is empty; pass a few representative batches, e.g. ql.data.digits_calibration_batches()")


Config = QuantConfig  # the old name of the union of configs
