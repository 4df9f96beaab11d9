"""Per-layer sensitivity analysis and mixed-precision assignment under a size budget.

Dong et al. 2019, "HAWQ: Hessian AWare Quantization of Neural Networks with Mixed-Precision",
https://arxiv.org/abs/1905.03696, ranks layers by a Hessian-based sensitivity; here we use the simplest
empirical measure, the one most PTQ toolkits report first:

    sensitivity(layer) = metric(FP model) - metric(model with only `layer` quantized)

Layers that cost little to keep at high precision and hurt most when quantized should stay wide:
`assign_mixed_precision` starts every layer at the lowest bit width and upgrades layers greedily by
sensitivity per extra byte until the budget is spent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .calibration import _check_names, layer_names as _default_layer_names
from .core.granularity import Granularity, PerChannel
from .core.primitives import fake_quantize
from .core.qtypes import QType, int4


def fake_quantize_weight_(
    module: nn.Module, qtype: QType = int4, granularity: Granularity = PerChannel(axis=0), symmetric: bool = True
) -> None:
    """Replace `module.weight` by its fake-quantized values (ql.fake_quantize), in place."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no weight tensor to quantize; pick Linear / Conv layers")
    with torch.no_grad():
        weight.copy_(fake_quantize(weight, qtype, granularity, symmetric))


def layer_sensitivity(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], float],
    quantize_layer_fn: Callable[[nn.Module], None] = fake_quantize_weight_,
    layer_names: Sequence[str] | None = None,
    higher_is_better: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """How much the metric drops when one layer at a time is quantized (the model is restored after each).

    eval_fn runs under torch.no_grad().

    Args:
        eval_fn: model -> metric, e.g. `lambda m: ql.eval.accuracy(m, x_val, y_val)`.
        quantize_layer_fn: mutates one module in place; default int4 per-channel weight fake quantization.
            For another setting: `lambda m: fake_quantize_weight_(m, ql.int8, ql.PerTensor())`.
        layer_names: the layers to test (default: every Linear and Conv2d).
        higher_is_better: False for a loss or perplexity (the drop is then quantized - FP).
    Returns:
        {layer name: drop}; larger means more sensitive. Noise can make a drop slightly negative.
    """
    names = list(layer_names) if layer_names is not None else _default_layer_names(model)
    modules = _check_names(model, names)
    sign = 1.0 if higher_is_better else -1.0
    drops = {}
    with torch.no_grad():
        baseline = float(eval_fn(model))
        for name in tqdm(names, desc="sensitivity", disable=not progress, leave=False):
            saved = {k: v.detach().clone() for k, v in modules[name].state_dict().items()}
            try:
                quantize_layer_fn(modules[name])
                drops[name] = sign * (baseline - float(eval_fn(model)))
            finally:
                modules[name].load_state_dict(saved)
    return drops


def assign_mixed_precision(
    sensitivity: Mapping[str, float],
    layer_sizes: Mapping[str, int],
    bit_options: Sequence[int] = (8, 4),
    *,
    budget_bytes: float,
) -> dict[str, int]:
    """Bits per layer: the most sensitive layers (per byte) at higher precision, total size <= budget_bytes.

    Greedy:
      1) every layer starts at the lowest bit width (an error if even that exceeds the budget);
      2) layers are visited by sensitivity / (extra bytes to reach the highest bit width), largest first;
      3) each gets the highest bit width that still fits the remaining budget.
    A layer of n weights at b bits takes n * b / 8 bytes (scales and zero points are not counted).

    Args:
        sensitivity: {name: metric drop when the layer is quantized}, e.g. from `layer_sensitivity`.
        layer_sizes: {name: number of weights}, e.g. {n: m.weight.numel() for n, m in ...}.
        bit_options: the allowed bit widths, e.g. (8, 4).
        budget_bytes: the largest total weight size allowed.
    """
    if set(sensitivity) != set(layer_sizes):
        raise ValueError(
            f"sensitivity and layer_sizes must name the same layers; only in one of them: "
            f"{sorted(set(sensitivity) ^ set(layer_sizes))}"
        )
    if not bit_options or not all(isinstance(b, int) and b > 0 for b in bit_options):
        raise ValueError(f"bit_options={bit_options!r} must be positive integers, e.g. (8, 4)")
    if any(n <= 0 for n in layer_sizes.values()):
        raise ValueError("layer_sizes must be positive numbers of weights")
    bits_desc = sorted(set(bit_options), reverse=True)
    lowest, highest = bits_desc[-1], bits_desc[0]

    def nbytes(name: str, bits: int) -> float:
        return layer_sizes[name] * bits / 8

    # 1) everything at the lowest precision
    assignment = {name: lowest for name in layer_sizes}
    used = sum(nbytes(n, lowest) for n in layer_sizes)
    if used > budget_bytes:
        raise ValueError(
            f"budget_bytes={budget_bytes:g} is smaller than every layer at {lowest} bits ({used:g} bytes); "
            f"raise the budget to at least {used:g} or allow fewer bits"
        )
    # 2) most sensitivity per extra byte first (ties: by name, so the result is deterministic)
    def benefit(name: str) -> float:
        extra = nbytes(name, highest) - nbytes(name, lowest)
        return sensitivity[name] / extra if extra > 0 else 0.0

    for name in sorted(layer_sizes, key=lambda n: (-benefit(n), n)):
        # 3) the highest precision that still fits
        for bits in bits_desc:
            extra = nbytes(name, bits) - nbytes(name, assignment[name])
            if bits > assignment[name] and used + extra <= budget_bytes:
                assignment[name] = bits
                used += extra
                break
    return assignment
