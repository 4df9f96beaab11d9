"""Empirical bias correction: remove the shift in each layer's mean output that quantization introduces.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction", §4.2,
https://arxiv.org/abs/1906.04721

Quantization error is often biased: E[W_q x] != E[W x], so every output channel drifts by a constant
that the next layers amplify. With calibration data the drift can be measured and cancelled:

    eps = E[y_q] - E[y]        per output channel, over the calibration data
    b_q <- b_q - eps

where y is the FP model's output of the layer and y_q the quantized model's (on its own, already
quantized, inputs: the correction also absorbs the error of the layers before). Layers are corrected
one at a time, in order, so each sees the corrected layers before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .calibration import _check_names, _first_tensor, _run, forward_hooks


def channel_axis(layer: nn.Module) -> int:
    """Axis of the output channels in a layer's output: 1 for a conv (B, C, ...), -1 for a linear (..., C).

    qlab's quantized layers count as what they replace: QuantConv2d as a conv; QuantLinear and the
    weight-only linears as linears.
    """
    from .nn import QuantConv2d, QuantLinear, WeightOnlyLinear

    if isinstance(layer, (nn.modules.conv._ConvNd, QuantConv2d)):
        return 1
    if isinstance(layer, (nn.Linear, QuantLinear, WeightOnlyLinear)):
        return -1
    raise ValueError(f"bias correction needs a Conv or Linear layer (a bias per output channel), got {type(layer).__name__}")


def channel_mean(y: torch.Tensor, axis: int) -> torch.Tensor:
    """Mean of `y` over every axis but `axis`: (C,)."""
    return y.movedim(axis, 0).flatten(1).double().mean(dim=1)


def bias_correction_term(y_fp: torch.Tensor, y_q: torch.Tensor, axis: int) -> torch.Tensor:
    """eps = E[y_q] - E[y_fp] per output channel (C,): what to subtract from the quantized layer's bias."""
    if y_fp.shape != y_q.shape:
        raise ValueError(f"y_fp has shape {tuple(y_fp.shape)} but y_q has {tuple(y_q.shape)}; run both on the same inputs")
    return (channel_mean(y_q, axis) - channel_mean(y_fp, axis)).float()


def _mean_output(model: nn.Module, name: str, batches: Sequence, axis: int) -> torch.Tensor:
    """E[output of module `name`] per channel over all calibration batches (weighted by element count)."""
    total, count = None, 0

    def hook(module: nn.Module, args: tuple, output) -> None:
        nonlocal total, count
        y = _first_tensor(output, name, "output").detach()
        n = y.numel() // y.shape[axis]  # elements per channel in this batch
        total = channel_mean(y, axis) * n + (0 if total is None else total)  # (C,)
        count += n

    with forward_hooks(model, {name: hook}):
        _run(model, batches, desc=name, progress=False)
    return total / count


def bias_correction_(
    fp_model: nn.Module,
    q_model: nn.Module,
    calib_batches: Iterable,
    layer_names: Sequence[str],
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Correct the bias of each named layer of `q_model` so its mean output matches `fp_model`'s, in place.

    Args:
        fp_model: the full-precision reference (not modified).
        q_model: the same architecture with quantized (or fake-quantized) layers; its layers get a bias
            if they had none.
        calib_batches: a few representative inputs (tensors, or tuples of arguments).
        layer_names: the Conv/Linear layers to correct, in forward order.
    Returns:
        {name: eps (C,)}: the correction subtracted from each layer's bias.
    """
    batches = list(calib_batches)
    if not batches:
        raise ValueError("calib_batches is empty; bias correction measures means on a few calibration batches")
    fp_layers = _check_names(fp_model, layer_names)
    q_layers = _check_names(q_model, layer_names)
    corrections = {}
    for name in tqdm(layer_names, desc="bias correction", disable=not progress, leave=False):
        layer = q_layers[name]
        axis = channel_axis(layer)
        if channel_axis(fp_layers[name]) != axis:
            raise ValueError(
                f"{name!r} is a {type(fp_layers[name]).__name__} in fp_model but a {type(layer).__name__} in q_model"
            )
        # 1) E[y] and E[y_q] per output channel, each model on its own inputs
        mean_fp = _mean_output(fp_model, name, batches, axis)  # (C,)
        mean_q = _mean_output(q_model, name, batches, axis)  # (C,)
        # 2) subtract the drift from the quantized layer's bias
        eps = (mean_q - mean_fp).float()  # (C,)
        with torch.no_grad():
            if layer.bias is None:
                zeros = torch.zeros_like(eps, device=eps.device)
                if "bias" in layer._buffers:  # qlab's quantized layers keep the bias as a float buffer
                    layer.bias = zeros
                else:
                    layer.bias = nn.Parameter(zeros.to(layer.weight.dtype))
            layer.bias -= eps.to(layer.bias.dtype).to(layer.bias.device)
        corrections[name] = eps
    return corrections
