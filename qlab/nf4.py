"""QLoRA's 4-bit block formats: NF4 and FP4 codes with one absmax per block, and double quantization.

Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
https://arxiv.org/abs/2305.14314

A weight is flattened (row-major) and cut into blocks of `group_size` values (bitsandbytes' "blocksize":
32, 64, ..., 4096; the last block may be shorter and has its own absmax). Each value becomes the index of
the nearest of 16 levels of a codebook normalised to [-1, 1]:

    1) absmax_b = max |w| over block b                                    (float32, one per block)
    2) w_norm   = clamp(w * (1 / absmax_b), -1, 1)                         (the short tail block divides: w / absmax)
    3) code     = the index of the nearest level; a value exactly half-way goes to the LOWER level
    4) w_hat    = level[code] * absmax_b

Conventions of bitsandbytes 0.50, reproduced bit for bit (tests/test_nf4.py runs bitsandbytes on CPU):
- Packing: two codes per byte, the FIRST element in the HIGH nibble, `byte = (q[2i] << 4) | q[2i+1]`; an odd
  count is padded with the value 0 (then coded like any other value). This is the opposite of qlab's own `ql.pack` (first element in the low
  nibble, the order AutoGPTQ uses): a 4-bit block format and an integer grid are stored by different tools.
- NF4's 16 levels are `NF4_LEVELS` (`ql.nf4_codebook()`'s normal quantiles as bitsandbytes rounds them, exact 0, 7 negative and 8 positive levels);
  FP4 is E2M1 without Inf/NaN, its levels in bit-pattern order (bit 3 = sign), max 12 normalised to 1.
- The absmax of a full all-zero block is stored as 0 (its values dequantize to 0); the tail block's absmax
  is clamped to 1e-38 before it is used and stored.
- bitsandbytes' `Linear4bit` and HF's `BitsAndBytesConfig` default to FP4; qlab's `NF4Config` defaults to
  NF4, the type QLoRA recommends.

Double quantization (QLoRA section 3, "DQ") quantizes the float32 absmax values themselves:

    5) offset  = mean(absmax)                                              (one float32)
    6) the centred values absmax - offset, in blocks of 256, get an absmax of their own (float32) and are
       coded in 8 bits with the signed dynamic ("tree") map of bitsandbytes (`dynamic_map()`)
    7) absmax  = level8[code8] * nested_absmax + offset

Storage per weight: 4 + 32/64 = 4.5 bits with blocks of 64, 4 + 8/64 + 32/(64*256) = 4.127 with DQ.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .api import QuantConfig, register_handler, register_quantized_module, swap_modules

QUANT_TYPES = ("nf4", "fp4")
# NF4's levels as bitsandbytes stores them (and QLoRA's appendix prints them). `ql.nf4_codebook()` computes them
# from normal quantiles; it agrees to within 2e-7 (a float32 ulp or two: tests/test_nf4.py), but a value near a
# midpoint could round differently, so the codes use this table.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' kernels accept
NESTED_BLOCK_SIZE = 256  # double quantization's block (the only one bitsandbytes' fused kernels take)


# ----------------------------------------------------------------------------- 1) the codebooks
def codebook(quant_type: str) -> torch.Tensor:
    """The 16 levels of `quant_type` in code order (index = the 4-bit code), float32 in [-1, 1]."""
    if quant_type == "nf4":
        return NF4_LEVELS.clone()  # ascending: code i is the i-th smallest level
    if quant_type == "fp4":
        # E2M1 without Inf/NaN, bit pattern s e1 e0 m: exponent 0 is subnormal (0 and 0.0625 after bitsandbytes'
        # scaling), then 2, 4, 8 with a half step of mantissa; divided by the largest magnitude, 12.
        magnitudes = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
        return torch.cat([magnitudes, -magnitudes]) / 12.0
    raise ValueError(f"quant_type={quant_type!r} is not a 4-bit block format; use one of {QUANT_TYPES}")


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 levels, ascending): for the decimal exponents
    e = -6 .. 0, the 2**(e + 6) midpoints of an even split of [0.1, 1], times 10**e, with both signs;
    plus 0 and 1. Small magnitudes get few levels, large ones many: a float with a decimal exponent."""
    levels = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)  # float32, as bitsandbytes computes them
        middles = (edges[:-1] + edges[1:]) / 2.0
        for sign in (1, -1):
            levels += (sign * 10.0 ** (i - 6) * middles).tolist()
    return torch.tensor(sorted(levels))


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index into `levels` (any order) of the level nearest to each x; a tie goes to the lower level.

    Sorted, the levels split the line at their midpoints; `bucketize` (right=False) puts a value equal to a
    midpoint in the bucket below it.
    """
    sorted_levels, order = torch.sort(levels, stable=True)
    midpoints = (sorted_levels[:-1] + sorted_levels[1:]) / 2
    return order[torch.bucketize(x, midpoints)]


@functools.lru_cache(maxsize=None)
def import_bitsandbytes():
    """The `bitsandbytes` package if it is installed, else None, imported quietly (once): on CPUs with AVX-512
    BF16 its import logs a notice about an optional kernel package, and it touches deprecated torch APIs."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import bitsandbytes
            import bitsandbytes.functional  # noqa: F401
        except ImportError:
            return None
    return bitsandbytes


# ----------------------------------------------------------------------------- 2) one tensor
@dataclass
class Tensor4bit:
    """A tensor in a 4-bit block format (bitsandbytes' layout, see the module doc).

    Attributes:
        qdata: uint8 ((numel + 1) // 2,): two codes per byte, the first element in the high nibble.
        absmax: float32 (blocks,), or with double quantization the uint8 (blocks,) codes of absmax - offset.
        quant_type: "nf4" or "fp4"; group_size: values per block; shape, dtype: the original tensor's.
        offset: the mean absmax subtracted before double quantization (None without it).
        nested_absmax: float32 (ceil(blocks / 256),): the absmax of each block of 256 centred absmax values.
    """

    qdata: torch.Tensor
    absmax: torch.Tensor
    quant_type: str
    group_size: int
    shape: torch.Size
    dtype: torch.dtype = torch.float32
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (decoded first with double quantization: step 7)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise(self.absmax, self.nested_absmax, NESTED_BLOCK_SIZE) + self.offset

    def codes(self) -> torch.Tensor:
        """The 4-bit codes, one uint8 per element, in the original shape."""
        high, low = self.qdata >> 4, self.qdata & 0xF
        return torch.stack([high, low], dim=1).reshape(-1)[: math.prod(self.shape)].reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        """w_hat = level[code] * absmax of its block, computed in float32, returned in the original dtype."""
        n, blocks = math.prod(self.shape), self.absmax.numel()
        levels = codebook(self.quant_type).to(self.qdata.device)
        pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)  # (256, 2): a byte's 2 values
        # one 8-byte lookup per byte (both float32 values at once, high nibble first), then view them as float32
        values = pairs.view(torch.float64).reshape(256).index_select(0, self.qdata.int()).view(torch.float32)
        if values.numel() != blocks * self.group_size:  # a short tail block, or the pad of an odd count
            values = torch.nn.functional.pad(values[:n], (0, blocks * self.group_size - n))
        w_hat = values.view(blocks, self.group_size).mul_(self.block_absmax()[:, None])  # (blocks, group_size)
        return w_hat.reshape(-1)[:n].reshape(self.shape).to(self.dtype)

    def to(self, device: torch.device | str) -> Tensor4bit:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Tensor4bit(self.qdata.to(device), self.absmax.to(device), self.quant_type, self.group_size, self.shape,
                          self.dtype, move(self.offset), move(self.nested_absmax))

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes, absmax (uint8 codes with DQ), the nested absmax and the offset."""
        extra = 0 if not self.double_quant else self.nested_absmax.numel() * 4 + 4
        return self.qdata.numel() + self.absmax.numel() * self.absmax.element_size() + extra

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / math.prod(self.shape)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"Tensor4bit({self.quant_type}, shape={tuple(self.shape)}, group_size={self.group_size}{dq}, "
                f"{self.bits_per_param:.3f} bits/param)")


def _check(w: torch.Tensor, quant_type: str, group_size: int) -> None:
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"quantize_4bit takes a float32, float16 or bfloat16 tensor, got {got}")
    codebook(quant_type)
    if group_size not in BLOCK_SIZES:
        raise ValueError(f"group_size={group_size!r} is not a block size bitsandbytes supports; use one of {BLOCK_SIZES} "
                         "(64 is QLoRA's)")
    if w.numel() == 0:
        raise ValueError("quantize_4bit got an empty tensor")
    if not torch.isfinite(w).all():
        raise ValueError("the tensor holds NaN or Inf: its block absmax would be too; clean the weights first")


def _block_absmax_and_normalise(flat: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-2 over a flat float32 tensor: (absmax (blocks,), normalised values (n,))."""
    n = flat.numel()
    full = n - n % group_size
    blocks = flat[:full].reshape(-1, group_size)  # (full blocks, group_size)
    absmax = blocks.abs().amax(dim=1)
    normalised = [torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)]
    if full < n:  # the tail block: bitsandbytes divides here, and keeps the clamped absmax
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        normalised.append(torch.clamp(flat[full:] / tail_absmax, -1, 1))
    return absmax, torch.cat(normalised)


def quantize_blockwise(x: torch.Tensor, group_size: int = NESTED_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the dynamic map (step 6): (uint8 codes (n,), float32 absmax (blocks,))."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % group_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, group_size)  # zeros never raise an absmax
    absmax = blocks.abs().amax(dim=1)
    normalised = (blocks / absmax.clamp(min=1e-38)[:, None]).reshape(-1)[:n]
    return nearest_level(normalised, dynamic_map()).to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, group_size: int = NESTED_BLOCK_SIZE) -> torch.Tensor:
    """Inverse of `quantize_blockwise`: level8[code] * absmax of its block, float32 (n,)."""
    values = dynamic_map().to(codes.device)[codes.long()]
    return values * absmax.repeat_interleave(group_size)[: values.numel()]


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", group_size: int = 64,
                  double_quant: bool = False) -> Tensor4bit:
    """NF4 / FP4 block quantization of `w` (any shape), steps 1-4 and, with double_quant, 5-7.

    Bit-exact with `bitsandbytes.functional.quantize_4bit(w, blocksize=group_size, quant_type=quant_type,
    compress_statistics=double_quant)`: the same packed bytes, absmax, offset and nested absmax.
    """
    _check(w, quant_type, group_size)
    absmax, normalised = _block_absmax_and_normalise(w.reshape(-1).float(), group_size)  # 1) 2)
    if normalised.numel() % 2:  # an odd count is padded with the VALUE 0 (NF4's code 7, FP4's code 0)
        normalised = torch.cat([normalised, normalised.new_zeros(1)])
    q = nearest_level(normalised, codebook(quant_type).to(w.device)).to(torch.uint8)  # 3)
    qdata = (q[0::2] << 4) | q[1::2]  # first element in the high nibble
    if not double_quant:
        return Tensor4bit(qdata, absmax, quant_type, group_size, w.shape, w.dtype)
    offset = absmax.mean()  # 5)
    codes8, nested = quantize_blockwise(absmax - offset, NESTED_BLOCK_SIZE)  # 6)
    return Tensor4bit(qdata, codes8, quant_type, group_size, w.shape, w.dtype, offset, nested)


def dequantize_4bit(t: Tensor4bit) -> torch.Tensor:
    """The values `t` stands for, in its original shape and dtype (step 4, after step 7 with DQ)."""
    return t.dequantize()


# ----------------------------------------------------------------------------- 3) the layer and the config
class _Matmul4bit(torch.autograd.Function):
    """y = x W^T for a frozen 4-bit W that is dequantized again in backward instead of being kept: the
    float weight never outlives one matmul (bitsandbytes' MatMul4Bit does the same)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, t: Tensor4bit) -> torch.Tensor:
        ctx.t = t
        return x @ t.dequantize().float().t()  # (M, K) @ (K, N)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return grad_y @ ctx.t.dequantize().float(), None  # (M, N) @ (N, K); the weight gets no gradient


def linear_4bit(x: torch.Tensor, t: Tensor4bit, cache=None) -> torch.Tensor:
    """The reference kernel of op "linear_4bit": x (M, K) @ W^T in float32 with W = t.dequantize() (N, K),
    returned in x's dtype; gradients flow to x, and W is dequantized again for them (not stored)."""
    return _Matmul4bit.apply(x.float(), t).to(x.dtype)


kernels.register("linear_4bit", kernels.REFERENCE, lambda *args: True, linear_4bit, priority=-100)

BNB_CPU, BNB_CUDA = "bitsandbytes matmul_4bit (cpu)", "bitsandbytes matmul_4bit (cuda)"


def _bnb_pack(t: Tensor4bit):
    """bitsandbytes' view of the same bytes: the packed weight as a (1, bytes) row and a QuantState (no copy)."""
    functional = import_bitsandbytes().functional
    nested = None
    if t.double_quant:
        nested = functional.QuantState(absmax=t.nested_absmax, code=dynamic_map().to(t.qdata.device),
                                       blocksize=NESTED_BLOCK_SIZE, dtype=torch.float32)
    state = functional.QuantState(absmax=t.absmax, shape=t.shape, code=codebook(t.quant_type).to(t.qdata.device),
                                  blocksize=t.group_size, quant_type=t.quant_type, dtype=torch.float32,
                                  offset=t.offset, state2=nested)
    return t.qdata.reshape(-1, 1).t(), state


def _bnb_supports(device_type: str):
    def supports(x: torch.Tensor, t: Tensor4bit, cache=None) -> bool:
        return (cache is not None and x.device.type == device_type == t.qdata.device.type and x.dim() == 2
                and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and import_bitsandbytes() is not None)

    return supports


def _bnb_linear_4bit(x: torch.Tensor, t: Tensor4bit, cache=None) -> torch.Tensor:
    name = BNB_CUDA if x.is_cuda else BNB_CPU
    packed, state = cache.get_packed(_BNB[name], x.device, t)
    return import_bitsandbytes().matmul_4bit(x, packed, state)  # dequantizes again in backward, as linear_4bit


# bitsandbytes' own 4-bit matmul on the very same bytes (its autograd keeps no float weight either). On CPU it
# gives the reference's result bit for bit with float32 inputs (bench/nf4.py times both); 16-bit inputs are
# computed in 16 bits there, hence the tolerance.
_BNB = {name: kernels.register("linear_4bit", name, _bnb_supports(dev), _bnb_linear_4bit, pack=_bnb_pack,
                               priority=10, tolerance=1e-2)
        for name, dev in ((BNB_CPU, "cpu"), (BNB_CUDA, "cuda"))}


@register_quantized_module
class NF4Linear(nn.Module):
    """A linear layer whose frozen weight is stored in 4-bit blocks (NF4 or FP4): QLoRA's base layer.

    Buffers (the state_dict, plain tensors that load without bitsandbytes): weight_qdata (packed codes),
    weight_absmax, and with double quantization weight_offset and weight_nested_absmax; bias (float32).
    forward runs `ql.kernels.call("linear_4bit", x, weight, cache)`, whose reference dequantizes the blocks and
    multiplies in float32 (gradients flow to x, the weight stays frozen).
    """

    def __init__(self, weight: Tensor4bit, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out_features, in_features) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.quant_type, self.group_size, self.weight_dtype = weight.quant_type, weight.group_size, weight.dtype
        self.register_buffer("weight_qdata", weight.qdata)
        self.register_buffer("weight_absmax", weight.absmax)
        self.register_buffer("weight_offset", weight.offset)
        self.register_buffer("weight_nested_absmax", weight.nested_absmax)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._kernel_cache = kernels.KernelCache()

    @classmethod
    def from_float(cls, linear: nn.Linear, quant_type: str = "nf4", group_size: int = 64,
                   double_quant: bool = False) -> NF4Linear:
        """Quantize an nn.Linear's weight (`quantize_4bit`); the bias stays float."""
        return cls(quantize_4bit(linear.weight.detach(), quant_type, group_size, double_quant), linear.bias)

    def weight4bit(self) -> Tensor4bit:
        """The stored weight as a Tensor4bit (views of the buffers, no copy)."""
        return Tensor4bit(self.weight_qdata, self.weight_absmax, self.quant_type, self.group_size,
                          torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.weight_offset,
                          self.weight_nested_absmax)

    def dequantize_weight(self) -> torch.Tensor:
        """The (N, K) weight the codes stand for, float32."""
        return self.weight4bit().dequantize().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.call("linear_4bit", x.reshape(-1, self.in_features), self.weight4bit(), self._kernel_cache)
        y = y.reshape(*x.shape[:-1], self.out_features)  # (..., N)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the stored weight: codes, absmax and (with DQ) the nested statistics."""
        return self.weight4bit().nbytes

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.weight_nested_absmax is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"group_size={self.group_size}{dq}, bias={self.bias is not None}")


@dataclass(frozen=True)
class NF4Config(QuantConfig):
    """Store the selected linears' weights in 4-bit blocks (`NF4Linear`): QLoRA's frozen base.

    Defaults are QLoRA's (NF4, blocks of 64); bitsandbytes' Linear4bit and HF's BitsAndBytesConfig default to
    FP4 instead. double_quant=True is QLoRA's "DQ" (4.127 instead of 4.5 bits per parameter).
    """

    quant_type: str = "nf4"
    group_size: int = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        codebook(self.quant_type)
        if self.group_size not in BLOCK_SIZES:
            raise ValueError(f"group_size={self.group_size!r} is not a block size bitsandbytes supports; use one of "
                             f"{BLOCK_SIZES} (64 is QLoRA's)")


@register_handler(NF4Config)
def _nf4(model: nn.Module, config: NF4Config, calib_data) -> nn.Module:
    swap_modules(model, config, lambda name, lin: NF4Linear.from_float(lin, config.quant_type, config.group_size,
                                                                       config.double_quant))
    return model


__all__ = ["QUANT_TYPES", "NF4_LEVELS", "BLOCK_SIZES", "NESTED_BLOCK_SIZE", "codebook", "dynamic_map", "nearest_level", "Tensor4bit",
           "quantize_blockwise", "dequantize_blockwise", "quantize_4bit", "dequantize_4bit", "linear_4bit", "import_bitsandbytes",
           "NF4Linear", "NF4Config"]
