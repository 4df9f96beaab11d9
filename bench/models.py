"""Model-size and latency table for the course's three models, measured side by side in one run.

    python bench/models.py [--threads N] [--repeats R]

For each model: real storage (ql.eval.model_nbytes) and median forward latency in FP32, in BF16
(weights and compute), with qlab's W8A8 dynamic, int8 and int4 weight-only quantization (the kernels
ql.kernels chose are named), and with torch.ao dynamic int8 quantization of every nn.Linear (the PyTorch
baseline). Ratios are relative to FP32 in the same run. The tiny GPT keeps its tied LM head in float.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

import qlab as ql


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao prints a deprecation notice
        dyn = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    out = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    exclude = ("lm_head",) if hasattr(model, "lm_head") else ()
    for label, config in [("qlab W8A8 dynamic", ql.Int8DynamicConfig(exclude=exclude)),
                          ("qlab int8 w-only", ql.Int8WeightOnlyConfig(exclude=exclude)),
                          ("qlab int4 w-only", ql.Int4WeightOnlyConfig(group_size=32, exclude=exclude))]:
        try:
            out[label] = ql.quantize_(copy.deepcopy(model), config)
        except ValueError as err:  # e.g. a layer width that group_size does not divide
            print(f"  ({label} skipped: {err})")
    out["torch.ao dyn int8"] = dyn
    return out


def ao_nbytes(model: torch.nn.Module) -> int:
    """Storage of a torch.ao dynamic model: its packed int8 weights live outside parameters()."""
    total = ql.eval.model_nbytes(model)
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is None or not hasattr(packed, "_weight_bias"):
            continue
        w, b = packed._weight_bias()
        total += w.numel()  # one int8 code per weight
        total += 4 * b.numel() if b is not None else 0  # fp32 bias
        per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        total += 8 * (w.q_per_channel_scales().numel() if per_channel else 1)  # fp64 scale(s)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {ql.eval.machine_info()}")

    gpt = ql.models.tiny_gpt(pretrained=True)
    tokens = ql.data.lm_calibration_batches(1, batch_size=8, seq_len=128)[0]
    mini = ql.models.minilm()
    batch = mini.tokenize(["The quick brown fox jumps over the lazy dog."] * 16)
    cnn = ql.models.digits_cnn(pretrained=True)
    images, _ = ql.data.digits_split("test")
    cases = [
        ("tiny GPT (8 x 128 bytes)", gpt, lambda m: m(tokens)),
        ("MiniLM-L6 (16 sentences)", mini, lambda m: m(**batch)),
        ("digits CNN (256 images)", cnn, lambda m: m(images[:256].to(next(m.parameters()).dtype))),
    ]
    header = f"{'model':28s} {'variant':18s} {'bytes':>12s} {'size x':>7s} {'latency ms':>11s} {'speed-up':>9s}  kernels"
    print(header)
    print("-" * len(header))
    for name, model, run in cases:
        base_bytes = base_ms = None
        for variant, m in variants(model).items():
            if variant == "torch.ao dyn int8" and not any(isinstance(x, torch.nn.Linear) for x in model.modules()):
                continue
            nbytes = ao_nbytes(m) if variant.startswith("torch.ao") else ql.eval.model_nbytes(m)
            with torch.inference_mode():
                ms = 1e3 * ql.eval.measure_latency(run, m, repeats=args.repeats)["median_s"]
                with ql.kernels.trace() as ran:
                    run(m)
            base_bytes = base_bytes or nbytes
            base_ms = base_ms or ms
            kernels = ", ".join(sorted(set(ran))) or ("fbgemm (torch.ao)" if variant.startswith("torch.ao") else "torch (float)")
            print(f"{name:28s} {variant:18s} {nbytes:12,d} {base_bytes / nbytes:6.2f}x {ms:11.2f} {base_ms / ms:8.2f}x  {kernels}")


if __name__ == "__main__":
    main()
