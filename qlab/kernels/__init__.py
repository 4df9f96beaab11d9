"""qlab.kernels: the matmuls behind quantized layers, as a registry of kernels per op.

Every op has a pure-torch reference (`reference.py`) that runs everywhere and is the truth; fast paths
(`cpu.py`, `cuda.py`) register themselves for the same op with a `supports(...)` test, and a call runs
the first kernel, in priority order, whose `supports` accepts the operands (device, dtype, shapes, row
count M, CPU capability). The reference is last and accepts everything.

    ql.kernels.call("linear_w8a8", x, weight_q, weight_scale, act, cache)      what QuantLinear runs
    ql.kernels.call("linear_weight_only", x, qt, cache)                        int8 / int4 weight-only layers
    ql.kernels.call("int_mm", a, b)                                            int8 @ int8 -> int32
    ql.kernels.register(op, name, supports, fn, pack=None, priority=0, tolerance=0.0)

`pack(...)` derives a kernel's own weight layout (fbgemm's prepacked weight, the tinygemm int4 layout)
from the canonical one the module stores; layers keep it in a `KernelCache`, per kernel and device, that
is never saved. `tolerance` is the documented bound on |y - y_ref| / |y_ref| against the reference (0 for
kernels that compute the very same integers); tests/test_kernels.py checks every kernel against it.

To see which kernel ran, record inside a `with` block; to take kernels out of the choice, disable them:

    with ql.kernels.trace() as ran:
        model(x)
    print(ran)                                  # ['fbgemm linear_dynamic (cpu)', ...]
    with ql.kernels.disable("fbgemm linear_dynamic (cpu)"):
        model(x)                                # the next kernel in line, down to the reference
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

REFERENCE = "reference"


@dataclass(frozen=True)
class Kernel:
    """One implementation of an op: `fn` runs it, `supports` says whether it takes these operands."""

    op: str
    name: str
    supports: Callable[..., bool]
    fn: Callable[..., torch.Tensor]
    pack: Callable | None = None
    priority: int = 0
    tolerance: float = 0.0


class KernelCache(dict):
    """Kernel-specific weight layouts a module derived on first use, keyed by (kernel name, device).

    Never saved (it is not a buffer and pickles empty) and dropped on copy: it is derived data.
    """

    def __deepcopy__(self, memo) -> KernelCache:
        return KernelCache()

    def __reduce__(self):
        return (KernelCache, ())

    def get_packed(self, kernel: Kernel, device: torch.device, *args):
        """The kernel's layout of these weights, packing them the first time (kernel.pack(*args))."""
        key = (kernel.name, str(device))
        if key not in self:
            self[key] = kernel.pack(*args)
        return self[key]


_REGISTRY: dict[str, list[Kernel]] = {}
_disabled: set[str] = set()
_open_traces: list[list[str]] = []  # one list per active `trace()` block


def register(
    op: str,
    name: str,
    supports: Callable[..., bool],
    fn: Callable[..., torch.Tensor],
    pack: Callable | None = None,
    priority: int = 0,
    tolerance: float = 0.0,
) -> Kernel:
    """Add a kernel for `op`. Higher priority is tried first; a name registered twice is replaced."""
    if not op or not name:
        raise ValueError("register(op, name, ...) needs a non-empty op and kernel name")
    kernel = Kernel(op, name, supports, fn, pack, priority, tolerance)
    kernels = [k for k in _REGISTRY.get(op, []) if k.name != name] + [kernel]
    _REGISTRY[op] = sorted(kernels, key=lambda k: -k.priority)
    return kernel


def ops() -> list[str]:
    """Every op that has a kernel."""
    return sorted(_REGISTRY)


def registered(op: str) -> list[Kernel]:
    """The kernels of `op`, in the order they are tried."""
    if op not in _REGISTRY:
        raise ValueError(f"no kernel is registered for op {op!r}; known ops: {ops()}")
    return list(_REGISTRY[op])


def choose(op: str, *args) -> Kernel:
    """The kernel a call of `op` with these operands would run."""
    for kernel in registered(op):
        if kernel.name not in _disabled and kernel.supports(*args):
            return kernel
    raise ValueError(f"no enabled kernel of {op!r} accepts these operands (is the reference disabled?)")


def run(kernel: Kernel, *args):
    """Run one given kernel (recorded by trace) without asking the others."""
    for ran in _open_traces:
        ran.append(kernel.name)
    return kernel.fn(*args)


def call(op: str, *args):
    """Run `op` on the first enabled kernel, in priority order, whose supports(*args) is True."""
    return run(choose(op, *args), *args)


@contextmanager
def trace() -> Iterator[list[str]]:
    """Collect the name of every kernel that runs inside the block, in order."""
    ran: list[str] = []
    _open_traces.append(ran)
    try:
        yield ran
    finally:
        _open_traces.remove(ran)


def kernels_run(fn, *args, **kwargs) -> list[str]:
    """The names of the kernels one call fn(*args, **kwargs) runs, in order (under torch.inference_mode)."""
    with torch.inference_mode(), trace() as ran:
        fn(*args, **kwargs)
    return ran


@contextmanager
def disable(*names: str) -> Iterator[None]:
    """Take the named kernels out of the choice inside the block (the reference cannot be disabled)."""
    known = {k.name for op in _REGISTRY for k in _REGISTRY[op]}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown kernel names {unknown}; registered: {sorted(known)}")
    if REFERENCE in names:
        raise ValueError("the reference kernel is the truth every op falls back to; it cannot be disabled")
    added = set(names) - _disabled
    _disabled.update(added)
    try:
        yield
    finally:
        _disabled.difference_update(added)


def fast_only(*ops_: str) -> list[str]:
    """Names of every non-reference kernel of the given ops (all ops if none given): for `disable(*...)`."""
    return [k.name for op in (ops_ or ops()) for k in registered(op) if k.name != REFERENCE]


# The ops and their kernels register on import: the reference first (lowest priority), then fast paths.
from . import reference  # noqa: E402
from . import cpu, cuda, native  # noqa: E402
from .reference import ActQuant  # noqa: E402


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 (M, K) @ int8 (K, N) -> int32 (M, N), on the fastest kernel that takes these operands."""
    reference.check_int_mm_operands(a, b)
    return call("int_mm", a, b)


INT_MM_CPU = cpu.INT_MM
INT_MM_CUDA = cuda.INT_MM

__all__ = [
    "Kernel", "KernelCache", "ActQuant", "register", "registered", "ops", "choose", "call", "run", "trace", "kernels_run",
    "disable", "fast_only", "int_mm", "REFERENCE", "INT_MM_CPU", "INT_MM_CUDA", "reference", "cpu", "cuda", "native",
]
