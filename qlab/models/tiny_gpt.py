"""Tiny GPT: a byte-level, nanoGPT-style causal language model small enough to train on a laptop CPU.

The architecture is GPT-2's (Radford et al. 2019, https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf):
token + position embeddings, `n_layer` pre-LayerNorm blocks of causal self-attention and a GELU MLP,
a final LayerNorm and an LM head tied to the token embedding. Tokens are raw bytes (vocab 256), so no
tokenizer is needed and bits-per-byte is directly comparable across models.

Every matrix multiply lives in an `nn.Linear`, so the quantization chapters can swap them for
quantized modules without touching this file.

Hugging Face GPT-2 (`TinyGPT.to_hf_gpt2()`, and ql.export's AutoGPTQ checkpoints) is the same network with
other names: `wte`, `wpe`, `ln_f` -> `transformer.wte`, `transformer.wpe`, `transformer.ln_f`;
`blocks.{i}.*` -> `transformer.h.{i}.*` (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj keep
their names); `lm_head` stays, tied to `wte`. GPT-2's four block linears are `Conv1D` modules whose weight
is stored (in_features, out_features), the transpose of nn.Linear's, so their weights are transposed.
The config is `hf_gpt2_config(cfg)`: exact GELU (activation_function="gelu", not GPT-2's "gelu_new"),
LayerNorm eps 1e-5, n_inner 4 * n_embd, dropout only on the attention probabilities, no special tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a Tiny GPT. The defaults are the shipped checkpoint's."""

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:  # incremental decoding: attend over the cached tokens and the T new ones (ql.kv_cache)
            past = cache.length - T if layer > 0 else cache.length  # tokens before these (layer 0 counts them first)
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs)
            allowed = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)  # (T, past + T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear(C -> 4C), GELU, Linear(4C -> C)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.act = nn.GELU()  # exact GELU; a module, so AWQ can scale what it feeds c_proj
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """One transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        x = x + (self.attn(self.ln_1(x)) if cache is None else self.attn(self.ln_1(x), cache, layer))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """The whole model: bytes in, next-byte logits out."""

    def __init__(self, cfg: GPTConfig = GPTConfig()) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def smoothquant_mappings(self) -> list[tuple[str, tuple[str, ...]]]:
        """Which norm feeds which linears (pre-LN: the residual bypasses the norm, so smoothing is exact)."""
        return [m for i in range(len(self.blocks))
                for m in ((f"blocks.{i}.ln_1", (f"blocks.{i}.attn.c_attn",)), (f"blocks.{i}.ln_2", (f"blocks.{i}.mlp.c_fc",)))]

    def awq_mappings(self) -> list[tuple[str, tuple[str, ...], str]]:
        """AWQ's (module whose output the linears read, linears, module whose output judges the scales):
        SmoothQuant's norm -> linear pairs, plus v (the last third of c_attn's rows) -> attn.c_proj and
        GELU -> mlp.c_proj."""
        out = []
        for i in range(len(self.blocks)):
            b = f"blocks.{i}"
            out += [(f"{b}.ln_1", (f"{b}.attn.c_attn",), f"{b}.attn"),
                    (f"{b}.attn.c_attn", (f"{b}.attn.c_proj",), f"{b}.attn.c_proj"),
                    (f"{b}.ln_2", (f"{b}.mlp.c_fc",), f"{b}.mlp"),
                    (f"{b}.mlp.act", (f"{b}.mlp.c_proj",), f"{b}.mlp.c_proj")]
        return out

    def transformer_blocks_name(self) -> str:
        """Where the stack of transformer blocks is (GPTQ and AWQ walk it block by block)."""
        return "blocks"

    def to_hf_gpt2(self):
        """The same network as a `transformers.GPT2LMHeadModel` (eval mode, this model's dtype); same logits.

        Only a float model converts: a quantized one leaves qlab as an AutoGPTQ checkpoint
        (`ql.export.save_autogptq`). The name mapping is in the module docstring."""
        try:
            import transformers
        except ImportError as err:
            raise ImportError("to_hf_gpt2 needs the transformers package: pip install transformers") from err
        quantized = [n for n, m in self.named_modules() if n.startswith("blocks.") and n.endswith(HF_GPT2_CONV1D)
                     and type(m) is not nn.Linear]
        if quantized:
            raise ValueError(f"to_hf_gpt2 converts a float TinyGPT, but {quantized[:4]} are "
                             f"{type(self.get_submodule(quantized[0])).__name__} modules; export a quantized model "
                             "with ql.export.save_autogptq(model, path)")
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_gpt2_config(self.config)))
        state = {}
        for name, t in self.state_dict().items():
            if name == "lm_head.weight":
                continue  # tied to wte in both models
            conv1d = name.endswith(tuple(f"{c}.weight" for c in HF_GPT2_CONV1D))
            state[hf_gpt2_name(name)] = t.t() if conv1d else t  # Conv1D weight is (in, out)
        missing, unexpected = hf.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise ValueError(f"GPT-2 mapping mismatch: missing {missing}, unexpected {unexpected}")
        hf.tie_weights()
        return hf.to(self.wte.weight.dtype).eval()

    def num_parameters(self) -> int:
        """Distinct parameters (the tied LM head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None):
        """Logits (B, T, vocab); with `targets`, also the mean cross-entropy in nats per byte.

        cache: a `ql.kv_cache.KVCache` (or QuantizedKVCache) holding the earlier tokens' keys and values: idx
        are then the NEXT tokens, at positions cache.length onwards, and the cache grows by them."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size={self.config.block_size}; crop the input"
                             + (" (the cache already holds " + str(start) + " tokens: start a new one)" if start else ""))
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x) if cache is None else block(x, cache, i)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 40,
        generator: torch.Generator | None = None, cache=None,
    ) -> torch.Tensor:
        """Append `max_new_tokens` sampled bytes to `idx` (B, T); temperature 0 means greedy.

        cache=None recomputes the (cropped) context for every new byte; with a `ql.kv_cache.KVCache` (or a
        QuantizedKVCache) the prompt is run once and each new byte costs one step over the cached keys and values,
        within the model's context (block_size)."""
        if cache is not None and idx.shape[1] + max_new_tokens > self.config.block_size:
            raise ValueError(f"a cache holds at most block_size={self.config.block_size} tokens: the prompt ({idx.shape[1]}) "
                             f"plus max_new_tokens ({max_new_tokens}) exceed it; generate fewer or use cache=None")
        step_input = idx
        for _ in range(max_new_tokens):
            if cache is None:
                logits = self(idx[:, -self.config.block_size :])[:, -1, :]  # (B, vocab)
            else:
                logits = self(step_input, cache=cache)[:, -1, :]  # the prompt first, then one byte at a time
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            step_input = nxt
        return idx


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of `text` as a (1, T) int64 tensor of tokens."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long).unsqueeze(0)


def decode(tokens: torch.Tensor) -> str:
    """Tokens (T,) or (1, T) back to text (invalid UTF-8 sequences replaced)."""
    return bytes(tokens.reshape(-1).tolist()).decode("utf-8", errors="replace")


def config_dict(cfg: GPTConfig) -> dict[str, str]:
    """The config as string metadata for a safetensors header."""
    return {k: str(v) for k, v in asdict(cfg).items()}


def config_from_dict(meta: dict[str, str]) -> GPTConfig:
    """Inverse of `config_dict`."""
    kwargs = {k: float(meta[k]) if k == "dropout" else int(meta[k]) for k in GPTConfig.__dataclass_fields__ if k in meta}
    return GPTConfig(**kwargs)


HF_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the block linears; Conv1D in HF GPT-2


def hf_gpt2_name(name: str) -> str:
    """TinyGPT's parameter name -> GPT2LMHeadModel's, e.g. blocks.0.attn.c_attn.weight -> transformer.h.0.attn.c_attn.weight."""
    if name.startswith("blocks."):
        return "transformer.h." + name[len("blocks."):]
    return "transformer." + name if name.startswith(("wte.", "wpe.", "ln_f.")) else name


def hf_gpt2_config(cfg: GPTConfig) -> dict:
    """The transformers.GPT2Config arguments (and config.json fields) of the same architecture."""
    return dict(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                n_head=cfg.n_head, n_inner=4 * cfg.n_embd, activation_function="gelu", layer_norm_epsilon=1e-5,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=cfg.dropout, scale_attn_weights=True,
                scale_attn_by_inverse_layer_idx=False, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


def config_from_hf_gpt2(hf: dict) -> GPTConfig:
    """Inverse of `hf_gpt2_config` for a GPT-2 config.json; a ValueError names what TinyGPT cannot represent."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"model_type={hf.get('model_type')!r}: TinyGPT is a GPT-2 architecture (model_type 'gpt2')")
    n_embd = hf.get("n_embd", 768)
    want = {"vocab_size": 256, "activation_function": "gelu", "layer_norm_epsilon": 1e-5, "n_inner": 4 * n_embd,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True}
    gpt2_defaults = {"vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                     "n_inner": 4 * n_embd, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                     "tie_word_embeddings": True}  # GPT2Config's, for keys config.json leaves out
    got = {k: gpt2_defaults[k] if hf.get(k) is None else hf[k] for k in want}  # n_inner None means 4 * n_embd
    bad = {k: got[k] for k in want if got[k] != want[k]}
    if bad:
        raise ValueError(f"config.json has {bad}, which TinyGPT cannot represent: it needs {want} "
                         "(byte vocabulary, exact GELU, LayerNorm eps 1e-5, a 4x MLP, tied LM head)")
    return GPTConfig(vocab_size=256, block_size=hf.get("n_positions", 1024), n_layer=hf.get("n_layer", 12),
                     n_head=hf.get("n_head", 12), n_embd=n_embd, dropout=float(hf.get("attn_pdrop", 0.0)))


def tiny_gpt(pretrained: bool = True, dtype: torch.dtype = torch.float32) -> TinyGPT:
    """The course's Tiny GPT, in eval mode.

    Args:
        pretrained: load the shipped checkpoint (qlab/models/checkpoints/tiny_gpt.safetensors, stored in
            fp16) if True; otherwise a freshly initialised model of the same shape.
        dtype: parameter dtype after loading.
    """
    from pathlib import Path

    from safetensors import safe_open

    if not pretrained:
        return TinyGPT(GPTConfig()).to(dtype).eval()
    path = Path(__file__).parent / "checkpoints" / "tiny_gpt.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; it ships with the qlab repository. Recreate it with "
            "`python -m qlab.models.train_tiny_gpt`."
        )
    with safe_open(str(path), framework="pt") as f:
        cfg = config_from_dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    model = TinyGPT(cfg)
    state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(dtype).eval()
