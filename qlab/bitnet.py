"""BitNet b1.58: ternary weights {-1, 0, +1} with one absmean scale, 8-bit per-token activations.

Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", https://arxiv.org/abs/2402.17764
(building on Wang et al. 2023, "BitNet", https://arxiv.org/abs/2310.11453)

    1) gamma  = mean |W|, clamped at 1e-5                         one scale per weight tensor
    2) W_t    = clamp(round(W * (1 / gamma)), -1, 1)              ternary codes: |w| < gamma / 2 becomes 0
    3) s_x    = 127 / max |x| per token, clamped at 1e-5 below    8-bit absmax activations
    4) x_q    = clamp(round(x * s_x), -128, 127)
    5) y      = (x_q @ W_t^T) / (s_x * (1 / gamma))               an exact integer GEMM, then one rescale

Conventions of Hugging Face's BitNet integration (`transformers.integrations.bitnet`, `WeightQuant`, `ActQuant`,
`pack_weights`), reproduced and tested against it: the scales are multiplied as reciprocals (`x * (127 / amax)`,
`W * (1 / gamma)`), `round` is half to even, and the 2-bit storage holds w + 1 in {0, 1, 2} with the output rows
STRIDED: byte b of packed row r holds rows r, r + R, r + 2R, r + 3R (R = ceil(out / 4)) at bits 0, 2, 4, 6.

Training keeps latent full-precision weights and rounds them in every forward with the straight-through estimator
(`BitLinear`): gradients reach the latent weights as if rounding were the identity, so the trained latent weights
are NOT ternary; only `convert_` (or `TernaryLinear.from_bitlinear`) makes them so. The paper's models put an
RMSNorm inside BitLinear; qlab's tiny GPT already normalises before attention and MLP, so BitLinear does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .api import QuantConfig, register_handler, register_quantized_module, swap_modules

EPS = 1e-5


# ----------------------------------------------------------------------------- 1) the math
def weight_quant(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-2: (ternary int8 codes of W's shape, gamma = mean |W| as a float32 0-d tensor)."""
    W = W.float()
    gamma = W.abs().mean().clamp(min=EPS)
    codes = (W * (1.0 / gamma)).round().clamp(-1, 1).to(torch.int8)
    return codes, gamma


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-4: (int8 codes of x's shape, s_x (..., 1) float32) with one absmax scale per token (last dim)."""
    x = x.float()
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * s).round().clamp(-128, 127).to(torch.int8), s


def fake_quant_weight(W: torch.Tensor) -> torch.Tensor:
    """W_t * gamma in W's dtype, with the straight-through estimator: the gradient passes unchanged."""
    codes, gamma = weight_quant(W.detach())
    return W + (codes.float() * gamma).to(W.dtype) - W.detach()


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """x_q / s_x in x's dtype, with the straight-through estimator."""
    codes, s = act_quant(x.detach())
    return x + (codes.float() / s).to(x.dtype) - x.detach()


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """2-bit storage of ternary codes (N, K), Hugging Face's strided layout: (ceil(N / 4), K) uint8."""
    if codes.dim() != 2 or codes.dtype != torch.int8 or bool(((codes < -1) | (codes > 1)).any()):
        raise ValueError("pack_ternary takes (out_features, in_features) int8 codes in {-1, 0, 1} (weight_quant's)")
    N, K = codes.shape
    R = -(-N // 4)  # packed rows
    padded = torch.nn.functional.pad((codes + 1).to(torch.uint8), (0, 0, 0, 4 * R - N))  # (4R, K), w + 1 in {0, 1, 2}
    packed = torch.zeros(R, K, dtype=torch.uint8, device=codes.device)
    for i in range(4):  # rows i*R .. (i+1)*R - 1 go to bits 2i, 2i + 1
        packed |= padded[i * R:(i + 1) * R] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of `pack_ternary`: int8 codes (out_features, K)."""
    R = packed.shape[0]
    if not 4 * (R - 1) < out_features <= 4 * R:
        raise ValueError(f"{R} packed rows hold {4 * R - 3}..{4 * R} output rows, not {out_features}")
    rows = [((packed >> (2 * i)) & 3) for i in range(4)]  # each (R, K)
    return (torch.cat(rows)[:out_features].to(torch.int8) - 1)


# ----------------------------------------------------------------------------- 2) the layers
@register_quantized_module  # a BitLinear is already BitNet's: other configs leave it alone
class BitLinear(nn.Linear):
    """nn.Linear trained as BitNet b1.58: latent float weights, ternary weights and 8-bit activations in the
    forward pass (straight-through estimator), so `y = linear(fake_quant_act(x), fake_quant_weight(W)) + b`."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BitLinear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(fake_quant_act(x), fake_quant_weight(self.weight), self.bias)


@register_quantized_module
class TernaryLinear(nn.Module):
    """Inference layer of BitNet b1.58: 2-bit packed ternary weights and one scale, 8-bit activations, an exact
    integer GEMM through the kernel registry (`int_mm`), then one rescale (step 5).

    Buffers: weight_packed (ceil(N / 4), K) uint8, weight_scale () float32 (gamma), bias (N,) float32 or None.
    """

    def __init__(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor, out_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, weight_packed.shape[1]
        unpack_ternary(weight_packed, out_features)  # checks the shapes
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("weight_scale", weight_scale.float().reshape(()))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> TernaryLinear:
        """Ternarize a (trained BitLinear's or any) linear weight: the latent weights become codes for good."""
        codes, gamma = weight_quant(linear.weight.detach())
        return cls(pack_ternary(codes), gamma, linear.out_features, linear.bias)

    def codes(self) -> torch.Tensor:
        return unpack_ternary(self.weight_packed, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        x_q, s = act_quant(x2)  # (M, K) int8, (M, 1)
        acc = kernels.call("int_mm", x_q, self.codes().t())  # (M, N) int32, exact
        y = acc.float() * (self.weight_scale / s)  # step 5: x_q W_t / (s_x / gamma)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @property
    def packed_nbytes(self) -> int:
        """Stored bytes of the weight: 2 bits per weight plus the float32 scale."""
        return self.weight_packed.numel() + 4

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ternary (2-bit packed)"


# ----------------------------------------------------------------------------- 3) model glue and config
def convert_(model: nn.Module) -> nn.Module:
    """Replace every BitLinear of a (fine-tuned) model by a TernaryLinear, in place: the inference model."""
    names = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    if not names:
        raise ValueError("the model has no BitLinear layers; train one first with ql.quantize_(model, ql.BitNetConfig())")
    for name in names:
        model.set_submodule(name, TernaryLinear.from_linear(model.get_submodule(name)))
    return model


@dataclass(frozen=True)
class BitNetConfig(QuantConfig):
    """Swap the selected nn.Linear layers for BitLinear (quantization-aware training to b1.58); with
    ternarize=True, straight to TernaryLinear (post-training ternarization, usually far worse)."""

    ternarize: bool = False


@register_handler(BitNetConfig)
def _bitnet(model: nn.Module, config: BitNetConfig, calib_data) -> nn.Module:
    make = TernaryLinear.from_linear if config.ternarize else BitLinear.from_linear
    swap_modules(model, config, lambda name, linear: make(linear))
    return model


__all__ = ["EPS", "weight_quant", "act_quant", "fake_quant_weight", "fake_quant_act", "pack_ternary", "unpack_ternary",
           "BitLinear", "TernaryLinear", "convert_", "BitNetConfig"]
