"""qlab's W8A8 models next to ONNX Runtime's own int8 quantizers, measured side by side in one run.

    python bench/onnx_runtime.py [--cases digits_cnn tiny_gpt] [--repeats 20] [--eval-tokens 4096] [--threads N]
                                 [--json out.json]

(Not bench/onnx.py: a script's folder comes first on sys.path, so that name would shadow the onnx package.)

For the digits CNN (static W8A8, ql.Int8StaticConfig) and the tiny GPT (dynamic per-token W8A8,
ql.Int8DynamicConfig): FP32 and qlab's W8A8 model in torch (with the qlab kernel that ran), then in ONNX
Runtime the FP32 export, qlab's QDQ export (ql.export.to_onnx), quantize_static with MinMax / Entropy /
Percentile calibration and quantize_dynamic, each on the same layers qlab quantized. Prints one table: the
accuracy (digits test accuracy; tiny GPT bits/byte on the validation bytes), top-1 agreement with FP32 torch on
the timed batch, the median latency of that batch, the model's bytes, and the compute ops ONNX Runtime runs after
its fusions. All of it is ql.export.onnx_comparison, which chapter 10 calls too.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import qlab as ql


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(ql.export.ONNX_CASES), choices=list(ql.export.ONNX_CASES))
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per route (the median is reported)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="validation bytes for the tiny GPT's bits/byte")
    ap.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the rows and the machine here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = ql.eval.machine_info()
    print(f"machine: {machine}\n")
    rows = []
    for case in args.cases:
        t0 = time.perf_counter()
        rows += ql.export.onnx_comparison(case, repeats=args.repeats, eval_tokens=args.eval_tokens)
        print(f"{case}: measured in {time.perf_counter() - t0:.0f} s")
    print()
    print(ql.export.onnx_comparison_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
