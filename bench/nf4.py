"""NF4 layers measured side by side in one run: storage per parameter and the linear_4bit kernels.

    python bench/nf4.py [--size 4096] [--threads 1]

Prints (1) the bytes and bits per parameter of a size x size weight in FP32, NF4 and NF4 with double
quantization, and (2) the median time of one NF4Linear forward at several batch sizes for every kernel of
`linear_4bit` that accepts the operands (qlab's pure-torch reference, bitsandbytes' matmul_4bit), with the
relative difference from the reference, and bitsandbytes' own bf16 path for comparison.
"""

from __future__ import annotations

import argparse

import torch

import qlab as ql
from qlab import kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {ql.eval.machine_info()}")
    lin = torch.nn.Linear(args.size, args.size, bias=False)
    print(f"\n| {args.size} x {args.size} weight | bytes | bits per parameter |\n|---|---|---|")
    print(f"| FP32 | {lin.weight.numel() * 4:,} | 32 |")
    for dq in (False, True):
        t = ql.nf4.quantize_4bit(lin.weight.detach(), "nf4", 64, dq)
        print(f"| NF4, blocks of 64{' + double quantization' if dq else ''} | {t.nbytes:,} | {t.bits_per_param:.3f} |")

    layer = ql.NF4Linear.from_float(lin, "nf4", 64, double_quant=True)
    t, cache = layer.weight4bit(), layer._kernel_cache
    print("\n| M | kernel | ms | relative difference from the reference | same kernel, bf16 input ms |\n|---|---|---|---|---|")
    for M in (1, 16, 256):
        x = torch.randn(M, args.size)
        ref = ql.nf4.linear_4bit(x, t)
        for k in kernels.registered("linear_4bit"):
            if not k.supports(x, t, cache):
                continue
            with torch.no_grad():
                y = kernels.run(k, x, t, cache)
                ms = ql.eval.median_ms(lambda v: kernels.run(k, v, t, cache), x, repeats=5)
                xb = x.bfloat16()
                bf16 = float("nan")
                if k.supports(xb, t, cache):
                    bf16 = ql.eval.median_ms(lambda v: kernels.run(k, v, t, cache), xb, repeats=5)
            print(f"| {M} | {k.name} | {ms:.1f} | {float((y - ref).norm() / ref.norm()):.1e} | {bf16:.1f} |")

if __name__ == "__main__":
    main()
