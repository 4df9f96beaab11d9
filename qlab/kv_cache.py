"""KV caches for incremental decoding: full precision, and KIVI's quantized cache with a full-precision window.

Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", https://arxiv.org/abs/2402.02750

A decoder attends over the keys and values of every earlier token; keeping them (the KV cache) makes each new
token cost one step instead of a pass over the whole context, and the cache grows by
2 x n_layer x n_embd values per token. KIVI quantizes it asymmetrically (min/max groups, codes of `bits`):

    1) keys   per CHANNEL: for each channel, a group of `group_size` tokens shares (scale, min)  (outlier channels)
    2) values per TOKEN:   for each token, a group of `group_size` channels shares (scale, min)
    3) the newest `residual_length` tokens stay in full precision (the window attention looks at most)
    4) q = clamp(round((x - min) / scale), 0, 2^bits - 1),  scale = (max - min) / (2^bits - 1),  x_hat = q * scale + min

Update rule (KIVI's, implemented here): per-channel groups need a block of tokens, so the keys of the window are
quantized a whole block at a time when the window is full (`residual_length` tokens, a multiple of `group_size`,
cut into groups of `group_size` tokens per channel); per-token groups are quantized one token at a time, the
oldest token of the window as a new one arrives.
Hugging Face's `QuantizedCache` differs: when its window fills it re-quantizes the whole cache (old codes
dequantized and quantized again with the new ones), and it uses one axis for both keys and values.
Storage is counted as stored: codes bit-packed (`ql.pack`), scale and min in float16 per group. This is a
simulation for measuring accuracy and storage: to keep decoding fast, each stream also keeps the decoded values of
its quantized chunks (decoded once, when stored), which `nbytes` does not count; a real kernel would read the codes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .core.packing import pack, packed_nbytes, unpack

AXES = ("channel", "token")


def quantize_groups(x: torch.Tensor, bits: int, axis: str, group_size: int):
    """Step 4 on x (B, nh, T, hs): groups along tokens ("channel": one group of all T tokens per channel; the cache
    passes blocks of `group_size` tokens) or along channels ("token": groups of `group_size` channels per token). Returns (packed codes, scale fp16, min fp16)."""
    B, H, T, D = x.shape
    g = x.float().transpose(2, 3) if axis == "channel" else x.float().reshape(B, H, T, D // group_size, group_size)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)  # per group
    scale = ((hi - lo) / (2**bits - 1)).half()
    lo = lo.half()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    q = ((g - lo.float()) / safe).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return (q if bits == 8 else pack(q, bits)), scale, lo, tuple(q.shape)  # 8-bit codes are whole bytes already


def dequantize_groups(codes, scale, lo, shape, bits: int, axis: str) -> torch.Tensor:
    """Inverse of `quantize_groups`: (B, nh, T, hs) float32."""
    q = (codes.reshape(shape) if bits == 8 else unpack(codes, shape, bits, signed=False)).float()
    x = q * scale.float() + lo.float()
    if axis == "channel":
        return x.transpose(2, 3)  # (B, nh, hs, T) -> (B, nh, T, hs)
    B, H, T, G, S = x.shape
    return x.reshape(B, H, T, G * S)


class KVCache:
    """Full-precision cache: per layer, the keys and values (B, n_head, T, head_dim) of every token so far."""

    def __init__(self, n_layer: int) -> None:
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' k, v (B, nh, T_new, hs); return every token's (B, nh, T, hs)."""
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], dim=2)
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class _QuantizedStream:
    """One layer's keys or values: quantized chunks, then a full-precision window of the newest tokens."""

    def __init__(self, bits: int, axis: str, group_size: int, residual_length: int,
                 quantize_fn: Callable = quantize_groups, dequantize_fn: Callable = dequantize_groups) -> None:
        self.bits, self.axis, self.group_size, self.R = bits, axis, group_size, residual_length
        self.quantize_fn, self.dequantize_fn = quantize_fn, dequantize_fn
        self.chunks: list[tuple] = []  # (codes, scale, min, shape) per quantized chunk
        self.dequantized: list[torch.Tensor] = []  # their values, decoded once (what attention reads)
        self.window: torch.Tensor | None = None  # (B, nh, t, hs), t <= R

    def append(self, x: torch.Tensor) -> torch.Tensor:
        self.window = x if self.window is None else torch.cat([self.window, x], dim=2)
        if self.axis == "channel":  # a full window is quantized as one block: groups of group_size tokens
            while self.window.shape[2] >= self.R:
                for start in range(0, self.R, self.group_size):
                    self._store(self.window[:, :, start:start + self.group_size])
                self.window = self.window[:, :, self.R:]
        else:  # tokens leave the window one at a time, oldest first
            extra = self.window.shape[2] - self.R
            if extra > 0:
                for t in range(extra):
                    self._store(self.window[:, :, t:t + 1])
                self.window = self.window[:, :, extra:]
        return torch.cat(self.dequantized + [self.window], dim=2)

    def _store(self, x: torch.Tensor) -> None:
        chunk = self.quantize_fn(x, self.bits, self.axis, self.group_size)
        self.chunks.append(chunk)
        self.dequantized.append(self.dequantize_fn(*chunk, self.bits, self.axis).to(x.dtype))

    @property
    def nbytes(self) -> int:
        stored = sum(packed_nbytes(torch.Size(shape).numel(), self.bits) + 2 * (s.numel() + m.numel())
                     for _, s, m, shape in self.chunks)
        return stored + (0 if self.window is None else self.window.numel() * self.window.element_size())


class QuantizedKVCache(KVCache):
    """KIVI's cache (module doc): keys and values quantized to k_bits / v_bits along `key_axis` / `value_axis`,
    the newest `residual_length` tokens in full precision. KIVI's choice is keys per channel, values per token.

    quantize_fn, dequantize_fn: step 4 written by someone else (a lab's student), used in place of
    `quantize_groups` / `dequantize_groups` with their signatures: quantize_fn(x, bits, axis, group_size) ->
    (codes, scale, min, shape) and dequantize_fn(codes, scale, min, shape, bits, axis) -> x_hat (B, nh, T, hs).
    Give both or neither: each reads what the other writes. The codes may be packed or one per uint8; `nbytes`
    counts them packed (`shape` gives their number) and scale and min as float16, one per group."""

    def __init__(self, n_layer: int, head_dim: int, k_bits: int = 2, v_bits: int = 2, group_size: int = 32,
                 residual_length: int = 32, key_axis: str = "channel", value_axis: str = "token", *,
                 quantize_fn: Callable | None = None, dequantize_fn: Callable | None = None) -> None:
        super().__init__(n_layer)
        if (quantize_fn is None) != (dequantize_fn is None):
            given = "quantize_fn" if dequantize_fn is None else "dequantize_fn"
            raise ValueError(f"only {given} was given: pass quantize_fn and dequantize_fn together, since each reads "
                             "what the other writes (qlab's dequantize_groups unpacks ql.pack's codes)")
        for name, bits in (("k_bits", k_bits), ("v_bits", v_bits)):
            if bits not in (1, 2, 4, 8):
                raise ValueError(f"{name}={bits!r}: the cache packs 1-, 2-, 4- or 8-bit codes (KIVI uses 2)")
        for name, axis in (("key_axis", key_axis), ("value_axis", value_axis)):
            if axis not in AXES:
                raise ValueError(f"{name}={axis!r} must be 'channel' or 'token'")
        if not isinstance(group_size, int) or group_size < 1 or head_dim % group_size:
            raise ValueError(f"group_size={group_size!r} must divide head_dim={head_dim} (per-token groups of channels); "
                             f"try one of {[d for d in range(1, head_dim + 1) if head_dim % d == 0]}")
        if not isinstance(residual_length, int) or residual_length < 1:
            raise ValueError(f"residual_length={residual_length!r} must be a positive number of tokens (KIVI: 32 or 128)")
        if "channel" in (key_axis, value_axis) and residual_length % group_size:
            raise ValueError(f"residual_length={residual_length} must be a multiple of group_size={group_size}: per-channel "
                             f"groups of {group_size} tokens are cut from each full window (KIVI: group 32, window 32 or 128)")
        self.config = dict(k_bits=k_bits, v_bits=v_bits, group_size=group_size, residual_length=residual_length,
                           key_axis=key_axis, value_axis=value_axis)
        fns = (quantize_fn, dequantize_fn) if quantize_fn is not None else (quantize_groups, dequantize_groups)
        self.ks = [_QuantizedStream(k_bits, key_axis, group_size, residual_length, *fns) for _ in range(n_layer)]
        self.vs = [_QuantizedStream(v_bits, value_axis, group_size, residual_length, *fns) for _ in range(n_layer)]
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == 0:
            self._length += k.shape[2]
        return self.ks[layer].append(k), self.vs[layer].append(v)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.ks + self.vs)


@torch.no_grad()
def decode_logits(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, T, vocab) of `tokens` (B, T) fed ONE token at a time through `cache`, as generation reads them
    (teacher forcing: position t sees the cached keys and values of tokens 0..t-1)."""
    return torch.cat([model(tokens[:, t:t + 1], cache=cache) for t in range(tokens.shape[1])], dim=1)


def full_precision_nbytes(n_layer: int, n_embd: int, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    """Bytes of a 16-bit KV cache: 2 (k and v) x layers x width x tokens x batch x bytes."""
    return 2 * n_layer * n_embd * tokens * batch * bytes_per_value


def _stream_nbytes(width: int, tokens: int, bits: int, axis: str, group_size: int, residual_length: int,
                   bytes_per_value: int) -> int:
    """Bytes of one layer's keys or values (width = n_head x head_dim channels per token), by the update rule."""
    if axis == "channel":  # whole windows of R tokens quantized: a (scale, min) pair per channel per group of tokens
        blocks, window = divmod(tokens, residual_length)
        codes = blocks * (residual_length // group_size) * packed_nbytes(group_size * width, bits)
        return codes + blocks * (residual_length // group_size) * width * 2 * 2 + window * width * bytes_per_value
    stored, window = max(tokens - residual_length, 0), min(tokens, residual_length)  # tokens leave one at a time
    codes = stored * packed_nbytes(width, bits)
    return codes + stored * (width // group_size) * 2 * 2 + window * width * bytes_per_value


def quantized_nbytes(n_layer: int, n_embd: int, tokens: int, batch: int = 1, *, k_bits: int = 2, v_bits: int = 2,
                     group_size: int = 32, residual_length: int = 32, key_axis: str = "channel",
                     value_axis: str = "token", bytes_per_value: int = 2) -> int:
    """Bytes of a `QuantizedKVCache` holding `tokens` tokens, from the update rule (module doc): codes packed,
    a float16 scale and min per group, the window in `bytes_per_value`-byte floats. It is what the cache's
    `nbytes` counts (checked in the tests), so it extrapolates the measurement to models too big to run here."""
    if tokens < 0 or batch < 1:
        raise ValueError(f"tokens={tokens!r} must be >= 0 and batch={batch!r} >= 1")
    if n_embd % group_size:
        raise ValueError(f"group_size={group_size} must divide the channels of a head (and so n_embd={n_embd})")
    if "channel" in (key_axis, value_axis) and residual_length % group_size:
        raise ValueError(f"residual_length={residual_length} must be a multiple of group_size={group_size} (per-channel "
                         "groups of tokens are cut from each full window)")
    k = _stream_nbytes(n_embd, tokens, k_bits, key_axis, group_size, residual_length, bytes_per_value)
    v = _stream_nbytes(n_embd, tokens, v_bits, value_axis, group_size, residual_length, bytes_per_value)
    return n_layer * batch * (k + v)


__all__ = ["AXES", "quantize_groups", "dequantize_groups", "KVCache", "QuantizedKVCache", "decode_logits", "quantized_nbytes",
           "full_precision_nbytes"]
