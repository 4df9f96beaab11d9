"""One 4096 x 4096 linear layer: FP32 vs qlab's W8A8 QuantLinear vs torch.ao dynamic int8, and int4 weight-only
against the memory-bandwidth floor, all measured side by side in one run.

    python bench/linear.py [--device cpu|cuda] [--batches 1 16 256] [--repeats 5] [--threads N]

Table 1 (W8A8): median latency per call at each batch size, speed-up relative to FP32 in the same run,
and which kernel ran (ql.kernels.trace). torch.ao's quantize_dynamic (fbgemm on x86) is the PyTorch
baseline; it quantizes activations per tensor at run time.

Table 2 (weight-only, batch 1): a batch-1 matmul must read every weight byte once, so
bytes / memory bandwidth (ql.eval.memory_bandwidth_gbps, measured here) is a floor on its latency.
Achieved GB/s = bytes / latency; "of floor" = floor / latency (1.0 = as fast as memory allows).
"""

from __future__ import annotations

import argparse
import copy
import platform
import warnings

import torch

import qlab as ql
from qlab import kernels
from qlab.api import Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig, quantize_


def ms(fn, x, repeats: int) -> float:
    with torch.inference_mode():
        return 1e3 * ql.eval.measure_latency(fn, x, warmup=1, repeats=repeats)["median_s"]


def which_kernels(fn, x) -> str:
    with torch.inference_mode(), kernels.trace() as ran:
        fn(x)
    return ", ".join(sorted(set(ran))) or "torch (float)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--features", type=int, default=4096)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev, K = args.device, args.features
    name = torch.cuda.get_device_name() if dev == "cuda" else f"{platform.machine()} {platform.processor() or ''}".strip()
    print(f"machine: {name}, {args.threads} threads, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")

    fp32 = torch.nn.Sequential(torch.nn.Linear(K, K)).to(dev).eval()
    variants = {"fp32 nn.Linear": fp32, "qlab W8A8 dynamic": quantize_(copy.deepcopy(fp32), Int8DynamicConfig())}
    if dev == "cpu":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao prints a deprecation notice
            variants["torch.ao dynamic int8"] = quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)

    print(f"\nW8A8, {K} x {K} linear (median of {args.repeats})")
    header = f"{'batch':>5s}  {'variant':22s} {'ms':>9s} {'vs fp32':>8s}  kernel"
    print(header + "\n" + "-" * (len(header) + 20))
    for M in args.batches:
        x = torch.randn(M, K, device=dev)
        base = None
        for label, model in variants.items():
            t = ms(model, x, args.repeats)
            base = base or t
            kernel = "fbgemm (torch.ao)" if label.startswith("torch.ao") else which_kernels(model, x)
            print(f"{M:5d}  {label:22s} {t:9.3f} {base / t:7.2f}x  {kernel}")

    bandwidth = ql.eval.memory_bandwidth_gbps(device=dev)
    print(f"\nweight-only, batch 1, measured memory bandwidth {bandwidth:.1f} GB/s")
    header = f"{'variant':26s} {'MB':>7s} {'ms':>9s} {'floor ms':>9s} {'GB/s':>7s} {'of floor':>9s}  kernel"
    print(header + "\n" + "-" * (len(header) + 20))
    x = torch.randn(1, K, device=dev)
    weight_only = {
        "fp32 nn.Linear": fp32,
        "qlab int8 weight-only": quantize_(copy.deepcopy(fp32), Int8WeightOnlyConfig()),
        "qlab int4 weight-only g128": quantize_(copy.deepcopy(fp32), Int4WeightOnlyConfig(group_size=128)),
    }
    for label, model in weight_only.items():
        nbytes = ql.eval.model_nbytes(model)  # codes + scales (+ bias): every byte a GEMV must read
        t = ms(model, x, max(args.repeats, 20))
        floor = 1e3 * nbytes / (bandwidth * 1e9)
        achieved = nbytes / (t / 1e3) / 1e9
        print(f"{label:26s} {nbytes / 1e6:7.2f} {t:9.3f} {floor:9.3f} {achieved:7.1f} {floor / t:8.0%}  {which_kernels(model, x)}")


if __name__ == "__main__":
    main()
