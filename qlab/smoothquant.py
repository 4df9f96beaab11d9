"""SmoothQuant: migrate the quantization difficulty from activations to weights, exactly, before W8A8.

G. Xiao, J. Lin, M. Seznec, H. Wu, J. Demouth, S. Han. "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023, https://arxiv.org/abs/2211.10438.

For a linear layer fed by a norm, Y = X W^T = (X diag(s)^-1) (W diag(s))^T for any s > 0. Dividing the
activation channels j by s_j flattens their outliers; multiplying the weight columns by s_j absorbs it.
The paper's choice, per input channel j, with migration strength alpha:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)          (clamped at 1e-5, as mit-han-lab/smoothquant does)

X diag(s)^-1 is folded into the norm's weight and bias (so it costs nothing at run time), diag(s) W into
every linear that reads the norm's output. This is exact only when the norm's output feeds nothing else:
true for pre-LN transformers (GPT, OPT, LLaMA: the residual bypasses the norm), false for post-LN BERT,
whose norm output is also the residual. There a mapping names no norm (None) and the division stays
explicit: the linears become `SmoothedLinear` (x * input_scale, input_scale = 1/s, then W diag(s)), and the
W8A8 layers built from them multiply the input by input_scale just before quantizing it (one multiply per
element, on the tensor the quantizer reads anyway). Which module feeds which linears is data kept next to
each model (`smoothquant_mappings()`), never guessed.

Math first (tensor functions), then model glue (`smooth_`, `alpha_sweep`), then `SmoothQuantConfig`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .api import QuantConfig, register_handler
from .calibration import record

EPS = 1e-5

Mapping = tuple[str | None, tuple[str, ...]]  # (norm module name or None, names of the linears that read one input)


# ----------------------------------------------------------------------------- 1) the math
def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-channel smoothing factors s (K,): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), clamped at 1e-5."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]: 0 leaves activations alone, 1 moves all of their range "
                         "into the weights; the paper uses 0.5 (0.75-0.85 for the largest models)")
    if act_absmax.shape != weight_absmax.shape or act_absmax.dim() != 1:
        raise ValueError(f"act_absmax {tuple(act_absmax.shape)} and weight_absmax {tuple(weight_absmax.shape)} must "
                         "both be (in_features,): one max |value| per input channel")
    act, w = act_absmax.float().clamp(min=EPS), weight_absmax.float().clamp(min=EPS)  # an all-zero channel stays finite
    return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=EPS)  # the paper's equation


def weight_absmax(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """max |W[:, j]| over the output rows of every linear that reads the same input: (in_features,)."""
    return torch.stack([lin.weight.detach().abs().amax(dim=0) for lin in linears]).amax(dim=0).float()


@torch.no_grad()
def apply_smoothing_(norm: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """Fold X diag(s)^-1 into the norm (weight and bias divided by s) and diag(s) W into each linear, in place."""
    K = s.numel()
    if getattr(norm, "weight", None) is None or norm.weight.shape != (K,):
        raise ValueError(f"the norm must have an elementwise weight of shape ({K},), got "
                         f"{None if getattr(norm, 'weight', None) is None else tuple(norm.weight.shape)}")
    for lin in linears:
        if lin.weight.shape[1] != K:
            raise ValueError(f"a linear with in_features={lin.weight.shape[1]} cannot read a norm of {K} channels")
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])  # column j of W times s_j


class SmoothedLinear(nn.Linear):
    """nn.Linear that scales its input channels first: y = (x * input_scale) W^T + b.

    SmoothQuant's explicit form for a linear whose input comes from a module that cannot absorb 1/s (the
    LayerNorm of a post-LN transformer, whose output is also the residual). Buffers: weight (already
    W diag(s)), bias, input_scale (K,) = 1/s. W8A8 configs carry input_scale into their QuantLinear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("input_scale", torch.ones(in_features, device=device, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SmoothedLinear:
        """A SmoothedLinear computing exactly what `linear` computes (input_scale = 1)."""
        if isinstance(linear, SmoothedLinear):
            return linear
        if type(linear) is not nn.Linear:
            raise ValueError(f"explicit smoothing needs a plain nn.Linear, got {type(linear).__name__}; smooth the "
                             "model before quantizing it")
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                  linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        return new.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.input_scale.to(x.dtype), self.weight, self.bias)


@torch.no_grad()
def apply_explicit_smoothing_(model: nn.Module, linear_names: Sequence[str], s: torch.Tensor) -> None:
    """Smooth linears that share one input without touching the module that produces it: each becomes a
    SmoothedLinear with input_scale /= s and weight columns * s, in place (exact up to rounding)."""
    K = s.numel()
    for name in linear_names:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear) or lin.in_features != K:
            raise ValueError(f"{name!r} must be an nn.Linear with in_features={K}, got {lin}")
        new = SmoothedLinear.from_linear(lin)
        new.weight.mul_(s.to(new.weight.dtype)[None, :])
        new.input_scale.div_(s.float())
        if new is not lin:
            model.set_submodule(name, new)


class ChannelAbsMax:
    """Accumulator for calibration.record: the running max |x| per channel (last axis) over every token."""

    def __init__(self) -> None:
        self.absmax: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()  # (K,)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)


# ----------------------------------------------------------------------------- 2) model glue
def _resolve(model: nn.Module, mappings: Sequence[Mapping] | None) -> list[Mapping]:
    if mappings is None:
        if not hasattr(model, "smoothquant_mappings"):
            raise ValueError(f"{type(model).__name__} has no smoothquant_mappings(); pass mappings=[(norm_name, "
                             "(linear_name, ...)), ...], e.g. [('blocks.0.ln_1', ('blocks.0.attn.c_attn',))]")
        mappings = model.smoothquant_mappings()
    modules = dict(model.named_modules())
    resolved = []
    for norm, linears in mappings:
        linears = (linears,) if isinstance(linears, str) else tuple(linears)
        if not linears:
            raise ValueError(f"the mapping of {norm!r} names no linear layer")
        missing = [n for n in (*([norm] if norm is not None else []), *linears) if n not in modules]
        if missing:
            raise ValueError(f"mapping names {missing}, which the model does not have; its modules are "
                             f"{[n for n in modules if n][:40]}")
        resolved.append((norm, linears))
    return resolved


def activation_absmax(model: nn.Module, mappings: Sequence[Mapping], calib_data: Iterable,
                      progress: bool = False) -> dict[str, torch.Tensor]:
    """max |x| per input channel of each mapping's first linear (= the norm's output), over calib_data.

    For a linear smoothed before (a SmoothedLinear), the statistic is of x * input_scale, what it multiplies."""
    first = [linears[0] for _, linears in mappings]
    stats = record(model, first, ChannelAbsMax, calib_data, progress=progress)
    out = {}
    for name in first:
        absmax = stats[name].input.absmax
        if absmax is None:
            raise ValueError(f"{name!r} never ran on calib_data; check the mapping and the batches")
        scale = getattr(model.get_submodule(name), "input_scale", None)
        out[name] = absmax if scale is None else absmax * scale.abs().float()
    return out


@torch.no_grad()
def smooth_(
    model: nn.Module,
    calib_data: Iterable,
    alpha: float = 0.5,
    mappings: Sequence[Mapping] | None = None,
    scales_fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Smooth every (norm -> linears) mapping of `model` in place; returns {norm name (or first linear): s}.

    A mapping with norm=None is smoothed explicitly (apply_explicit_smoothing_). scales_fn(act_absmax,
    weight_absmax, alpha) computes s (default: smoothing_scales, looked up when called); the lab passes a
    student's function here; its result is checked.
    """
    scales_fn = scales_fn or smoothing_scales
    mappings = _resolve(model, mappings)
    act = activation_absmax(model, mappings, calib_data, progress)
    scales = {}
    for norm, linears in mappings:
        fcs = [model.get_submodule(n) for n in linears]
        K = fcs[0].in_features
        if any(f.in_features != K for f in fcs):
            raise ValueError(f"the linears {list(linears)} read one input but have in_features "
                             f"{[f.in_features for f in fcs]}; fix the mapping")
        s = scales_fn(act[linears[0]], weight_absmax(fcs), alpha)
        if not isinstance(s, torch.Tensor) or s.shape != (K,) or not bool(torch.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"scales_fn must return {K} finite positive factors for {linears[0]!r}, got "
                             f"{s if not isinstance(s, torch.Tensor) else (tuple(s.shape), s.dtype)}")
        if norm is None:
            apply_explicit_smoothing_(model, linears, s)
        else:
            apply_smoothing_(model.get_submodule(norm), fcs, s)
        scales[norm if norm is not None else linears[0]] = s
    return scales


def alpha_sweep(
    model: nn.Module,
    calib_data: Iterable,
    alphas: Sequence[float],
    evaluate: Callable[[nn.Module], float],
    quant_config: QuantConfig,
    mappings: Sequence[Mapping] | None = None,
) -> list[tuple[float, float]]:
    """[(alpha, evaluate(smoothed then quantized copy of model))]: the error per alpha, for a plot."""
    from .api import quantize_

    batches = list(calib_data)
    results = []
    for alpha in alphas:
        m = copy.deepcopy(model)
        smooth_(m, batches, alpha, mappings)
        quantize_(m, quant_config, calib_data=batches)
        results.append((float(alpha), float(evaluate(m))))
    return results


# ----------------------------------------------------------------------------- 3) the config
@dataclass(frozen=True)
class SmoothQuantConfig(QuantConfig):
    """Smooth the model in place (no module is swapped): put it before a W8A8 config in a recipe,
    `[ql.SmoothQuantConfig(alpha=0.5), ql.Int8StaticConfig()]`. mappings=None uses model.smoothquant_mappings()."""

    alpha: float = 0.5
    mappings: tuple[Mapping, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")
        if self.mappings is not None:
            object.__setattr__(self, "mappings", tuple((n, (ls,) if isinstance(ls, str) else tuple(ls))
                                                       for n, ls in self.mappings))

    @property
    def needs_calib_data(self) -> bool:
        return True


@register_handler(SmoothQuantConfig)
def _smoothquant(model: nn.Module, config: SmoothQuantConfig, calib_data) -> nn.Module:
    smooth_(model, calib_data, config.alpha, config.mappings)
    return model


__all__ = ["smoothing_scales", "weight_absmax", "apply_smoothing_", "SmoothedLinear", "apply_explicit_smoothing_",
           "ChannelAbsMax", "activation_absmax", "smooth_",
           "alpha_sweep", "SmoothQuantConfig"]
