"""Weight-only LLM quantization on the tiny GPT: RTN, GPTQ (with and without act order), AWQ, AWQ+GPTQ at
4 and 3 bits and group sizes -1 / 128 / 32, all measured in this run.

    python bench/weight_only.py [--calib 8] [--eval-tokens 8192] [--quick]

Prints one table: bits/byte on the first --eval-tokens bytes of the validation split (lower is better),
the share of RTN's gap to FP32 each method closes, the time it took, and the real stored size of the
quantized layers (bits per weight: qlab's in-memory layout, and the same layers in an AutoGPTQ checkpoint,
scales and zero points counted). Then GPTQ's time per layer, side by side with AutoGPTQ 0.7.1's GPTQ class on
the same weight and Hessian (run in .venv-interop if it exists: `make interop` creates it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import qlab as ql

ROOT = Path(__file__).resolve().parents[1]


def methods(bits: int, gs: int) -> dict[str, object]:
    return {
        "RTN": ql.RTNConfig(qtype=bits, group_size=gs),
        "GPTQ": ql.GPTQConfig(qtype=bits, group_size=gs),
        "GPTQ act-order": ql.GPTQConfig(qtype=bits, group_size=gs, act_order=True),
        "AWQ": ql.AWQConfig(qtype=bits, group_size=gs),
        "AWQ+GPTQ": [ql.AWQConfig(qtype=bits, group_size=gs, quantize_weights=False), ql.GPTQConfig(qtype=bits, group_size=gs)],
    }


def gptq_timing(calib) -> list[list]:
    """GPTQ on single layers of the tiny GPT: qlab vs AutoGPTQ's GPTQ class, same W and H, best of 3."""
    model = ql.models.tiny_gpt()
    names = ["blocks.0.attn.c_attn", "blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj"]
    stats = ql.calibration.record(model, names, ql.gptq.HessianAccumulator, calib, progress=False)
    problems = []
    for n in names:
        for act_order in (False, True):
            problems.append({"name": n, "W": model.get_submodule(n).weight.detach().float(), "H": stats[n].input.H,
                             "opts": {"bits": 4, "sym": False, "group_size": 128, "act_order": act_order}})
    ours = []
    for p in problems:
        o = p["opts"]
        times = []
        for _ in range(4):  # the first is a warm-up
            t0 = time.perf_counter()
            ql.gptq.quantize_weight(p["W"], p["H"], o["bits"], o["group_size"], act_order=o["act_order"])
            times.append(time.perf_counter() - t0)
        ours.append(min(times[1:]))
    interop = ROOT / ".venv-interop" / "bin" / "python"
    theirs = [None] * len(problems)
    if interop.exists():
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(problems, f"{tmp}/p.pt")
            subprocess.run([str(interop), str(ROOT / "bench" / "_autogptq_time.py"), f"{tmp}/p.pt", f"{tmp}/o.json",
                            str(torch.get_num_threads())], check=True, capture_output=True)
            theirs = json.load(open(f"{tmp}/o.json"))
    else:
        print("(no .venv-interop: run `make interop` to time AutoGPTQ side by side)")
    rows = []
    for p, a, b in zip(problems, ours, theirs):
        N, K = p["W"].shape
        rows.append([p["name"], f"{N}x{K}", "yes" if p["opts"]["act_order"] else "no", f"{1000 * a:.1f}",
                     "-" if b is None else f"{1000 * b:.1f}", "-" if b is None else f"{a / b:.2f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=8, help="calibration batches of 8 x 128 bytes")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--quick", action="store_true", help="only group size 128")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    calib = ql.data.lm_calibration_batches(n_batches=args.calib, batch_size=8, seq_len=128, seed=0)
    val = ql.data.pydoc_corpus("val")

    def bpb(m) -> float:
        return ql.eval.perplexity(m, val, max_tokens=args.eval_tokens, batch_size=32, progress=False)["bits_per_token"]

    print(f"machine: {ql.eval.machine_info()}; {torch.get_num_threads()} threads; calibration {args.calib} x 8 x 128 "
          f"bytes; evaluation: first {args.eval_tokens} bytes of the validation split")
    fp32 = bpb(ql.models.tiny_gpt())
    rows = [["FP32", "-", "-", f"{fp32:.4f}", "-", "-", "32", "-"]]
    for bits in (4, 3):
        for gs in ((128,) if args.quick else (-1, 128, 32)):
            rtn = None
            for label, cfg in methods(bits, gs).items():
                model = ql.models.tiny_gpt()
                t0 = time.perf_counter()
                ql.quantize_(model, cfg, calib_data=calib)
                seconds = time.perf_counter() - t0
                score = bpb(model)
                rtn = score if label == "RTN" else rtn
                closed = "-" if label == "RTN" else f"{100 * (rtn - score) / (rtn - fp32):.0f} %"
                size = ql.gptq.storage(model)
                rows.append([label, bits, "row" if gs == -1 else gs, f"{score:.4f}", closed, f"{seconds:.1f}",
                             f"{size['qlab_bits_per_weight']:.2f}", f"{size['autogptq_bits_per_weight']:.2f}"])
                print(" | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
    print(ql.viz.markdown_table(["method", "bits", "group", "bits/byte", "RTN gap closed", "quantize s",
                                 "stored bits/weight (qlab)", "bits/weight (AutoGPTQ file)"], rows))
    print()
    print("GPTQ per layer (4 bit, g128), best of 3, one thread each, same W and H:")
    print(ql.viz.markdown_table(["layer", "N x K", "act order", "qlab ms", "AutoGPTQ ms", "qlab / AutoGPTQ"],
                                gptq_timing(calib[:4])))


if __name__ == "__main__":
    main()
