"""Cross-layer equalization (CLE): rescale channels between two layers so per-tensor weight quantization fits both.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction", §4.1,
https://arxiv.org/abs/1906.04721

ReLU is positively homogeneous: relu(x / s) = relu(x) / s for s > 0. So for two layers joined by a ReLU
(or pooling, or nothing), dividing output channel i of layer 1 by s_i and multiplying input channel i of
layer 2 by s_i leaves the network's function unchanged:

    y = W2 relu(W1 x + b1) = (W2 S) relu(S^-1 W1 x + S^-1 b1)          S = diag(s)

If r1_i is the range of output channel i of W1 and r2_i the range of input channel i of W2, the choice

    s_i = (1 / r2_i) sqrt(r1_i r2_i) = sqrt(r1_i / r2_i)

gives both channels the same range sqrt(r1_i r2_i) (the paper's eq. 11), which maximises the total
per-channel precision of the two layers under per-tensor quantization. With BatchNorm, fold it first
(`qlab.bn_folding`): a BatchNorm between the layers is not positively homogeneous per channel.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .bn_folding import traced_graph

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# ops f with f(x / s) = f(x) / s for a positive per-channel s: CLE may look through them
EQUIVARIANT_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Flatten,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
EQUIVARIANT_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu, torch.flatten, F.max_pool2d, F.avg_pool2d)
EQUIVARIANT_METHODS = ("relu", "flatten")


def equalization_scales(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """s_i = (1 / r2_i) sqrt(r1_i r2_i): the per-channel scales that equalize two consecutive layers.

    Args:
        w1: (C, ...) weight of layer 1; r1_i = max |w1[i]| (output channel i).
        w2: (C_out2, C, ...) weight of layer 2; r2_i = max |w2[:, i]| (input channel i).
    Returns:
        s: (C,) positive; 1 where a channel is all zero in either layer (nothing to balance).
    """
    if w1.shape[0] != w2.shape[1]:
        raise ValueError(
            f"layer 1 has {w1.shape[0]} output channels but layer 2 has {w2.shape[1]} input channels; "
            f"CLE needs consecutive layers (grouped / depthwise convs are not supported)"
        )
    r1 = w1.detach().abs().flatten(1).amax(dim=1)  # (C,) range of output channel i of layer 1
    r2 = w2.detach().abs().transpose(0, 1).flatten(1).amax(dim=1)  # (C,) range of input channel i of layer 2
    s = (1 / r2) * torch.sqrt(r1 * r2)  # eq. 11
    return torch.where((r1 > 0) & (r2 > 0), s, torch.ones_like(s))


def rescale_pair(
    w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """W1' = S^-1 W1, b1' = S^-1 b1, W2' = W2 S: the same function, with channel i moved by s_i.

    Shapes: w1 (C, ...), b1 (C,) or None, w2 (C_out2, C, ...), s (C,).
    """
    if not bool((s > 0).all()):
        raise ValueError("scales must be positive: relu(x / s) = relu(x) / s holds only for s > 0")
    w1 = w1 / s.reshape(-1, *[1] * (w1.dim() - 1))  # (C, ...)
    b1 = None if b1 is None else b1 / s  # (C,)
    w2 = w2 * s.reshape(1, -1, *[1] * (w2.dim() - 2))  # (C_out2, C, ...)
    return w1, b1, w2


def _is_equivariant(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], EQUIVARIANT_MODULES)
    if node.op == "call_function":
        return node.target in EQUIVARIANT_FUNCTIONS
    return node.op == "call_method" and node.target in EQUIVARIANT_METHODS


def _groups(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def find_equalization_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer 1, layer 2) names of consecutive conv/linear layers joined only by ReLU / pooling / flatten.

    Traced with torch.fx; every tensor on the path must have exactly one consumer (no residual branch).
    """
    graph = traced_graph(model, "equalize_(model, [('conv1', 'conv2'), ...])")
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], LAYERS):
            continue
        prev = node.args[0]
        while isinstance(prev, torch.fx.Node) and _is_equivariant(prev, modules) and len(prev.users) == 1:
            prev = prev.args[0]
        if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        layer1, layer2 = modules[prev.target], modules[node.target]
        if (
            isinstance(layer1, LAYERS)
            and _groups(layer1) == 1 == _groups(layer2)
            and layer1.weight.shape[0] == layer2.weight.shape[1]
        ):
            pairs.append((prev.target, node.target))
    return pairs


def equalize_(
    model: nn.Module, pairs: list[tuple[str, str]] | None = None, iterations: int = 20
) -> list[tuple[str, str]]:
    """Cross-layer equalize every pair in place, sweeping over all pairs `iterations` times.

    A layer in the middle of a chain (conv1 -> conv2 -> conv3) belongs to two pairs, so one sweep does not
    settle it; the paper repeats until the scales stop changing (here: at most `iterations` sweeps, stopping
    early once every s_i is within 1e-6 of 1).

    Args:
        pairs: [(layer 1 name, layer 2 name), ...]; default `find_equalization_pairs(model)`.
            Fold BatchNorm first: a BatchNorm between the two layers breaks the equivalence.
    Returns:
        the pairs that were equalized.
    """
    if iterations < 1:
        raise ValueError(f"iterations={iterations} must be >= 1 (20 is plenty for a small CNN)")
    pairs = find_equalization_pairs(model) if pairs is None else list(pairs)
    modules = dict(model.named_modules())
    for name1, name2 in pairs:
        layer1, layer2 = modules.get(name1), modules.get(name2)
        if not isinstance(layer1, LAYERS) or not isinstance(layer2, LAYERS):
            raise ValueError(
                f"({name1!r}, {name2!r}) must name two Conv/Linear layers; found "
                f"{type(layer1).__name__} and {type(layer2).__name__}. Discovered pairs: {find_equalization_pairs(model)}"
            )
        if _groups(layer1) != 1 or _groups(layer2) != 1:
            raise ValueError(f"({name1!r}, {name2!r}): grouped / depthwise convs are not supported by equalize_")
    with torch.no_grad():
        for _ in range(iterations):
            largest_change = 0.0
            for name1, name2 in pairs:
                layer1, layer2 = modules[name1], modules[name2]
                s = equalization_scales(layer1.weight, layer2.weight)  # (C,)
                w1, b1, w2 = rescale_pair(layer1.weight, layer1.bias, layer2.weight, s)
                layer1.weight.copy_(w1)
                layer2.weight.copy_(w2)
                if b1 is not None:
                    layer1.bias.copy_(b1)
                largest_change = max(largest_change, float((s - 1).abs().max()))
            if largest_change < 1e-6:
                break
    return pairs
