"""QLoRA on a real Hugging Face causal LM, for anyone who has one (nothing is downloaded unless your Hugging
Face cache or a local path provides the model): the code path of chapter 7, on CPU or on a GPU.

    python bench/qlora.py --model facebook/opt-125m [--device cpu|cuda] [--steps 100] [--rank 16]
                          [--batch 4] [--seq-len 256] [--lr 2e-4] [--tokens 4096]

Every linear layer but the LM head is frozen in NF4 with double quantization (`ql.NF4Config`), LoRA adapters
(`ql.LoRAConfig`, alpha = 2 x rank) train on the Python source of the standard library
(`ql.data.python_source("train")`), and perplexity is measured on other modules (`"val"`) before and after.
The optimizer is bitsandbytes' paged 8-bit AdamW on CUDA, its 8-bit AdamW on CPU (paging needs CUDA), torch's
AdamW without bitsandbytes; the table names the one that ran, the bytes of the frozen weights, the optimizer
state, and the peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: growth of the resident set).
A model folder without a tokenizer is fed UTF-8 bytes as token ids (its vocabulary must hold 256 ids).
"""

from __future__ import annotations

import argparse

import torch

import qlab as ql

HEADS = ("*lm_head", "*embed_out")  # the LM head stays in float, as in QLoRA


def tokens(tokenizer, data: torch.Tensor) -> torch.Tensor:
    """A 1-D int64 token tensor of the UTF-8 bytes in `data`, with the model's tokenizer or as raw bytes."""
    if tokenizer is None:
        return data.long()
    return tokenizer(data.numpy().tobytes().decode("utf-8", "ignore"), return_tensors="pt")["input_ids"][0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face model name or a local directory")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4, help="QLoRA's learning rate for 7B/13B models")
    ap.add_argument("--tokens", type=int, default=4096, help="validation tokens to score")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    model, tokenizer = ql.models.load_causal_lm(args.model, device=args.device)
    vocab = model.get_input_embeddings().num_embeddings
    if tokenizer is None and vocab < 256:
        raise SystemExit(f"{args.model} has no tokenizer and a vocabulary of {vocab} < 256 ids: cannot feed it bytes")
    train = tokens(tokenizer, ql.data.python_source("train"))
    val = tokens(tokenizer, ql.data.python_source("val"))[: args.tokens + 1]

    def perplexity() -> float:
        fn = lambda x: model(x.to(args.device)).logits  # noqa: E731
        return ql.eval.perplexity(fn, val, seq_len=args.seq_len, progress=False)["perplexity"]

    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before_float = perplexity()
    ql.quantize_(model, [ql.NF4Config(double_quant=True, exclude=HEADS),
                         ql.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, exclude=HEADS)])
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() * b.element_size() for b in model.buffers())
    before = perplexity()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    report = ql.lora.finetune(model, train, steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr)
    after = perplexity()
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else report.peak_memory_bytes
    print(f"machine: {ql.eval.machine_info()}; model {args.model} on {args.device}; "
          f"{len(ql.lora.adapters(model))} linear layers in NF4 + DQ with rank-{args.rank} adapters")
    rows = [
        ("weights before quantization (MiB)", f"{float_bytes / 2**20:.1f}"),
        ("frozen weights after NF4 + DQ (MiB)", f"{frozen / 2**20:.1f}"),
        ("trainable parameters", f"{report.trainable_parameters:,}"),
        ("optimizer", report.optimizer),
        ("optimizer state (MiB)", f"{report.optimizer_state_bytes / 2**20:.2f}"),
        ("peak memory while training (MiB)" + (" (CUDA allocated)" if args.device == "cuda" else " (RSS growth)"),
         f"{peak / 2**20:.0f}"),
        ("perplexity on val code: float / NF4 before / after", f"{before_float:.2f} / {before:.2f} / {after:.2f}"),
        (f"fine-tuning time for {args.steps} steps (s)", f"{report.seconds:.1f}"),
    ]
    for name, value in rows:
        print(f"{name:58s} {value}")


if __name__ == "__main__":
    main()
