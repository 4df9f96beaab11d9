"""AWQ: protect the weights that meet large activations by scaling them up before rounding.

J. Lin, J. Tang, H. Tang, S. Yang, W.-M. Chen, W.-C. Wang, G. Xiao, X. Dang, C. Gan, S. Han. "AWQ:
Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024,
https://arxiv.org/abs/2306.00978.

Keeping 1 % of the input channels (those with the largest mean |x|) in FP16 recovers most of the
accuracy lost to 3/4-bit weights, but mixed precision is awkward for kernels. Scaling does the same in
one precision: Y = (X diag(s)^-1)(W diag(s))^T, and rounding W diag(s) makes the relative error of the
scaled-up columns smaller. AWQ searches one exponent r per group of linears sharing an input:

    s = mean|x|^r / sqrt(max(mean|x|^r) * min(mean|x|^r)),   r in {0, 1/n_grid, ..., (n_grid-1)/n_grid}

and keeps the r that minimises the MSE of the output of the module that reads those linears ("the
block"), with the weights fake-quantized as Q(W diag(s)) diag(s)^-1. Then it clips: per group of weights
it shrinks the range to max|w| * (1 - i/n_grid), i < n_grid * max_shrink, to minimise the error of the
group's partial dot products.

Conventions of mit-han-lab/llm-awq (reproduced here):
- mean |x| per input channel over every calibration token (called x_max there, but a mean).
- The grid excludes r = 1.0; scales are clamped at 1e-4 before the normalisation.
- The loss is the MSE of the inspected module's output (no weight term). AutoAWQ's default
  `duo_scaling=True` differs: s = mean|x|^r / (mean|W~|^(1-r) + 1e-4), W~ = |W| / max|W| of its group,
  averaged over output rows (available here as duo_scaling=True).
- The quantizer is asymmetric min/max per group and does NOT widen the range to include 0
  (scale = (max - min).clamp(1e-5) / maxq, zero = clamp(-round(min / scale), 0, maxq)), unlike GPTQ's.
- Clipping is symmetric (clamp(w, -m, m)) even though the quantizer is not; q/k projections (names
  containing q_, k_, query, key, Wqkv, or a fused c_attn) are not clipped: their product in the
  attention scores is too sensitive to judge by one layer's output.
- Every block's inputs come from the float (unscaled, unclipped) model: AWQ does not propagate
  quantization error, unlike GPTQ.
Which module feeds which linears is data next to each model (`awq_mappings()`), extending the norm ->
linears pairs SmoothQuant uses with linear -> linear (v -> attention output) and activation -> linear pairs.

Math first (`pseudo_quantize`, `mean_abs`, `scale_grid_losses`, `search_scales`, `search_clip`), then the
model walker (`apply`), then `AWQConfig`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .api import QuantConfig, register_handler, swap_modules
from .calibration import recording
from .core.granularity import PerGroup
from .core.qtensor import QTensor, from_codes
from .core.qtypes import QType, qtype as make_qtype
from .gptq import _GroupedWeightConfig, _bits_of, _block_inputs, _check_calibration_length, transformer_blocks
from .nn import Int4WeightOnlyLinear, WeightOnlyLinear, _group_divisors

CLIP_SKIP = ("*q_*", "*k_*", "*query*", "*key*", "*Wqkv*", "*c_attn")  # layers the clip search leaves alone

Mapping = tuple[str, tuple[str, ...], str]  # (module whose output the linears read, linears, module to inspect)


# ----------------------------------------------------------------------------- 1) the math
def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    K = w.shape[-1]
    gs = K if group_size == -1 else group_size
    if K % gs:
        raise ValueError(f"group_size={group_size} must divide in_features={K}; try one of {_group_divisors(K)}")
    return w.reshape(-1, gs)  # (N * K / gs, gs)


def quantize_codes(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ's group quantizer: (codes (N, K), scale (N, G), zero (N, G)); asymmetric, range NOT widened to 0."""
    maxq = 2**bits - 1
    g = _groups(w.float(), group_size)
    w_max, w_min = g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True)
    scale = (w_max - w_min).clamp(min=1e-5) / maxq
    zero = torch.clamp(-torch.round(w_min / scale), 0, maxq)
    codes = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
    N = w.shape[0]
    return codes.reshape(w.shape), scale.reshape(N, -1), zero.reshape(N, -1)


def pseudo_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """Fake-quantize w with AWQ's group quantizer: (clamp(round(w / s) + z, 0, maxq) - z) * s, same shape."""
    codes, scale, zero = quantize_codes(w, bits, group_size)
    G = scale.shape[1]
    q = codes.reshape(-1, w.shape[1] // G)
    return ((q - zero.reshape(-1, 1)) * scale.reshape(-1, 1)).reshape(w.shape).to(w.dtype)


def to_qtensor(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> QTensor:
    """The codes of AWQ's quantizer as a QTensor (uint{bits}, a zero point per group)."""
    codes, scale, zero = quantize_codes(w, bits, group_size)
    gs = w.shape[1] if group_size == -1 else group_size
    return from_codes(codes.to(torch.int32), scale, zero.to(torch.int32), make_qtype(bits, signed=False), PerGroup(gs),
                      symmetric=False)


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    """mean |x| per input channel (the last axis) over every token: (K,) float32 (llm-awq's get_act_scale)."""
    return x.detach().abs().reshape(-1, x.shape[-1]).float().mean(dim=0)


def _weight_mean(linears: Sequence[nn.Linear], group_size: int) -> torch.Tensor:
    """AutoAWQ's duo_scaling statistic: mean over output rows of |W| / max|W| of its group, (K,)."""
    W = torch.cat([lin.weight.detach().float() for lin in linears], dim=0)  # (sum N, K)
    g = _groups(W.abs(), group_size)
    g = g / (g.amax(dim=1, keepdim=True) + 1e-6)
    return g.reshape(W.shape).mean(dim=0)


def scales_for_ratio(x_mean: torch.Tensor, ratio: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s = mean|x|^r (or AutoAWQ's mean|x|^r / (w_mean^(1-r) + 1e-4)), clamped at 1e-4, divided by sqrt(max * min)."""
    if w_mean is None:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _first_output(y):
    return y[0] if isinstance(y, (tuple, list)) else y


@torch.no_grad()
def scale_grid_losses(block: nn.Module, x: torch.Tensor, linears: Sequence[nn.Linear], qtype: QType | int = 4,
                      group_size: int = 128, n_grid: int = 20, duo_scaling: bool = False,
                      block_kwargs: dict | None = None) -> list[tuple[float, float]]:
    """[(r, MSE of block(x) with Q(W s)/s in every linear vs the float block)] for r in the grid; weights restored."""
    bits, kwargs = _bits_of(qtype), block_kwargs or {}
    x_mean = mean_abs(x)
    w_mean = _weight_mean(linears, group_size) if duo_scaling else None
    if any(lin.in_features != x_mean.numel() for lin in linears):
        raise ValueError(f"the linears read {[lin.in_features for lin in linears]} channels but x has {x_mean.numel()}")
    saved = [lin.weight.detach().clone() for lin in linears]
    out_float = _first_output(block(x, **kwargs)).float()
    losses = []
    try:
        for i in range(n_grid):  # r = 1.0 is not in the grid
            r = i / n_grid
            s = scales_for_ratio(x_mean, r, w_mean)
            for lin, w in zip(linears, saved):
                sw = s.to(w.dtype)[None, :]
                lin.weight.copy_(pseudo_quantize(w * sw, bits, group_size) / sw)  # Q(W diag(s)) diag(s)^-1
            out = _first_output(block(x, **kwargs)).float()
            losses.append((r, float((out_float - out).pow(2).mean())))
    finally:
        for lin, w in zip(linears, saved):
            lin.weight.copy_(w)
    return losses


def search_scales(block: nn.Module, inputs: torch.Tensor, linears: Sequence[nn.Linear], qtype: QType | int = 4,
                  group_size: int = 128, n_grid: int = 20, duo_scaling: bool = False,
                  block_kwargs: dict | None = None) -> torch.Tensor:
    """AWQ's per-channel scales s (K,) for `linears`, which all read `inputs`, judged on block(inputs).

    Args:
        block: the module whose output the loss compares (the attention for q/k/v, the MLP for its first
            linear, or the linear itself).
        inputs: (..., K) what `block` and the linears read (a norm's output).
        linears: the nn.Linear modules to scale (their weights are restored afterwards).
    """
    losses = scale_grid_losses(block, inputs, linears, qtype, group_size, n_grid, duo_scaling, block_kwargs)
    r = min(losses, key=lambda rl: rl[1])[0]
    w_mean = _weight_mean(linears, group_size) if duo_scaling else None
    return scales_for_ratio(mean_abs(inputs), r, w_mean)


@torch.no_grad()
def apply_scale_(prev: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> nn.Module:
    """Fold s into the model, exactly: prev's output / s, each linear's columns * s. Returns prev (or its
    replacement: an activation becomes ScaledActivation(act, s), which the caller must put in the model).

    prev may be a norm (weight and bias / s), a linear (its LAST len(s) output rows and bias / s: for a fused
    q|k|v projection those are v's), or an activation module."""
    K = s.numel()
    if isinstance(prev, nn.Linear):
        prev.weight[-K:].div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias[-K:].div_(s.to(prev.bias.dtype))
    elif isinstance(prev, ScaledActivation):
        prev.scale.mul_(s.float())
    elif getattr(prev, "weight", None) is not None and prev.weight.shape == (K,):
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    elif not list(prev.parameters()):
        prev = ScaledActivation(prev, s)
    else:
        raise ValueError(f"cannot fold a scale into {type(prev).__name__}: a mapping's first module must be a norm, "
                         "a linear or an activation")
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
    return prev


class ScaledActivation(nn.Module):
    """act(x) / scale: how AWQ scales the input of a linear that follows a nonlinear activation (GELU)."""

    def __init__(self, act: nn.Module, scale: torch.Tensor) -> None:
        super().__init__()
        self.act = act
        self.register_buffer("scale", scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) / self.scale.to(x.dtype)


@torch.no_grad()
def search_clip(linear: nn.Linear, inputs: torch.Tensor, qtype: QType | int = 4, group_size: int = 128,
                n_grid: int = 20, max_shrink: float = 0.5, n_sample_token: int = 512) -> torch.Tensor:
    """AWQ's clipping thresholds, (N, G): per output row and group the max |w| that minimises the error of the
    group's partial dot products with the inputs, searched over max|w| * (1 - i / n_grid), i < n_grid * max_shrink."""
    bits = _bits_of(qtype)
    w = linear.weight.detach().float()
    N, K = w.shape
    gs = K if group_size == -1 else group_size
    _groups(w, group_size)
    x = inputs.detach().reshape(-1, K).float()
    x = x[:: max(1, x.shape[0] // n_sample_token)]  # every stride-th token, about n_sample_token of them
    G = K // gs
    xg = x.reshape(-1, G, gs).transpose(0, 1)  # (G, T, gs)
    best = torch.empty(N, G)
    batch = 256 if N % 256 == 0 else 64 if N % 64 == 0 else N
    for o in range(0, N, batch):
        wb = w[o:o + batch].reshape(-1, G, gs)  # (b, G, gs)
        absmax = wb.abs().amax(dim=-1, keepdim=True)  # (b, G, 1)
        # each group's partial dot products x_g . w_g for every token: (G, T, b)
        out_float = torch.bmm(xg, wb.permute(1, 2, 0))
        best_max, best_err = absmax.clone(), torch.full_like(absmax, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            m = absmax * (1 - i / n_grid)
            wq = pseudo_quantize(torch.clamp(wb, -m, m).reshape(-1, K), bits, group_size).reshape(wb.shape)
            err = (torch.bmm(xg, wq.permute(1, 2, 0)) - out_float).pow(2).mean(dim=1)  # (G, b): mean over tokens
            err = err.t()[:, :, None]  # (b, G, 1)
            better = err < best_err
            best_err, best_max = torch.where(better, err, best_err), torch.where(better, m, best_max)
        best[o:o + batch] = best_max.reshape(-1, G)
    return best


@torch.no_grad()
def apply_clip_(linear: nn.Linear, max_val: torch.Tensor) -> None:
    """Clamp each group of the weight to [-max_val, max_val] (max_val (N, G)), in place."""
    N, K = linear.weight.shape
    G = max_val.shape[1]
    w = linear.weight.reshape(N, G, K // G)
    m = max_val.to(w.dtype)[:, :, None]
    linear.weight.copy_(torch.maximum(torch.minimum(w, m), -m).reshape(N, K))


# ----------------------------------------------------------------------------- 2) the model walker
@dataclass
class AWQReport:
    """What apply did: the chosen exponent r and loss curve per mapping, and which linears were clipped."""

    ratios: dict[str, float] = field(default_factory=dict)
    losses: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    clipped: list[str] = field(default_factory=list)


class _Collect:
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> None:
        self.chunks.append(x.detach())  # (B, T, K): the attention needs its sequences whole

    @property
    def value(self) -> torch.Tensor:
        return torch.cat(self.chunks)


def _mappings(model: nn.Module, mappings: Sequence[Mapping] | None) -> list[Mapping]:
    if mappings is None:
        if not hasattr(model, "awq_mappings"):
            raise ValueError(f"{type(model).__name__} has no awq_mappings(); pass mappings=[(prev, (linear, ...), "
                             "inspect), ...], e.g. ('blocks.0.ln_1', ('blocks.0.attn.c_attn',), 'blocks.0.attn')")
        mappings = model.awq_mappings()
    modules = dict(model.named_modules())
    out = []
    for m in mappings:
        if len(m) != 3:
            raise ValueError(f"an AWQ mapping is (prev, linears, inspect), got {m!r}")
        prev, linears, inspect = m[0], (m[1],) if isinstance(m[1], str) else tuple(m[1]), m[2]
        missing = [n for n in (prev, *linears, inspect) if n not in modules]
        if missing:
            raise ValueError(f"AWQ mapping {m!r} names {missing}, which the model does not have")
        out.append((prev, linears, inspect))
    return out


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix):]


@torch.no_grad()
def apply(model: nn.Module, config: AWQConfig, calib_data: Iterable,
          search_scales_fn: Callable[..., torch.Tensor] | None = None, progress: bool = True) -> AWQReport:
    """Scale and clip every mapping of `model` block by block (in place); with config.quantize_weights,
    also swap the selected linears for weight-only modules with AWQ's group quantizer. Returns an AWQReport.

    search_scales_fn(block, inputs, linears, qtype=, group_size=, n_grid=, duo_scaling=) replaces
    `search_scales` (the lab passes a student's); its scales are checked before they are applied."""
    fn = search_scales_fn or search_scales
    calib_data = list(calib_data)
    _check_calibration_length(model, calib_data)
    mappings = _mappings(model, config.mappings)
    bits = config.bits
    was_training = model.training
    model.eval()
    report = AWQReport()
    try:
        blocks_name, blocks = transformer_blocks(model)
        inputs = _block_inputs(model, blocks, calib_data)
        for b in tqdm(range(len(blocks)), desc="AWQ", unit="block", disable=not progress):
            block, prefix = blocks[b], f"{blocks_name}.{b}."
            mine = [m for m in mappings if m[2].startswith(prefix) or m[2] == prefix[:-1]]
            lin_names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
            # 1) every linear's input features from the float block, and the float block's output (next inputs)
            outs = []
            with recording(block, lin_names, _Collect) as feats:
                for args, kwargs in inputs:
                    y = _first_output(block(*args, **kwargs))
                    outs.append(((y,) + tuple(args[1:]), kwargs))
            x_of = {n: feats[n].input.value for n in lin_names}
            # 2) scale search, mapping by mapping, folded into the model at once
            for prev, linears, inspect in mine:
                rel = [_relative(n, prefix) for n in linears]
                fcs = [block.get_submodule(n) for n in rel]
                x = x_of[rel[0]]
                judge = model.get_submodule(inspect)
                K = fcs[0].in_features
                s = fn(judge, x, fcs, qtype=bits, group_size=config.group_size, n_grid=config.n_grid,
                       duo_scaling=config.duo_scaling)
                if not isinstance(s, torch.Tensor) or s.shape != (K,) or not bool(torch.isfinite(s).all() and (s > 0).all()):
                    raise ValueError(f"search_scales_fn must return {K} finite positive scales for {linears}, got "
                                     f"{s if not isinstance(s, torch.Tensor) else (tuple(s.shape), s.dtype)}")
                if config.record_losses:  # the whole curve, for a plot
                    curve = scale_grid_losses(judge, x, fcs, bits, config.group_size, config.n_grid, config.duo_scaling)
                    report.losses[linears[0]] = curve
                    report.ratios[linears[0]] = min(curve, key=lambda rl: rl[1])[0]
                new_prev = apply_scale_(model.get_submodule(prev), fcs, s)
                if new_prev is not model.get_submodule(prev):
                    model.set_submodule(prev, new_prev)
                for n in rel:  # the cached inputs now meet scaled weights
                    x_of[n] = x_of[n] / s.to(x_of[n].dtype)
            # 3) clip search on every selected linear but q/k
            if config.clip:
                for rel in lin_names:
                    name = prefix + rel
                    if not config.selects(name) or any(fnmatch.fnmatchcase(name, p) for p in CLIP_SKIP):
                        continue
                    lin = block.get_submodule(rel)
                    apply_clip_(lin, search_clip(lin, x_of[rel], bits, config.group_size, config.n_grid,
                                                 config.max_shrink))
                    report.clipped.append(name)
            inputs = outs  # AWQ: the next block reads the FLOAT model's outputs
    finally:
        model.train(was_training)
    if config.quantize_weights:
        cls = Int4WeightOnlyLinear if bits == 4 else WeightOnlyLinear
        block_linears = [f"{blocks_name}.{b}.{n}" for b in range(len(blocks)) for n, m in blocks[b].named_modules()
                         if isinstance(m, nn.Linear)]
        swap_modules(model, QuantConfig(include=tuple(n for n in block_linears if config.selects(n))),
                     lambda name, m: cls.from_qtensor(to_qtensor(m.weight.detach().float(), bits, config.group_size),
                                                      m.bias))
    return report


# ----------------------------------------------------------------------------- 3) the config
@dataclass(frozen=True)
class AWQConfig(_GroupedWeightConfig):
    """AWQ on the linears of the model's transformer blocks: scale search, clip search, then (with
    quantize_weights=True) weight-only modules with AWQ's asymmetric group quantizer.

    quantize_weights=False only scales and clips (the float model is changed, no module swapped): put it
    before a GPTQConfig for AWQ+GPTQ, `[ql.AWQConfig(quantize_weights=False), ql.GPTQConfig()]`.
    mappings=None uses model.awq_mappings(). record_losses keeps each mapping's loss curve in the report.
    """

    n_grid: int = 20
    max_shrink: float = 0.5
    clip: bool = True
    duo_scaling: bool = False
    quantize_weights: bool = True
    record_losses: bool = False
    mappings: tuple[Mapping, ...] | None = None
    progress: bool = True  # a tqdm bar per block (False in the book's pages)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise ValueError(f"n_grid={self.n_grid!r} must be a positive integer (20 in llm-awq)")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"max_shrink={self.max_shrink!r} must be in [0, 1): the clip search tries ranges down to "
                             "(1 - max_shrink) of max|w|")

    @property
    def needs_calib_data(self) -> bool:
        return True


@register_handler(AWQConfig)
def _awq(model: nn.Module, config: AWQConfig, calib_data) -> nn.Module:
    apply(model, config, calib_data, progress=config.progress)
    return model


__all__ = ["quantize_codes", "pseudo_quantize", "to_qtensor", "mean_abs", "scales_for_ratio", "scale_grid_losses",
           "search_scales", "apply_scale_", "ScaledActivation", "search_clip", "apply_clip_", "apply", "AWQReport",
           "AWQConfig", "CLIP_SKIP"]
