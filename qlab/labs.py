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

# What a lab's text forbids outside qlab: functions of other packages (by their full dotted name), switched off
# like qlab's, and packages whose import fails.
FOREIGN: dict[str, tuple[str, ...]] = {
    "lab8": ("gguf.quants.quantize", "gguf.quants.np_roundf", "gguf.quants.Q8_0.quantize_blocks",
             "gguf.quants.Q4_0.quantize_blocks"),
}
IMPORTS: dict[str, tuple[str, ...]] = {"lab4": ("bitsandbytes",), "lab6": ("bitsandbytes",)}

_originals: dict[types.FunctionType, types.CodeType] = {}  # switched-off function -> its own code (reversible only)
_switched_off: dict[types.FunctionType, types.CodeType] = {}  # switched-off function -> the code that raises
_blocked: dict[str, object] = {}  # blocked module name -> the module sys.modules held before (reversible only)


def disabled_message(name: str, lab: str, foreign: bool = False) -> str:
    """What a switched-off function raises: `ql.<name> is disabled while grading <lab>: write it yourself`
    (a function of another package is named in full: `gguf.quants.quantize is disabled ...`)."""
    return f"{'' if foreign else 'ql.'}{name} is disabled while grading {lab}: write it yourself"


def blocked_message(module: str, lab: str) -> str:
    """What importing a package that `lab` forbids raises (ImportError)."""
    return f"{module} may not be used in {lab}: write it yourself with torch"


def messages(lab: str, names=(), foreign=(), imports=()) -> dict[str, str]:
    """{name: what calling (or importing) it raises} for everything a lab switches off."""
    found = {name: disabled_message(name, lab) for name in names}
    found.update({name: disabled_message(name, lab, foreign=True) for name in foreign})
    found.update({module: blocked_message(module, lab) for module in imports})
    return found


def _raises(*args, **kwargs):
    raise RuntimeError("MESSAGE")  # only builtins: this code runs with the globals of the function it replaces


def function_of(name: str, foreign: bool = False) -> types.FunctionType:
    """The plain function behind `qlab.<name>` ("metrics.sqnr_db", "qat.FakeQuantizeSTE.forward"), unwrapped;
    with `foreign`, behind the full dotted name of another package's function ("gguf.quants.quantize")."""
    import importlib

    import qlab

    function, parts = qlab, name.split(".")
    if foreign:
        for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
            try:
                function, parts = importlib.import_module(".".join(parts[:cut])), parts[cut:]
                break
            except ImportError:
                continue
        else:
            raise ValueError(f"no module of {name!r} can be imported: is its package installed?")
    for part in parts:
        if not hasattr(function, part):
            raise ValueError(f"there is no {name} to switch off: check the name" if foreign else
                             f"qlab has no {name!r} to switch off: check the name against `import qlab as ql; ql.{name}`")
        function = getattr(function, part)
    function = getattr(function, "__func__", function)  # a classmethod or staticmethod
    while hasattr(function, "__wrapped__"):  # a functools.wraps wrapper (torch.no_grad()) calls the original,
        function = function.__wrapped__       # whose code is the one to replace
    if not isinstance(function, types.FunctionType):
        raise ValueError(f"{name if foreign else 'ql.' + name} is a {type(function).__name__}, not a Python function: "
                         "it cannot be switched off")
    return function


def forbid(lab: str, names: tuple[str, ...] | None = None, reversible: bool = True, *,
           foreign: tuple[str, ...] | None = None, imports: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Switch off what `lab` forbids: qlab's versions of the functions it asks students to write (`names`),
    functions of other packages (`foreign`) and packages (`imports`); return the qlab names.

    Args:
        lab: the lab ("lab1"); when `names` is None, all three default to the lab's lists (DISABLED,
            FOREIGN, IMPORTS); when `names` is given, `foreign` and `imports` default to nothing.
        reversible: keep the original code so that `reference()` can switch them back on for a visible
            test's oracle. The autograder's sandbox passes False: nothing there can bring them back.
    """
    if names is None:
        if lab not in DISABLED:
            raise ValueError(f"unknown lab {lab!r}: expected one of {sorted(DISABLED)}")
        names = DISABLED[lab]
        foreign = FOREIGN.get(lab, ()) if foreign is None else foreign
        imports = IMPORTS.get(lab, ()) if imports is None else imports
    for name in names:
        _switch_off(name, lab, False, reversible)
    for name in foreign or ():
        _switch_off(name, lab, True, reversible)
    for module in imports or ():
        _block(module, lab, reversible)
    return tuple(names)


class _Blocker:
    """A finder first on sys.meta_path that refuses to import a forbidden package, with a message that says why."""

    def __init__(self, module: str, lab: str, reversible: bool):
        self.module, self.lab, self.reversible = module, lab, reversible

    def find_spec(self, name, path=None, target=None):
        if name == self.module or name.startswith(self.module + "."):
            raise ImportError(blocked_message(self.module, self.lab), name=name)
        return None


def _block(module: str, lab: str, reversible: bool) -> None:
    """Make `import module` (and its submodules) fail with a message; forget it if it was imported already."""
    import sys

    if any(isinstance(finder, _Blocker) and finder.module == module for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _Blocker(module, lab, reversible))
    _forget(module, keep=reversible)


def _forget(module: str, keep: bool) -> None:
    """Drop a module and its submodules from sys.modules (keeping them in _blocked to put back, if `keep`)."""
    import sys

    for name in [key for key in sys.modules if key == module or key.startswith(module + ".")]:
        loaded = sys.modules.pop(name)
        if keep:
            _blocked[name] = loaded


def _switch_off(name: str, lab: str, foreign: bool, reversible: bool) -> None:
    function = function_of(name, foreign)
    if function in _switched_off and function.__code__ is _switched_off[function]:
        return  # already off
    code = _raises.__code__
    consts = tuple(disabled_message(name, lab, foreign) if const == "MESSAGE" else const for const in code.co_consts)
    stub = code.replace(co_consts=consts, co_name=function.__name__, co_qualname=function.__qualname__)
    if reversible:
        _originals[function] = function.__code__
    else:
        _originals.pop(function, None)
    function.__code__ = _switched_off[function] = stub


@contextlib.contextmanager
def reference() -> Iterator[None]:
    """Switch qlab's versions back on inside the block, and allow the blocked imports: for the expected values
    of a test cell. What was switched off for good (`reversible=False`, the sandbox) stays off."""
    import sys

    restored = {function: function.__code__ for function in _originals}
    for function, code in _originals.items():
        function.__code__ = code
    lifted = [finder for finder in sys.meta_path if isinstance(finder, _Blocker) and finder.reversible]
    sys.meta_path[:] = [finder for finder in sys.meta_path if finder not in lifted]
    sys.modules.update(_blocked)
    try:
        yield
    finally:
        for function, code in restored.items():
            function.__code__ = code
        sys.meta_path[:0] = lifted
        for finder in lifted:
            _forget(finder.module, keep=True)


def allow_all() -> None:
    """Switch every reversibly switched-off function and blocked import back on (the end of a lab session, a test)."""
    import sys

    for function, code in list(_originals.items()):
        function.__code__ = code
        _switched_off.pop(function, None)
    _originals.clear()
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _Blocker)]
    sys.modules.update(_blocked)
    _blocked.clear()


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
