"""How a lab says what to grade: parts made of checks, each a probe plus a judge.

A grading spec is a module `autograder.specs.<lab>` with

    DISABLED: tuple[str, ...]   qlab functions the lab asks students to write ("quantize", "metrics.sqnr_db")
    def parts() -> list[Part]   one Part per graded cell of the notebook, same grade_id and points

A `Check` pairs a probe (`call("quantize_symmetric", x, 4)` or `read("why")`: what the sandbox does
in place of the test cell) with a judge: a function of the returned value that runs in the grading
process, computes the expected answer itself (with qlab) and raises `Fail(message)` when the answer is
wrong. Like an nbgrader test cell, a part earns its points only if all its checks pass.

Messages reach students: say what was checked and how it failed, never a hidden input or an expected
value. The helpers below (`returned`, `tensor`, `number`, ...) keep to that. A hidden check's label
("hidden check 3") is completed with the category of its inputs ("hidden check 3 (a 2-D mixed-sign
float tensor; 4)"), so feedback says what kind of input failed without giving its values.

Two refinements of the all-or-nothing rule:

- partial credit: give every check of a part its own `points` (they must add up to the part's points),
  and the part earns the points of each check that passes, as otter-grader's test cases do;
- errors carried forward: a check's `context` lists further probes (the student's own earlier
  functions or variables) whose outcomes reach the judge after the main one, `judge(out, *context)`,
  so an analysis can be marked right given the student's own numbers. A probe argument `Ref("key")`
  stands for what the earlier probe of the same part with `call(..., key="key")` returned, as the
  student's own object (it never leaves the sandbox).
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch

from autograder.plain import Invalid


class Fail(Exception):
    """A check failed; the message is shown to the student."""


@dataclass(frozen=True)
class Call:
    """A probe: call the student's `name(*args, **kwargs)`, or read the variable `name` if `read`."""

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    read: bool = False
    key: str | None = None  # later probes of the same part may pass this probe's value on with Ref(key)


@dataclass(frozen=True)
class Ref:
    """A probe argument: the value the earlier probe `call(..., key=key)` of the same part returned."""

    key: str


def labels(prefix: str):
    """'hidden check 1', 'hidden check 2', ...: names that reveal nothing about the inputs."""
    count = 0

    def label():
        nonlocal count
        count += 1
        return f"{prefix} {count}"

    return label


def call(name: str, *args, key: str | None = None, **kwargs) -> Call:
    return Call(name, args, kwargs, key=key)


def read(name: str, key: str | None = None) -> Call:
    return Call(name, read=True, key=key)


@dataclass(frozen=True)
class Outcome:
    """What one probe gave back: a decoded value, or the name of the exception the call raised."""

    value: Any = None
    raised: str | None = None
    missing: bool = False  # the name was not defined, or the probe never ran
    disabled: str | None = None  # the sandbox's explanation, when the call reached a disabled qlab function


@dataclass(frozen=True)
class Check:
    """One probe and its judge; `label` names the check for the student ("the worked example")."""

    probe: Call
    judge: Callable[..., None]
    label: str
    points: float | None = None  # partial credit: this check's share of the part's points
    context: tuple[Call, ...] = ()  # more probes whose outcomes the judge gets after the main one

    def probes(self) -> tuple[Call, ...]:
        return (self.probe, *self.context)


@dataclass(frozen=True)
class Part:
    """The checks that replace one graded cell (grade_id) worth `points`: all or nothing, unless every
    check has its own points (partial credit)."""

    grade_id: str
    points: float
    checks: tuple[Check, ...]

    def __post_init__(self):
        if self.points <= 0 or not self.checks:
            raise ValueError(f"part {self.grade_id!r} needs positive points and at least one check")
        weighted = [check.points is not None for check in self.checks]
        if any(weighted):
            if not all(weighted) or any(check.points <= 0 for check in self.checks):
                raise ValueError(f"part {self.grade_id!r}: give every check positive points, or none (all or nothing)")
            total = sum(check.points for check in self.checks)
            if not math.isclose(total, self.points, abs_tol=1e-9):
                raise ValueError(f"part {self.grade_id!r}: its checks' points add up to {total:g}, not {self.points:g}")
        keys = [probe.key for check in self.checks for probe in check.probes() if probe.key]
        if len(keys) != len(set(keys)):
            raise ValueError(f"part {self.grade_id!r}: two probes have the same key")
        seen = set()
        for check in self.checks:
            for probe in check.probes():
                refs = {arg.key for arg in (*probe.args, *probe.kwargs.values()) if isinstance(arg, Ref)}
                if refs - seen:
                    raise ValueError(f"part {self.grade_id!r}: Ref{tuple(sorted(refs - seen))} names no earlier probe")
                seen.add(probe.key)

    @property
    def partial(self) -> bool:
        return self.checks[0].points is not None


HIDDEN_LABEL = re.compile(r"hidden check \d+")


def label_of(check: Check) -> str:
    """The check's label as students read it: a bare "hidden check N" gains the category of its inputs."""
    if not HIDDEN_LABEL.fullmatch(check.label) or check.probe.read:
        return check.label
    return f"{check.label} ({describe(*check.probe.args, *check.probe.kwargs.items())})"


def describe(*values) -> str:
    """The category of probe inputs, never their values: "a 2-D all-positive float tensor; 4, axis=-1"."""
    words = []
    for value in values:
        name = None
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            name, value = value
        if isinstance(value, torch.Tensor):
            text = _tensor_category(value)
        elif isinstance(value, Ref):
            text = "your own earlier result"
        elif value is None or type(value) in (bool, int, str) or (type(value) is float and abs(value) < 1e6):
            text = repr(value)
        elif type(value) is float:
            text = "a large number"
        else:
            text = type(value).__name__
        words.append(f"{name}={text}" if name else text)
    return "; ".join(words) or "no inputs"


def _tensor_category(x: torch.Tensor) -> str:
    if x.numel() == 0:
        return f"an empty {x.dim()}-D tensor"
    kind = "integer" if not (x.is_floating_point() or x.is_complex()) else "float"
    values = x.double() if kind == "float" else x.long()
    if kind == "float" and not torch.isfinite(values).all():
        sign = "non-finite"
    elif (values == 0).all():
        sign = "all-zero"
    elif (values == values.reshape(-1)[0]).all():
        sign = "constant"
    elif (values > 0).all():
        sign = "all-positive"
    elif (values >= 0).all():
        sign = "non-negative"
    elif (values < 0).all():
        sign = "all-negative"
    else:
        sign = "mixed-sign"
    extra = ""
    if kind == "float" and values.abs().max() > 1e3:
        extra = " wide-range"
    elif kind == "float" and values.abs().max() < 1e-2 and sign != "all-zero":
        extra = " tiny-valued"
    return f"a {x.dim()}-D {sign}{extra} {kind} tensor" if x.dim() else f"a {sign}{extra} {kind} scalar"


def load(lab: str) -> ModuleType:
    """The grading spec of `lab` (raises ValueError if there is none)."""
    try:
        return importlib.import_module(f"autograder.specs.{lab}")
    except ModuleNotFoundError as error:
        raise ValueError(f"no grading spec for {lab!r}: write autograder/specs/{lab}.py") from error


# -- helpers for judges: each returns the checked value or raises Fail -----------------------------------


def returned(out: Outcome, n: int | None = None, name: str = "the function"):
    """The value of a call that did not raise; with n, a tuple or list of n values."""
    if out.missing:
        raise Fail(f"{name} is not defined")
    if out.disabled:
        raise Fail(f"{name} failed: {out.disabled}")
    if out.raised == "CellTimeout":
        raise Fail(f"{name} ran past the time limit of its test")
    if out.raised:
        raise Fail(f"{name} raised {out.raised}")
    if isinstance(out.value, Invalid):
        raise Fail(f"{name} returned {out.value.why}, not what was asked for")
    if n is None:
        return out.value
    if not isinstance(out.value, tuple) or len(out.value) != n:
        raise Fail(f"{name} must return {n} values")
    for item in out.value:
        if isinstance(item, Invalid):
            raise Fail(f"{name} returned {item.why}, not what was asked for")
    return out.value


def tensor(value, dtype: torch.dtype, shape: tuple | None = None, what: str = "the result") -> torch.Tensor:
    """value as a torch tensor, failing unless the student returned a tensor of this dtype (and shape)."""
    if not isinstance(value, np.ndarray):
        raise Fail(f"{what} must be a {dtype} tensor, got {type(value).__name__}")
    result = torch.from_numpy(value)
    if result.dtype != dtype:
        raise Fail(f"{what} must be a {dtype} tensor, got {result.dtype}")
    if shape is not None and tuple(result.shape) != tuple(shape):
        raise Fail(f"wrong shape for {what}")
    return result


def number(value, what: str = "the result", integer: bool = False) -> float:
    """A Python number or a one-element tensor as a float (as an int if `integer`)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        if integer and value.dtype.kind not in "iu":
            raise Fail(f"{what} must be an integer")
        value = value.reshape(()).item()
    if type(value) is bool or type(value) not in (int, float):
        raise Fail(f"{what} must be a number or a one-element tensor, got {type(value).__name__}")
    if integer and type(value) is not int:
        raise Fail(f"{what} must be an integer")
    return value


def letter(variable: str, right: str, choices: tuple[str, ...] = ("a", "b", "c", "d")) -> Check:
    """A multiple-choice answer: read `variable` and check that it is the letter `right`."""
    allowed = ", ".join(f'"{c}"' for c in choices)

    def judge(out):
        value = returned(out, None, variable)
        expect(isinstance(value, str) and value in choices, f"{variable} must be one of {allowed}")
        expect(value == right, f"{variable} is not the best explanation")

    return Check(read(variable), judge, variable)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Fail(message)


def close(actual: float, expected: float, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """math.isclose that also treats two equal infinities as close, and NaN as never close."""
    return actual == expected or math.isclose(actual, expected, rel_tol=rtol, abs_tol=atol)
