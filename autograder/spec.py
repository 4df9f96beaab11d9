"""How a lab says what to grade: parts made of checks, each a probe plus a judge.

A grading spec is a module `autograder.specs.<lab>` with

    DISABLED: tuple[str, ...]   qlab functions the lab asks students to write ("quantize", "metrics.sqnr_db")
    def parts() -> list[Part]   one Part per graded cell of the notebook, same grade_id and points

A `Check` pairs a probe (`call("quantize_symmetric", x, 4)` or `read("why")`: what the sandbox does
in place of the test cell) with a judge: a function of the returned value that runs in the grading
process, computes the expected answer itself (with qlab) and raises `Fail(message)` when the answer is
wrong. Like an nbgrader test cell, a part earns its points only if all its checks pass.

Messages reach students: say what was checked and how it failed, never a hidden input or an expected
value. The helpers below (`returned`, `tensor`, `number`, ...) keep to that.
"""

from __future__ import annotations

import importlib
import math
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


def labels(prefix: str):
    """'hidden check 1', 'hidden check 2', ...: names that reveal nothing about the inputs."""
    count = 0

    def label():
        nonlocal count
        count += 1
        return f"{prefix} {count}"

    return label


def call(name: str, *args, **kwargs) -> Call:
    return Call(name, args, kwargs)


def read(name: str) -> Call:
    return Call(name, read=True)


@dataclass(frozen=True)
class Outcome:
    """What one probe gave back: a decoded value, or the name of the exception the call raised."""

    value: Any = None
    raised: str | None = None
    missing: bool = False  # the name was not defined, or the probe never ran


@dataclass(frozen=True)
class Check:
    """One probe and its judge; `label` names the check for the student ("the worked example")."""

    probe: Call
    judge: Callable[[Outcome], None]
    label: str


@dataclass(frozen=True)
class Part:
    """The checks that replace one graded cell (grade_id) worth `points`."""

    grade_id: str
    points: float
    checks: tuple[Check, ...]

    def __post_init__(self):
        if self.points <= 0 or not self.checks:
            raise ValueError(f"part {self.grade_id!r} needs positive points and at least one check")


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
    if out.raised == "CellTimeout":
        raise Fail(f"{name} ran past the time limit")
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
        raise Fail(f"{what} has the wrong shape")
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
