"""Granularity: which elements share one (scale, zero_point) pair.

For an input `x` the four granularities give qparams of these shapes:

    PerTensor()          one pair for the whole tensor            scale.shape == ()
    PerChannel(axis=0)   one pair per index along `axis`          scale.shape == (x.shape[axis],)
    PerToken()           one pair per row (reduce the LAST axis)  scale.shape == x.shape[:-1]
    PerGroup(g)          one pair per `g` consecutive elements    scale.shape == (*x.shape[:-1], K // g)
                         of the LAST axis (K = x.shape[-1])

For a linear layer's weight W of shape (out_features, in_features), PerChannel(axis=0) is "per output
channel", and PerGroup(128) is the group-wise scheme of GPTQ/AWQ/QLoRA. For activations X of shape
(tokens, hidden), PerToken() gives each token its own scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PerTensor:
    """One scale (and zero_point) for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per index along `axis` (default 0: the output channels of a weight)."""

    axis: int = 0


@dataclass(frozen=True)
class PerToken:
    """One scale per row: every index of all axes but the last."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per `group_size` consecutive elements of the last axis."""

    group_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer, e.g. PerGroup(128)")


Granularity = PerTensor | PerChannel | PerToken | PerGroup


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_granularity(x: torch.Tensor, granularity: Granularity) -> None:
    """Raise ValueError if `granularity` cannot be applied to a tensor shaped like `x`."""
    if isinstance(granularity, PerTensor):
        return
    if isinstance(granularity, PerChannel):
        if x.dim() == 0 or not -x.dim() <= granularity.axis < x.dim():
            raise ValueError(
                f"PerChannel(axis={granularity.axis}) is out of range for a tensor of shape {tuple(x.shape)}; "
                f"pick an axis in [{-x.dim()}, {x.dim() - 1}]"
            )
        return
    if isinstance(granularity, (PerToken, PerGroup)) and x.dim() == 0:
        raise ValueError(f"{granularity} needs a tensor with at least one axis; got a 0-d tensor")
    if isinstance(granularity, PerToken):
        return
    if isinstance(granularity, PerGroup):
        k, g = x.shape[-1], granularity.group_size
        if k % g != 0:
            raise ValueError(
                f"group_size={g} must divide the last axis ({k} elements); "
                f"try one of {_divisors(k)[-6:]}"
            )
        return
    raise ValueError(
        f"granularity must be ql.PerTensor(), ql.PerChannel(axis), ql.PerToken() or ql.PerGroup(group_size); "
        f"got {granularity!r}"
    )


def slices(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """View `x` so that each slice sharing one qparam pair lies along the last axis.

    Reducing the result over its last axis (min, max, absmax) gives the per-slice statistics,
    already in the qparam shape listed in the module docstring.
    """
    check_granularity(x, granularity)
    if isinstance(granularity, PerTensor):
        return x.reshape(-1)  # (N,) -> reduces to ()
    if isinstance(granularity, PerChannel):
        return x.movedim(granularity.axis, 0).reshape(x.shape[granularity.axis], -1)  # (C, N/C)
    if isinstance(granularity, PerToken):
        return x  # (..., K) -> reduces to (...)
    g = granularity.group_size
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)  # (..., K/g, g)


def qparam_shape(x: torch.Tensor, granularity: Granularity) -> tuple[int, ...]:
    """The shape that `scale` and `zero_point` have for `x` at this granularity."""
    return tuple(slices(x, granularity).shape[:-1])


def expand(t: torch.Tensor, x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Reshape per-slice qparams `t` so they broadcast against `x` element by element."""
    expected = qparam_shape(x, granularity)
    if tuple(t.shape) != expected and t.numel() != 1:
        raise ValueError(
            f"qparams of shape {tuple(t.shape)} do not fit {granularity} on a tensor of shape {tuple(x.shape)}; "
            f"expected shape {expected} (as returned by ql.choose_qparams)"
        )
    if t.numel() == 1 and tuple(t.shape) != expected:
        return t.reshape(())
    if isinstance(granularity, PerTensor):
        return t
    if isinstance(granularity, PerChannel):
        shape = [1] * x.dim()
        shape[granularity.axis] = -1
        return t.reshape(shape)  # (1, .., C, .., 1)
    if isinstance(granularity, PerToken):
        return t.unsqueeze(-1)  # (..., 1)
    return t.repeat_interleave(granularity.group_size, dim=-1)  # (..., K/g) -> (..., K)
