"""Calibration: run a few batches through a model and collect per-layer statistics with observers.

Every hook lives only inside a `with` block and is removed on exit, even when the block raises:

    with ql.calibration.observe(model, lambda: HistogramObserver()) as stats:   # inputs of Linear/Conv2d
        for x in batches:
            model(x)
    scale, zero_point = stats["fc"].input.calculate_qparams()

    stats = ql.calibration.calibrate(model, batches, HistogramObserver)          # the same, with a progress bar
    with ql.calibration.fake_quantize_activations(model, stats):                 # static activation quantization
        acc = ql.eval.accuracy(model, x_test, y_test)

`collect_activations` keeps the tensors themselves (for histograms and plots), `forward_hooks` is the one
place that registers and removes hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .core.primitives import dequantize, quantize
from .observers import MinMaxObserver, Observer

WHERE = ("input", "output", "both")


@dataclass(frozen=True)
class LayerStats:
    """The observers watching one module: on its first input, on its output (None where not watched)."""

    input: Observer | None = None
    output: Observer | None = None


def _check_names(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing} in the model; choose from {list(modules)[1:][:20]}")
    return {n: modules[n] for n in names}


def _check_where(where: str) -> None:
    if where not in WHERE:
        raise ValueError(f"where={where!r} must be one of {WHERE}: watch a module's input, its output, or both")


def layer_names(model: nn.Module, include: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)) -> list[str]:
    """Names of the modules of the given types, in registration order (usually forward order)."""
    names = [n for n, m in model.named_modules() if isinstance(m, include) and n]
    if not names:
        raise ValueError(
            f"the model has no module of type {[t.__name__ for t in include]}; pass include=(...) or module_names"
        )
    return names


@contextmanager
def forward_hooks(
    model: nn.Module, hooks: dict[str, Callable], pre: bool = False
) -> Iterator[None]:
    """Register `hooks[name]` on each named module for the duration of a `with` block.

    pre=False: hook(module, args, output), may return a replacement output (nn.Module.register_forward_hook).
    pre=True:  hook(module, args), may return replacement args (nn.Module.register_forward_pre_hook).
    """
    modules = _check_names(model, list(hooks))
    handles = []
    try:
        for name, hook in hooks.items():
            register = modules[name].register_forward_pre_hook if pre else modules[name].register_forward_hook
            handles.append(register(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _first_tensor(value, name: str, where: str) -> torch.Tensor:
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"the {where} of {name!r} is a {type(value).__name__}, not a tensor; watch another module")
    return value


@contextmanager
def recording(
    model: nn.Module, names: Sequence[str], make_stat: Callable[[], Callable], where: str = "input"
) -> Iterator[dict[str, LayerStats]]:
    """Feed the input and/or output of each named module to a fresh accumulator inside a `with` block.

    An accumulator is anything with `__call__(x)`: an observer, a Hessian sum (GPTQ), a running mean of
    |x| per channel (AWQ, SmoothQuant), an amax history (FP8). `make_stat()` is called once per watched
    tensor. Yields {name: LayerStats(input=..., output=...)}; the accumulators keep their state afterwards.
    """
    _check_where(where)
    names = list(names)
    stats = {}
    for name in names:
        pair = [make_stat() if where in (w, "both") else None for w in ("input", "output")]
        if not all(o is None or callable(o) for o in pair):
            raise ValueError(f"make_stat must return a callable accumulator (stat(x) records x), got {pair}")
        stats[name] = LayerStats(*pair)

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output) -> None:
            if stats[name].input is not None:
                stats[name].input(_first_tensor(args, name, "input"))
            if stats[name].output is not None:
                stats[name].output(_first_tensor(output, name, "output"))

        return hook

    with forward_hooks(model, {name: hook_for(name) for name in names}):
        yield stats


def record(
    model: nn.Module,
    names: Sequence[str],
    make_stat: Callable[[], Callable],
    calib_data: Iterable,
    where: str = "input",
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Run calib_data through the model (eval mode, no gradients, progress bar) with an accumulator on
    each named module: `{name: LayerStats}` of whatever make_stat() builds (see `recording`)."""
    with recording(model, names, make_stat, where) as stats:
        _run(model, calib_data, "record", progress)
    return stats


@contextmanager
def observe(
    model: nn.Module,
    observer_factory: Callable[[], Observer] = MinMaxObserver,
    include: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
    where: str = "input",
    module_names: Sequence[str] | None = None,
) -> Iterator[dict[str, LayerStats]]:
    """Attach a fresh observer to the input and/or output of each chosen module inside a `with` block.

    Args:
        observer_factory: called once per watched tensor, e.g. `HistogramObserver` or
            `lambda: MinMaxObserver(qtype=ql.uint8, symmetric=False)`.
        include: module types to watch (ignored when `module_names` is given).
        where: "input" (the module's first argument), "output", or "both".
        module_names: explicit module names, e.g. ["conv1", "fc"].
    Yields:
        {module name: LayerStats(input=observer or None, output=observer or None)}; the observers keep
        their statistics after the block ends.
    """
    names = list(module_names) if module_names is not None else layer_names(model, include)

    def make_observer():
        obs = observer_factory()
        if not (callable(obs) and hasattr(obs, "calculate_qparams")):
            raise ValueError("observer_factory must return an observer (callable, with calculate_qparams()), "
                             f"e.g. ql.HistogramObserver; got {obs!r}")
        return obs

    with recording(model, names, make_observer, where) as stats:
        yield stats


@contextmanager
def simulate(
    model: nn.Module,
    layer_names: Sequence[str],
    weight_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    input_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[nn.Module]:
    """Float simulation of a quantized model: inside the block each named layer computes with
    weight_fn(W) (e.g. `lambda w: ql.fake_quantize(w, ql.int8, ql.PerChannel(0))`) and sees input_fn(x)
    as its first input; the weights are restored on exit, even if the block raises.
    """
    modules = _check_names(model, list(layer_names))
    saved = {n: m.weight.detach().clone() for n, m in modules.items()}
    try:
        if weight_fn is not None:
            with torch.no_grad():
                for m in modules.values():
                    m.weight.copy_(weight_fn(m.weight))
        hooks = {n: (lambda mod, args: (input_fn(args[0]), *args[1:])) for n in modules} if input_fn else {}
        with forward_hooks(model, hooks, pre=True):
            yield model
    finally:
        with torch.no_grad():
            for n, m in modules.items():
                m.weight.copy_(saved[n])


def run_batch(model: nn.Module, batch) -> None:
    """model(batch), model(*batch) or model(**batch) for a tensor, a tuple/list or a dict of inputs."""
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _run(model: nn.Module, batches: Iterable, desc: str, progress: bool) -> None:
    """model(batch) for every batch, in eval mode and without gradients; the mode is restored after."""
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                run_batch(model, batch)
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("calib_data is empty: pass a few representative batches, e.g. ql.data.digits_calibration_batches()")


def calibrate(
    model: nn.Module,
    batches: Iterable,
    observer_factory: Callable[[], Observer] = MinMaxObserver,
    include: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
    where: str = "input",
    module_names: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """`observe` the model while it runs every calibration batch (eval mode, no gradients, progress bar).

    A batch is a tensor (model(batch)), a tuple of arguments (model(*batch)) or a dict (model(**batch)).
    """
    with observe(model, observer_factory, include, where, module_names) as stats:
        _run(model, batches, "calibrate", progress)
    return stats


def collect_activations(
    model: nn.Module,
    batches: Iterable,
    module_names: Sequence[str],
    where: str = "output",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The tensors each named module receives ("input") or produces ("output"), batches concatenated.

    Returns {name: tensor of shape (sum of batch sizes, ...)} on the CPU, detached. Meant for a few batches
    of a small model (plots, histograms); use `observe` to keep only statistics.
    """
    if where not in ("input", "output"):
        raise ValueError(f"where={where!r} must be 'input' or 'output' (call twice for both)")
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in module_names}

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output) -> None:
            captured[name].append(_first_tensor(args if where == "input" else output, name, where).detach().cpu())

        return hook

    with forward_hooks(model, {n: hook_for(n) for n in module_names}):
        _run(model, batches, "collect", progress)
    return {n: torch.cat(ts) for n, ts in captured.items()}


@contextmanager
def fake_quantize_activations(model: nn.Module, stats: dict[str, LayerStats]) -> Iterator[None]:
    """Inside the block, every observed input / output is quantized and dequantized with its calibrated qparams.

    This simulates static activation quantization: the qparams are fixed (calculated once, on entry)
    whatever batch comes in, so values beyond the calibrated range are clipped. Weights are untouched.
    """
    def fq(observer: Observer) -> Callable[[torch.Tensor], torch.Tensor]:
        scale, zp = observer.calculate_qparams()
        qtype, g = observer.qtype, observer.granularity
        return lambda x: dequantize(quantize(x, scale, zp, qtype, g), scale, zp, g).to(x.dtype)

    pre_hooks, post_hooks = {}, {}
    for name, st in stats.items():
        if st.input is not None:
            f_in = fq(st.input)
            pre_hooks[name] = lambda m, args, f=f_in: (f(args[0]), *args[1:])
        if st.output is not None:
            f_out = fq(st.output)
            post_hooks[name] = lambda m, args, out, f=f_out: f(out)
    with forward_hooks(model, pre_hooks, pre=True), forward_hooks(model, post_hooks):
        yield
