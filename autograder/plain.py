"""Plain data between the judge and the sandbox: JSON, with tensors as dtype + shape + raw bytes.

The sandbox side (`encode`, `to_torch`) runs next to student code; the judge side (`decode`) trusts
nothing it is given: it accepts only the few shapes of data below, checks every size, never unpickles,
and turns anything else into an `Invalid` value. A returned object whose `__eq__` or `__bool__`
lies is not a tensor, so it is encoded as {"other": its type name} and judged as the wrong type.

    None, bool, str          -> {"none": true}, {"bool": b}, {"str": s}
    int, float               -> {"int": "123"}, {"float": "0.25"}      (text: big ints, inf and nan survive)
    tuple, list              -> {"seq": [...]}                         (at most MAX_ITEMS, MAX_DEPTH deep)
    torch.Tensor (exactly)   -> {"tensor": {"dtype": "int8", "shape": [2, 3], "data": base64}}
    anything else            -> {"other": type name}
"""

from __future__ import annotations

import base64
import binascii
import builtins
import math
from dataclasses import dataclass

import numpy as np
import torch

DTYPES = {  # torch dtype <-> the numpy dtype that carries the same bytes
    torch.bool: "bool", torch.uint8: "uint8", torch.int8: "int8", torch.int16: "int16",
    torch.int32: "int32", torch.int64: "int64", torch.float16: "float16", torch.float32: "float32",
    torch.float64: "float64",
}
MAX_ELEMENTS = 1 << 22
MAX_ITEMS, MAX_DEPTH, MAX_STR = 64, 4, 10_000
# Names the judge may repeat to a student. Any other name comes from a class the student made, and
# could spell out whatever the sandbox saw (a hidden input), so feedback never shows it.
SAFE_TYPE_NAMES = {name for name, value in vars(builtins).items() if isinstance(value, type)}
SAFE_TYPE_NAMES |= {"ndarray", "huge int"} | {f"torch.Tensor of {dtype}" for dtype in vars(torch).values()
                                              if isinstance(dtype, torch.dtype)}


@dataclass(frozen=True)
class Invalid:
    """A value the sandbox sent that is not plain data; `why` says what it was."""

    why: str


# -- sandbox side ---------------------------------------------------------------------------------------


def encode(value, depth: int = 0) -> dict:
    """One returned value as JSON-ready plain data (see the module docstring)."""
    kind = type(value)
    if value is None:
        return {"none": True}
    if kind is bool:
        return {"bool": value}
    if kind is int:
        return {"int": str(value)} if abs(value) < 10**100 else {"other": "huge int"}
    if kind is float:
        return {"float": repr(value)}
    if kind is str:
        return {"str": value[:MAX_STR]}
    if kind in (tuple, list) and depth < MAX_DEPTH:
        return {"seq": [encode(item, depth + 1) for item in value[:MAX_ITEMS]]}
    if kind is torch.Tensor and value.dtype in DTYPES and value.numel() <= MAX_ELEMENTS:
        array = value.detach().cpu().contiguous().numpy()
        data = base64.b64encode(array.tobytes()).decode("ascii")
        return {"tensor": {"dtype": DTYPES[value.dtype], "shape": list(array.shape), "data": data}}
    name = "torch.Tensor of " + str(value.dtype) if kind is torch.Tensor else kind.__name__
    return {"other": str(name)[:100]}


def to_torch(value):
    """A probe argument as the student receives it: numpy arrays become fresh torch tensors."""
    return torch.from_numpy(value.copy()) if isinstance(value, np.ndarray) else value


# -- judge side -----------------------------------------------------------------------------------------


def to_transport(value):
    """A probe argument written by a spec (tensor or plain scalar) in the form sent to the sandbox."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    if value is None or type(value) in (bool, int, float, str):
        return value
    raise TypeError(f"probe arguments must be tensors or plain scalars, got {type(value).__name__}")


def decode(data, depth: int = 0):
    """Plain data from `encode` as Python values: numpy arrays (for tensors), scalars, tuples, or Invalid."""
    if not isinstance(data, dict) or len(data) != 1:
        return Invalid("malformed value")
    (key, value), = data.items()
    if key == "none" and value is True:
        return None
    if key == "bool" and isinstance(value, bool):
        return value
    if key == "str" and isinstance(value, str):
        return value[:MAX_STR]
    if key == "int" and isinstance(value, str) and len(value) < 110:
        try:
            return int(value)
        except ValueError:
            return Invalid("malformed int")
    if key == "float" and isinstance(value, str) and len(value) < 40:
        try:
            return float(value)
        except ValueError:
            return Invalid("malformed float")
    if key == "seq" and isinstance(value, list) and len(value) <= MAX_ITEMS and depth < MAX_DEPTH:
        return tuple(decode(item, depth + 1) for item in value)
    if key == "tensor":
        return _decode_tensor(value)
    if key == "other" and isinstance(value, str):
        return Invalid(f"a {value}" if value in SAFE_TYPE_NAMES else "an object of a class of its own")
    return Invalid("malformed value")


def _decode_tensor(value) -> np.ndarray | Invalid:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        return Invalid("malformed tensor")
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    if dtype not in DTYPES.values() or not isinstance(shape, list) or not isinstance(data, str) or len(shape) > 16:
        return Invalid("malformed tensor")
    if not all(type(n) is int and 0 <= n <= MAX_ELEMENTS for n in shape) or math.prod(shape) > MAX_ELEMENTS:
        return Invalid("malformed tensor")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return Invalid("malformed tensor")
    if len(raw) != math.prod(shape) * np.dtype(dtype).itemsize:
        return Invalid("malformed tensor")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
