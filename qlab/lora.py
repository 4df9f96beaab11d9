"""LoRA adapters on frozen (possibly quantized) linear layers: the trainable half of QLoRA.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685
Dettmers et al. 2023, "QLoRA", https://arxiv.org/abs/2305.14314 (LoRA on an NF4 base)

A frozen weight W (N, K) gets a trainable low-rank update:

    y = x W^T + (dropout(x) A^T) B^T * scaling          A (r, K), B (N, r), scaling = alpha / r

Conventions of PEFT's LoraConfig (0.6 .. 0.21), reproduced (tests/test_lora.py compares with peft):
- A starts like nn.Linear's weight, kaiming_uniform_(a=sqrt(5)); B starts at zero, so step 0 is the base model.
- scaling = alpha / r, or alpha / sqrt(r) with use_rslora=True (rsLoRA, Kalajdzievski 2023).
- PEFT's defaults are r=8, alpha=8, dropout 0; QLoRA used r=64, alpha=16 on every linear but the LM head.
- Applying adapters (LoRAConfig) freezes every other parameter of the model, as `get_peft_model` does.

Merging adds B A * scaling into the base weight. A quantized base must be dequantized first and the sum
re-quantized, which rounds the adapter's small update onto the 4-bit grid: `merge_` reports what it costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .api import QuantConfig, register_handler, swap_modules
from .nf4 import NF4Linear, import_bitsandbytes
from .nn import WeightOnlyLinear


# ----------------------------------------------------------------------------- 1) the math
def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r (LoRA), or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The update the adapter adds to the weight: B A * scaling, (N, r) @ (r, K) -> (N, K)."""
    return (B @ A) * scaling


# ----------------------------------------------------------------------------- 2) the layer
WRAPPABLE = (nn.Linear, NF4Linear, WeightOnlyLinear)  # bases whose weight a merge can read back


def _base_weight(base: nn.Module) -> torch.Tensor:
    """The (N, K) float32 weight a base layer computes with (dequantized if it is stored in codes)."""
    if isinstance(base, nn.Linear):
        return base.weight.detach().float()
    return base.dequantize_weight().float()


class LoRALinear(nn.Module):
    """A frozen base linear layer (nn.Linear, NF4Linear or a weight-only layer) plus a trainable adapter.

    forward is the equation of the module doc: base(x) + lora_B(lora_A(dropout(x))) * scaling.
    """

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        if isinstance(base, LoRALinear):
            raise ValueError("this layer already has a LoRA adapter; merge it first (ql.lora.merge_) to add another")
        if not isinstance(base, WRAPPABLE):
            raise ValueError(f"LoRA wraps linear layers ({', '.join(t.__name__ for t in WRAPPABLE)}), got "
                             f"{type(base).__name__}; exclude it from the config's include patterns")
        K, N = base.in_features, base.out_features
        if not isinstance(rank, int) or not 1 <= rank <= min(K, N):
            raise ValueError(f"rank={rank!r} must be an integer in [1, min(in_features, out_features)] = [1, {min(K, N)}] "
                             f"for this {N}x{K} layer; 8 to 64 is usual")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.base, self.rank, self.alpha, self.use_rslora = base, rank, alpha, use_rslora
        self.in_features, self.out_features = K, N
        self.scaling = lora_scaling(rank, alpha, use_rslora)
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(K, rank, bias=False)  # (r, K)
        self.lora_B = nn.Linear(rank, N, bias=False)  # (N, r)
        # PEFT's reset_lora_parameters, in its order (so one seed gives PEFT's very adapter):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # step 0: exactly the base model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))).to(y.dtype) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """B A * scaling (N, K), float32."""
        return delta_weight(self.lora_A.weight.detach().float(), self.lora_B.weight.detach().float(), self.scaling)

    def extra_repr(self) -> str:
        kind = "rsLoRA" if self.use_rslora else "LoRA"
        return f"{kind} rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}"


# ----------------------------------------------------------------------------- 3) applying and merging
def adapters(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, layer) of every LoRALinear in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters the optimizer updates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class MergeReport:
    """What merging cost, per layer: |W_merged - (W_base + BA*s)| / |BA*s| (Frobenius), i.e. how much of the
    adapter's update the re-quantization lost (0 for a float base)."""

    layers: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.layers.values(), default=0.0)


def _merged_layer(layer: LoRALinear, requantize: bool) -> tuple[nn.Module, float]:
    base = layer.base
    bias = getattr(base, "bias", None)
    target = _base_weight(base) + layer.delta_weight()  # (N, K)
    if isinstance(base, NF4Linear) and requantize:
        dq = base.weight_nested_absmax is not None
        merged = NF4Linear.from_float(_float_linear(target, bias), base.quant_type, base.group_size, dq)
    elif isinstance(base, WeightOnlyLinear) and requantize:
        raise ValueError("re-quantizing a merged weight-only (GPTQ/RTN/AWQ) layer would need its algorithm again; "
                         "merge with requantize=False and quantize the float model afterwards")
    else:
        merged = _float_linear(target, bias)
    got = _base_weight(merged)
    update = layer.delta_weight()
    cost = float((got - target).norm() / update.norm().clamp(min=1e-30)) if update.abs().max() > 0 else 0.0
    return merged, cost


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    N, K = weight.shape
    lin = nn.Linear(K, N, bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias.float())
    return lin


def merge_(model: nn.Module, requantize: bool = True) -> MergeReport:
    """Fold every adapter into its base layer, in place, and report the rounding cost.

    A float base becomes an nn.Linear with W + BA*s. An NF4 base is dequantized, merged and, with
    requantize=True, quantized again in its own format (the update is rounded onto the 4-bit grid: see the
    report); requantize=False leaves a float layer (the recommended route before exporting elsewhere).
    """
    found = adapters(model)
    if not found:
        raise ValueError("the model has no LoRA adapters to merge; add them with ql.quantize_(model, ql.LoRAConfig(...))")
    report = MergeReport()
    for name, layer in found:
        merged, report.layers[name] = _merged_layer(layer, requantize)
        model.set_submodule(name, merged)
    return report


@dataclass(frozen=True)
class LoRAConfig(QuantConfig):
    """Wrap the selected linear layers (float or quantized) in LoRALinear and freeze everything else.

    PEFT's defaults (rank 8, alpha 8, no dropout); QLoRA: `LoRAConfig(rank=64, alpha=16, exclude=("lm_head",))`
    after `NF4Config(double_quant=True)` in one recipe.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    targets: tuple[type, ...] = WRAPPABLE
    wraps_quantized: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be a positive integer (8 in PEFT, 64 in QLoRA)")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r} must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")


@register_handler(LoRAConfig)
def _lora(model: nn.Module, config: LoRAConfig, calib_data) -> nn.Module:
    inside = tuple(f"{name}.*" for name, _ in adapters(model))  # an adapter's base, lora_A and lora_B
    config = replace(config, exclude=tuple(config.exclude) + inside) if inside else config
    for p in model.parameters():
        p.requires_grad_(False)
    swap_modules(model, config, lambda name, base: LoRALinear(base, config.rank, config.alpha, config.dropout,
                                                              config.use_rslora))
    return model


# ----------------------------------------------------------------------------- 4) fine-tuning
@dataclass
class FinetuneReport:
    """What a fine-tune did and cost: the loss per step, wall time, which optimizer ran, the parameters it
    updated, the bytes of its state, and the peak growth of the process's resident memory while training."""

    losses: list[float]
    seconds: float
    optimizer: str
    trainable_parameters: int
    optimizer_state_bytes: int
    peak_memory_bytes: int


def make_optimizer(params: list[nn.Parameter], lr: float, optimizer: str = "auto") -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and its name. "auto": bitsandbytes' paged 8-bit AdamW on CUDA (QLoRA's), its 8-bit AdamW
    on CPU (paging needs CUDA's unified memory), torch's AdamW when bitsandbytes is missing. "adamw8bit",
    "paged_adamw8bit" and "adamw" ask for one. 8-bit state is used for every tensor of 256 values or more
    (bitsandbytes' default threshold, 4096, would keep small adapters in 32 bits)."""
    device = params[0].device.type
    if optimizer == "auto":
        has_bnb = import_bitsandbytes() is not None
        optimizer = "adamw" if not has_bnb else "paged_adamw8bit" if device == "cuda" else "adamw8bit"
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), "torch AdamW (32-bit state)"
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        if optimizer == "paged_adamw8bit" and device != "cuda":
            raise ValueError("paged optimizers page their state through CUDA unified memory; on CPU use 'adamw8bit'")
        bnb = import_bitsandbytes()
        if bnb is None:
            raise ValueError(f"optimizer={optimizer!r} needs bitsandbytes (pip install bitsandbytes); or use 'adamw'")
        cls = bnb.optim.PagedAdamW8bit if optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=0.0, min_8bit_size=256), f"bitsandbytes {cls.__name__} ({device})"
    raise ValueError(f"optimizer={optimizer!r}: use 'auto', 'adamw8bit', 'paged_adamw8bit' or 'adamw'")


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (moments, their 8-bit absmax and maps)."""
    return sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def _release_free_memory() -> None:
    """Give memory freed earlier back to the OS (glibc's malloc_trim), so the next peak starts from what is used."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement may then include memory freed earlier
        pass


class _PeakMemory:
    """Peak resident-memory growth of this process inside a `with` block, sampled every 2 ms by a thread."""

    def __enter__(self) -> _PeakMemory:
        import threading

        import psutil

        self._process, self._stop = psutil.Process(), threading.Event()
        _release_free_memory()
        self.start = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def causal_lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of tokens x (B, T): predict x[:, 1:] from x[:, :-1] (nats)."""
    out = model(x[:, :-1])
    logits = out.logits if hasattr(out, "logits") else out  # a Hugging Face model returns an output object
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())


def finetune(model: nn.Module, data: torch.Tensor, steps: int = 100, batch_size: int = 8, seq_len: int = 128,
             lr: float = 1e-3, optimizer: str = "auto", max_grad_norm: float = 0.3, seed: int = 0,
             progress: bool = True) -> FinetuneReport:
    """Train the model's trainable parameters (the adapters, after LoRAConfig) on random windows of `data`.

    QLoRA's recipe: constant learning rate, gradient clipping at 0.3, (paged) 8-bit AdamW. data is a 1-D
    token tensor; each step draws batch_size windows of seq_len + 1 tokens (seeded). Works the same for a
    qlab TinyGPT and a Hugging Face causal LM, on whatever device the model is on.
    """
    import time

    from tqdm.auto import tqdm

    from .data import lm_batch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: add adapters first (ql.LoRAConfig), or unfreeze it")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    device = params[0].device
    opt, name = make_optimizer(params, lr, optimizer)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    t0 = time.perf_counter()
    with _PeakMemory() as memory:
        for _ in tqdm(range(steps), desc="fine-tune", unit="step", disable=not progress):
            x, _ = lm_batch(data, batch_size, seq_len + 1, g)  # (B, T + 1)
            loss = causal_lm_loss(model, x.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    model.eval()
    return FinetuneReport(losses, time.perf_counter() - t0, name, sum(p.numel() for p in params),
                          optimizer_state_bytes(opt), memory.growth)


__all__ = ["lora_scaling", "delta_weight", "WRAPPABLE", "LoRALinear", "adapters", "trainable_parameters", "merge_",
           "MergeReport", "LoRAConfig", "FinetuneReport", "make_optimizer", "optimizer_state_bytes", "causal_lm_loss",
           "finetune"]
