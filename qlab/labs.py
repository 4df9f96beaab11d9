"""The qlab functions each lab asks students to write, and the switch that turns qlab's own versions off.

A lab notebook's first locked cell calls `ql.labs.forbid("lab1")`. From then on, in that notebook, qlab's
versions of the functions the lab asks for raise

    RuntimeError: ql.choose_qparams is disabled while grading lab1: write it yourself

wherever they are called from (aliases such as `from qlab import quantize` and qlab's own internal calls
included, because the function's code is replaced, not its name). The autograder's sandbox switches off
the same functions in the same way, so a solution that delegates to qlab fails the same visible test on
the student's laptop as in grading, and the local and graded scores agree.

Test cells that use qlab as their oracle call it through `reference_ql = ql.labs.oracle()`: qlab with the
switched-off functions on for the duration of each call (`with ql.labs.reference():` does the same for a
block). The sandbox switches them off for good (`reversible=False` keeps no copy of the original code),
and it never runs the test cells.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Iterator

DISABLED: dict[str, tuple[str, ...]] = {
    "lab1": ("choose_qparams", "quantize", "dequantize", "fake_quantize", "quantize_tensor", "pack_int4",
             "unpack_int4", "metrics.sqnr_db"),
    "lab2": ("observers.percentile", "observers.kl_divergence", "observers.entropy_threshold_bin",
             "observers.qparams_from_range"),
    "lab3": ("qat.fake_quantize_ste", "qat.FakeQuantizeSTE.forward", "qat.FakeQuantizeSTE.backward",
             "qat.LSQFakeQuantize.forward", "qat.LSQFakeQuantize.backward", "qat.lsq_grad_scale", "qat.lsq_init_scale"),
    "lab4": ("llm_int8.vectorwise_quant", "llm_int8.int8_matmul_outliers", "smoothquant.smoothing_scales"),
    "lab5": ("gptq.quantize_weight", "gptq.inverse_hessian_factor", "awq.search_scales", "awq.scale_grid_losses",
             "awq.scales_for_ratio", "awq.mean_abs"),
    "lab6": ("nf4.quantize_4bit", "nf4.nearest_level", "nf4.quantize_blockwise", "nf4.dequantize_4bit",
             "round_to_format", "lora.LoRALinear.forward"),
    "lab7": ("fp8.quantize", "fp8.amax_to_scale", "fp8.dequantize", "fp8.scaled_mm", "fp8.AmaxHistory.update",
             "fp8.AmaxHistory.scale_for"),
    "lab8": ("kv_cache.quantize_groups", "kv_cache.dequantize_groups", "gguf.quantize", "gguf.round_half_away",
             "gguf._quantize_q8_0", "gguf._quantize_legacy"),
}

_originals: dict[types.FunctionType, types.CodeType] = {}  # switched-off function -> its own code (reversible only)
_switched_off: dict[types.FunctionType, types.CodeType] = {}  # switched-off function -> the code that raises


def disabled_message(name: str, lab: str) -> str:
    """What a switched-off function raises: `ql.<name> is disabled while grading <lab>: write it yourself`."""
    return f"ql.{name} is disabled while grading {lab}: write it yourself"


def _raises(*args, **kwargs):
    raise RuntimeError("MESSAGE")  # only builtins: this code runs with the globals of the function it replaces


def function_of(name: str) -> types.FunctionType:
    """The plain function behind `qlab.<name>` ("metrics.sqnr_db", "qat.FakeQuantizeSTE.forward"), unwrapped."""
    import qlab

    function = qlab
    for part in name.split("."):
        if not hasattr(function, part):
            raise ValueError(f"qlab has no {name!r} to switch off: check the name against `import qlab as ql; ql.{name}`")
        function = getattr(function, part)
    function = getattr(function, "__func__", function)  # a classmethod or staticmethod
    while hasattr(function, "__wrapped__"):  # a functools.wraps wrapper (torch.no_grad()) calls the original,
        function = function.__wrapped__       # whose code is the one to replace
    if not isinstance(function, types.FunctionType):
        raise ValueError(f"ql.{name} is a {type(function).__name__}, not a Python function: it cannot be switched off")
    return function


def forbid(lab: str, names: tuple[str, ...] | None = None, reversible: bool = True) -> tuple[str, ...]:
    """Switch off qlab's versions of the functions `lab` asks students to write (or `names`); return the names.

    Args:
        lab: the lab ("lab1"); names default to `DISABLED[lab]`.
        reversible: keep the original code so that `reference()` can switch them back on for a visible
            test's oracle. The autograder's sandbox passes False: nothing there can bring them back.
    """
    if names is None:
        if lab not in DISABLED:
            raise ValueError(f"unknown lab {lab!r}: expected one of {sorted(DISABLED)}")
        names = DISABLED[lab]
    for name in names:
        function = function_of(name)
        if function in _switched_off and function.__code__ is _switched_off[function]:
            continue  # already off
        code = _raises.__code__
        consts = tuple(disabled_message(name, lab) if const == "MESSAGE" else const for const in code.co_consts)
        stub = code.replace(co_consts=consts, co_name=function.__name__, co_qualname=function.__qualname__)
        if reversible:
            _originals[function] = function.__code__
        else:
            _originals.pop(function, None)
        function.__code__ = _switched_off[function] = stub
    return tuple(names)


@contextlib.contextmanager
def reference() -> Iterator[None]:
    """Switch qlab's versions back on inside the block: for a visible test that uses qlab as its oracle."""
    restored = {function: function.__code__ for function in _originals}
    for function, code in _originals.items():
        function.__code__ = code
    try:
        yield
    finally:
        for function, code in restored.items():
            function.__code__ = code


def allow_all() -> None:
    """Switch every reversibly switched-off function back on (the end of a lab session, or a test)."""
    for function, code in list(_originals.items()):
        function.__code__ = code
        _switched_off.pop(function, None)
    _originals.clear()


class _Oracle:
    """A module of qlab seen with its switched-off functions on: each call runs inside `reference()`."""

    def __init__(self, module: types.ModuleType):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._module, name)
        if isinstance(value, types.ModuleType):
            return _Oracle(value)
        if callable(value) and not isinstance(value, type):
            @functools.wraps(value)
            def call(*args, **kwargs):
                with reference():
                    return value(*args, **kwargs)

            return call
        return value

    def __repr__(self) -> str:
        return f"<{self._module.__name__} as an oracle: switched-off functions on>"


def oracle() -> Any:
    """qlab as test cells use it for expected values: `reference_ql.quantize(...)` runs qlab's own version
    even while `forbid` has switched it off for the student's code."""
    import qlab

    return _Oracle(qlab)
