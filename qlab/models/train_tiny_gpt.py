"""Train the Tiny GPT on the standard library's documentation and write the shipped checkpoint.

    python -m qlab.models.train_tiny_gpt                      # the shipped recipe (tens of minutes on 2 cores)
    python -m qlab.models.train_tiny_gpt --steps 50 --out /tmp/gpt   # a quick smoke run

The run is deterministic for a given seed, thread count and torch version: data order, init and
dropout all come from seeded generators. It writes `tiny_gpt.safetensors` (fp16 weights, config and
training facts in the header) and the model card `tiny_gpt.md` with the validation numbers it measured.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data import lm_batch, pydoc_corpus
from ..eval import perplexity
from .tiny_gpt import GPTConfig, TinyGPT, config_dict, decode, encode

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe. The defaults produced the shipped checkpoint."""

    steps: int = 2500
    batch_size: int = 16
    dropout: float = 0.1
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def train(cfg: GPTConfig, tc: TrainConfig, progress: bool = True) -> tuple[TinyGPT, list[float]]:
    """Train a Tiny GPT from scratch; returns the model and its per-step training loss."""
    torch.manual_seed(tc.seed)
    model = TinyGPT(cfg)
    data = pydoc_corpus("train")
    gen = torch.Generator().manual_seed(tc.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, betas=(0.9, 0.95),
    )
    losses = []
    bar = tqdm(range(tc.steps), desc="train tiny GPT", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        x, y = lm_batch(data, tc.batch_size, cfg.block_size, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return model, losses


def save_checkpoint(model: TinyGPT, path: Path, extra: dict[str, str]) -> None:
    """fp16 weights (the tied LM head stored once) with the config as header metadata."""
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path), metadata={**config_dict(model.config), **extra})


def write_model_card(path: Path, model: TinyGPT, tc: TrainConfig, val: dict, train_val: dict, seconds: float, sample: str) -> None:
    cfg = model.config
    n_train, n_val = pydoc_corpus("train").numel(), pydoc_corpus("val").numel()
    path.write_text(f"""# Model card: Tiny GPT (`ql.models.tiny_gpt(pretrained=True)`)

A byte-level GPT-2-style causal language model trained from scratch by
`python -m qlab.models.train_tiny_gpt` on the Python documentation topics that ship with every CPython
install (`pydoc_data.topics`). Written by the training script; every number below was measured by it.

| | |
| --- | --- |
| parameters | {model.num_parameters():,} ({cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, context {cfg.block_size} bytes, vocab 256 bytes, tied embeddings) |
| training data | {n_train:,} bytes (topics not in validation) |
| validation data | {n_val:,} bytes (every 10th topic by name, from the 6th) |
| recipe | {tc.steps} steps of AdamW, dropout {tc.dropout} (betas 0.9/0.95, weight decay {tc.weight_decay}), batch {tc.batch_size} x {cfg.block_size} bytes, lr {tc.lr} with {tc.warmup} warm-up steps and cosine decay to {tc.min_lr}, grad clip 1.0, seed {tc.seed} |
| validation bits per byte | **{val['bits_per_token']:.4f}** |
| validation perplexity (per byte) | **{val['perplexity']:.3f}** |
| training-split bits per byte (first 64 KB) | {train_val['bits_per_token']:.4f} |
| evaluation protocol | `ql.eval.perplexity`: sliding windows of {cfg.block_size} bytes, stride {cfg.block_size // 2}, each byte scored once |
| checkpoint | `tiny_gpt.safetensors`, fp16 weights ({sum(p.numel() for p in model.parameters()) * 2 / 1e6:.1f} MB) |
| trained on | {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {seconds / 60:.1f} minutes |

Python version note: `pydoc_data.topics` changes a little between Python releases, so numbers measured on
another Python differ slightly. Retraining with the same seed, thread count and torch version reproduces
the training curve step for step.

## A sample (temperature 0.8, top-k 40, seed 0)

```text
{sample}
```

## Intended use
A small, real, fully offline language model for teaching quantization: its weights and activations
are real trained distributions, and its perplexity reacts to quantization error the way a large
model's does. It is not a useful language model.
""")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="folder for tiny_gpt.safetensors and tiny_gpt.md")
    args = ap.parse_args(argv)
    tc = TrainConfig(steps=args.steps, seed=args.seed)
    cfg = GPTConfig(dropout=tc.dropout)
    t0 = time.perf_counter()
    model, losses = train(cfg, tc)
    seconds = time.perf_counter() - t0
    val = perplexity(model, pydoc_corpus("val"))
    train_val = perplexity(model, pydoc_corpus("train"), max_tokens=65536)
    g = torch.Generator().manual_seed(0)
    sample = decode(model.generate(encode("The \"for\" statement"), 400, generator=g))
    args.out.mkdir(parents=True, exist_ok=True)
    extra = {"steps": str(tc.steps), "seed": str(tc.seed), "val_bits_per_byte": f"{val['bits_per_token']:.6f}",
             "final_train_loss": f"{sum(losses[-50:]) / len(losses[-50:]):.6f}"}
    save_checkpoint(model, args.out / "tiny_gpt.safetensors", extra)
    write_model_card(args.out / "tiny_gpt.md", model, tc, val, train_val, seconds, sample)
    print(f"validation: {val['bits_per_token']:.4f} bits/byte, perplexity {val['perplexity']:.3f}; wrote {args.out}")
    print(sample)


if __name__ == "__main__":
    main()
