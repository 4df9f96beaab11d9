"""BatchNorm folding: merge an inference-mode BatchNorm into the conv / linear layer before it.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", §3.2, https://arxiv.org/abs/1712.05877

In eval mode BatchNorm is a fixed per-channel affine map of the layer's output y = W x + b:

    BN(y)_c = gamma_c * (y_c - mean_c) / sqrt(var_c + eps) + beta_c = k_c * y_c + (beta_c - k_c * mean_c)

with k_c = gamma_c / sqrt(var_c + eps). So one layer with W'_c = k_c W_c and b'_c = k_c (b_c - mean_c) + beta_c
computes the same thing. Quantize *after* folding: the integer kernel sees the weights it will really use.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_bn(
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    bn_mean: torch.Tensor,
    bn_var: torch.Tensor,
    bn_gamma: torch.Tensor | None,
    bn_beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one layer equal to `layer` followed by eval-mode BatchNorm.

    Args:
        conv_weight: (C_out, ...) a conv weight (C_out, C_in, kh, kw) or a linear weight (C_out, C_in).
        conv_bias: (C_out,) or None (no bias).
        bn_mean, bn_var: (C_out,) BatchNorm running statistics.
        bn_gamma, bn_beta: (C_out,) BatchNorm affine parameters, or None (affine=False: 1 and 0).
        eps: BatchNorm's eps.
    Returns:
        w (C_out, ...) and b (C_out,).
    """
    c = conv_weight.shape[0]
    per_channel = {"bn_mean": bn_mean, "bn_var": bn_var, "bn_gamma": bn_gamma, "bn_beta": bn_beta, "conv_bias": conv_bias}
    for name, t in per_channel.items():
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but the layer has {c} output channels; "
                f"is this BatchNorm right after this layer?"
            )
    gamma = torch.ones_like(bn_mean) if bn_gamma is None else bn_gamma
    beta = torch.zeros_like(bn_mean) if bn_beta is None else bn_beta
    bias = torch.zeros_like(bn_mean) if conv_bias is None else conv_bias
    k = gamma / torch.sqrt(bn_var + eps)  # (C_out,)
    w = conv_weight * k.reshape(-1, *[1] * (conv_weight.dim() - 1))  # (C_out, ...): row c scaled by k_c
    b = k * (bias - bn_mean) + beta  # (C_out,)
    return w, b


def traced_graph(model: nn.Module, explicit_call: str) -> torch.fx.Graph:
    """The torch.fx graph of `model`; if it cannot be traced, a ValueError naming `explicit_call`,
    the way to pass the layer pairs by hand instead."""
    try:
        return torch.fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many types for untraceable Python control flow
        raise ValueError(
            f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}); "
            f"pass the pairs explicitly, e.g. {explicit_call}"
        ) from err


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, BatchNorm name) for every conv/linear whose only consumer is a BatchNorm, in forward order.

    Found by tracing the forward pass with torch.fx, so attribute names and nesting do not matter.
    """
    graph = traced_graph(model, "fold_batchnorm_(model, [('conv1', 'bn1'), ...])")
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        prev = node.args[0]
        if (
            isinstance(prev, torch.fx.Node)
            and prev.op == "call_module"
            and isinstance(modules[prev.target], FOLDABLE)
            and len(prev.users) == 1
        ):
            pairs.append((prev.target, node.target))
    return pairs


def fold_batchnorm_(model: nn.Module, pairs: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Fold each BatchNorm into the layer before it, in place; the BatchNorm becomes nn.Identity.

    Args:
        model: in eval mode (folding uses the running statistics, which only eval mode uses).
        pairs: [(layer name, BatchNorm name), ...]; default: `find_conv_bn_pairs(model)`.
    Returns:
        the pairs that were folded.
    """
    pairs = find_conv_bn_pairs(model) if pairs is None else list(pairs)
    modules = dict(model.named_modules())
    names = [n for pair in pairs for n in pair]
    if len(set(names)) != len(names):
        raise ValueError(f"each module may appear in one pair only; got {pairs}")
    for layer_name, bn_name in pairs:
        layer, bn = modules.get(layer_name), modules.get(bn_name)
        if not isinstance(layer, FOLDABLE) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"({layer_name!r}, {bn_name!r}) must name a Conv/Linear (not transposed: its output channels "
                f"are on weight axis 1) and a BatchNorm of the model; "
                f"found {type(layer).__name__} and {type(bn).__name__}. Discovered pairs: {find_conv_bn_pairs(model)}"
            )
        if bn.training or bn.running_mean is None:
            raise ValueError(
                f"{bn_name!r} must be in eval mode with running statistics: call model.eval() first "
                f"(folding bakes the running mean/var into the weights; training mode uses batch statistics)"
            )
    for layer_name, bn_name in pairs:
        layer, bn = modules[layer_name], modules[bn_name]
        with torch.no_grad():
            w, b = fold_bn(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
            layer.weight.copy_(w)
            if layer.bias is None:
                layer.bias = nn.Parameter(b.to(layer.weight.dtype))
            else:
                layer.bias.copy_(b)
        model.set_submodule(bn_name, nn.Identity())
    return pairs
