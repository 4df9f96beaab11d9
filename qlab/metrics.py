"""Error metrics between a reference tensor and its quantized approximation."""

from __future__ import annotations

import math

import torch

from .core.checks import check_finite


def _pair(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not isinstance(x_hat, torch.Tensor):
        raise ValueError("metrics take two torch tensors: the reference x and its approximation x_hat")
    if x.shape != x_hat.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but x_hat has shape {tuple(x_hat.shape)}; they must match")
    if x.numel() == 0:
        raise ValueError(f"x and x_hat are empty (shape {tuple(x.shape)}): an error over no elements is undefined; "
                         "pass the tensor you quantized and its approximation")
    check_finite(x, "x", "clean or mask the data (an error over NaN or Inf is NaN or Inf)")
    check_finite(x_hat, "x_hat", "the approximation is broken (check the scale it was made with); an error over "
                 "NaN or Inf is NaN or Inf")
    return x.detach().double(), x_hat.detach().double()


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error: mean((x - x_hat)^2)."""
    x, x_hat = _pair(x, x_hat)
    return float(((x - x_hat) ** 2).mean())


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10( sum x^2 / sum (x - x_hat)^2 ).

    Each extra bit of a uniform quantizer adds about 6.02 dB. Returns +inf when x_hat == x exactly.
    """
    x, x_hat = _pair(x, x_hat)
    noise = float(((x - x_hat) ** 2).sum())
    signal = float((x**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Cosine similarity of the two tensors, flattened (1.0 = same direction)."""
    x, x_hat = _pair(x, x_hat)
    a, b = x.reshape(-1), x_hat.reshape(-1)
    denom = float(a.norm() * b.norm())
    if denom == 0.0:
        return 1.0 if float(a.norm()) == float(b.norm()) else 0.0
    return float(a @ b) / denom
