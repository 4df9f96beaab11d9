"""The outlier methods of chapter 5 on a real Hugging Face causal LM, for anyone who has one (nothing is
downloaded unless your Hugging Face cache or a local path provides the model).

    python bench/llm.py --model facebook/opt-125m [--device cpu|cuda] [--tokens 2048] [--seq-len 512]

Perplexity on the Python documentation corpus shipped with the course (`ql.data.pydoc_corpus("val")`,
tokenized with the model's tokenizer) and median latency of one forward pass, for FP32 (or fp16 on CUDA),
W8A8 dynamic per-tensor (naive), W8A8 dynamic per-token, LLM.int8() (threshold 6), each measured in the
same run; the kernels that ran are named.
"""

from __future__ import annotations

import argparse
import copy

import torch

import qlab as ql


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face model name or a local directory")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=2048, help="validation tokens to score")
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    model, tok = ql.models.load_causal_lm(args.model)
    model = model.float().eval()
    text = ql.data.pydoc_corpus("val").numpy().tobytes().decode("utf-8", "ignore")
    ids = tok(text, return_tensors="pt")["input_ids"][0][: args.tokens + 1]
    print(f"machine: {ql.eval.machine_info()}; model {args.model}; {ids.numel() - 1} tokens, windows of {args.seq_len}")
    variants = {
        "FP32": model,
        "W8A8 dynamic per-tensor": ql.quantize_(copy.deepcopy(model), ql.Int8DynamicConfig(
            act_granularity=ql.PerTensor(), exclude=("*lm_head", "*embed_out"))),
        "W8A8 dynamic per-token": ql.quantize_(copy.deepcopy(model), ql.Int8DynamicConfig(exclude=("*lm_head", "*embed_out"))),
        "LLM.int8() threshold 6": ql.quantize_(copy.deepcopy(model), ql.LLMInt8Config(exclude=("*lm_head", "*embed_out"))),
    }
    sample = ids[: args.seq_len].unsqueeze(0).to(args.device)
    base = None
    print(f"{'variant':26s} {'perplexity':>11s} {'latency ms':>11s} {'speed-up':>9s}  kernels")
    for label, m in variants.items():
        m = m.to(args.device)
        fn = lambda x, m=m: m(x.to(args.device)).logits  # noqa: E731
        ppl = ql.eval.perplexity(fn, ids, seq_len=args.seq_len, progress=False)["perplexity"]
        ms = ql.eval.median_ms(fn, sample, repeats=3)
        with torch.inference_mode(), ql.kernels.trace() as ran:
            fn(sample)
        base = base or ms
        print(f"{label:26s} {ppl:11.3f} {ms:11.1f} {base / ms:8.2f}x  {', '.join(sorted(set(ran))) or 'torch (float)'}")


if __name__ == "__main__":
    main()
