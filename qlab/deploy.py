"""Deployment measurements: where each quantized kernel sits on this machine's roofline, and what a model's
decode step costs per token.

The roofline (Williams et al. 2009, https://doi.org/10.1145/1498765.1498785) bounds a kernel of arithmetic
intensity I (FLOP per byte moved) by min(P, I x B): B the memory bandwidth, P the peak compute, both measured
here. A linear layer Y = X W^T with X (M, K), W (N, K) does 2 M N K FLOP and moves the weight's stored bytes
(codes and scales) plus the activations; decoding (M = 1) sits far left, where bytes decide the speed.

Every number comes from timing on the machine that runs the code (median of repeats); every point says which
kernel ran (`ql.kernels.trace`), since the same format can go through very different kernels.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .eval import median_ms, memory_bandwidth_gbps, model_nbytes


@dataclass(frozen=True)
class Roofline:
    """This machine's roofs: DRAM read bandwidth (GB/s), the FP32 GEMM throughput (GFLOP/s) and the int8 GEMM
    throughput (GOP/s, `ql.kernels.int_mm`: integer dot-product instructions give it a higher ceiling)."""

    bandwidth_gbps: float
    peak_gflops: float
    int8_peak_gops: float = float("nan")

    @property
    def ridge(self) -> float:
        """The intensity (FLOP/byte) where the roofs meet: below it a kernel waits on memory."""
        return self.peak_gflops / self.bandwidth_gbps

    def attainable(self, intensity: float) -> float:
        """min(P, I x B) in GFLOP/s, with P the FP32 roof."""
        return min(self.peak_gflops, intensity * self.bandwidth_gbps)

    def memory_roof(self, intensity: float) -> float:
        """I x B in GFLOP/s: the most a kernel can do if every byte it moves comes from DRAM."""
        return intensity * self.bandwidth_gbps


def measure_roofline(size: int = 2048, tokens: int = 512, repeats: int = 5) -> Roofline:
    """B from a sum over a 256 MiB buffer (reads every byte once); the compute roofs from an FP32 and an int8
    (tokens x size) @ (size x size) on the fastest kernels torch and qlab have."""
    if size < 1 or tokens < 1:
        raise ValueError(f"size={size} and tokens={tokens} must be positive")
    bandwidth = memory_bandwidth_gbps(kind="read", repeats=repeats)
    W, X = torch.randn(size, size), torch.randn(tokens, size)
    flops = 2 * tokens * size * size
    ms = median_ms(torch.nn.functional.linear, X, W, warmup=1, repeats=repeats)
    A8 = torch.randint(-127, 128, (tokens, size), dtype=torch.int8)
    B8 = torch.randint(-127, 128, (size, size), dtype=torch.int8)
    ms8 = median_ms(kernels.int_mm, A8, B8, warmup=1, repeats=repeats)
    return Roofline(bandwidth, flops / (ms / 1e3) / 1e9, flops / (ms8 / 1e3) / 1e9)


def _kernel_name(fn, *args, **kwargs) -> str:
    """The distinct qlab kernels one call runs, or torch's float GEMM where no qlab op ran."""
    return " + ".join(dict.fromkeys(kernels.kernels_run(fn, *args, **kwargs))) or "torch F.linear"


def linear_points(configs: dict, in_features: int = 2048, out_features: int = 2048, tokens: tuple[int, ...] = (1, 64),
                  repeats: int = 5, seed: int = 0) -> list[dict]:
    """Time one linear layer under each quantization config, at each number of tokens M.

    Args:
        configs: {label: config, a list of configs (a recipe), or None for the FP32 layer}.
    Returns:
        one dict per (label, M): label, tokens, ms, gflops, intensity (2 M N K / (stored weight bytes + the
        activations' bytes in and out in FP32)), weight_bytes, bits_per_weight, kernel (what ran).
    """
    from .api import quantize_

    g = torch.Generator().manual_seed(seed)
    base = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(torch.randn(out_features, in_features, generator=g) * in_features**-0.5)
    rows = []
    for label, config in configs.items():
        layer = copy.deepcopy(base) if config is None else quantize_(copy.deepcopy(base), config)
        layer.eval()
        weight_bytes = model_nbytes(layer)
        for M in tokens:
            x = torch.randn(M, in_features, generator=g)
            ms = median_ms(layer, x, warmup=2, repeats=repeats)
            flops = 2 * M * in_features * out_features
            rows.append(dict(label=label, tokens=M, ms=ms, gflops=flops / (ms / 1e3) / 1e9,
                             intensity=flops / (weight_bytes + 4 * M * (in_features + out_features)),
                             weight_bytes=weight_bytes, bits_per_weight=8 * weight_bytes / (in_features * out_features),
                             kernel=_kernel_name(layer, x)))
    return rows


@torch.inference_mode()
def decode_profile(model: nn.Module, batch: int = 1, prompt_len: int = 64, new_tokens: int = 32,
                   repeats: int = 3, seed: int = 0) -> dict:
    """Prefill `prompt_len` random tokens, then decode `new_tokens` one at a time with a KV cache.

    The model must take forward(idx, cache=...) like the tiny GPT (`ql.kv_cache`). Returns the median over
    `repeats` runs of: prefill_ms, ms_per_token (decode steps), tokens_per_s (batch x decode steps per
    second), the model's stored bytes, and kernel: the qlab kernels of one decode step (`ql.kernels.trace`).
    """
    from .kv_cache import KVCache

    block = getattr(getattr(model, "config", None), "block_size", None)
    if block is not None and prompt_len + new_tokens > block:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's context "
                         f"block_size={block}; shorten one of them")
    if batch < 1 or prompt_len < 1 or new_tokens < 1:
        raise ValueError(f"batch={batch}, prompt_len={prompt_len} and new_tokens={new_tokens} must be positive")
    vocab = getattr(model.config, "vocab_size", 256)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len + new_tokens), generator=g)
    n_layer = len(model.blocks)
    prefill, decode = [], []
    warm = KVCache(n_layer)  # warm-up (kernel layouts derived): one token, then a decode step whose kernels are named
    model(ids[:, :1], cache=warm)
    kernel = _kernel_name(model, ids[:, 1:2], cache=warm)
    for _ in range(repeats):
        cache = KVCache(n_layer)
        t0 = time.perf_counter()
        model(ids[:, :prompt_len], cache=cache)
        t1 = time.perf_counter()
        for t in range(prompt_len, prompt_len + new_tokens):
            model(ids[:, t:t + 1], cache=cache)
        t2 = time.perf_counter()
        prefill.append(1e3 * (t1 - t0))
        decode.append(1e3 * (t2 - t1) / new_tokens)
    ms = sorted(decode)[len(decode) // 2]
    return dict(prefill_ms=sorted(prefill)[len(prefill) // 2], ms_per_token=ms, tokens_per_s=batch * 1e3 / ms,
                model_bytes=model_nbytes(model), kernel=kernel)


def _repository_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def llama_cpp_python() -> str | None:
    """A Python interpreter that can import llama_cpp (llama.cpp's Python binding), or None.

    Looked for in order: $QLAB_LLAMA_PYTHON, this interpreter, and the interop environment that `make interop`
    builds next to this checkout (.venv-interop, where llama-cpp-python is compiled from source)."""
    import os
    import subprocess
    import sys

    candidates = [os.environ.get("QLAB_LLAMA_PYTHON"), sys.executable,
                  str(_repository_root() / ".venv-interop" / "bin" / "python")]
    for python in candidates:
        if python and os.path.exists(python):
            probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
            if probe.returncode == 0:
                return python
    return None


def llama_cpp_bench(python: str, qtypes: tuple[str, ...] = ("F32", "Q8_0", "Q4_0"), threads: int = 1,
                    prompt: int = 64, decode: int = 64, repeats: int = 5, timeout: float = 600) -> dict:
    """Run bench/llama_cpp.py (llama.cpp against qlab on the tiny GPT's GGUF files, same bytes, same threads) with
    `python` (see llama_cpp_python) and return its JSON: machine, versions and one row per (type, engine) with
    decode and prompt tokens/s and the kernels that ran. llama.cpp's own log lines stay in the subprocess."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    script = _repository_root() / "bench" / "llama_cpp.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} is missing: llama_cpp_bench runs the benchmark of a qlab checkout")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "llama_cpp.json"
        cmd = [python, str(script), "--qtypes", *qtypes, "--threads", str(threads), "--prompt", str(prompt),
               "--decode", str(decode), "--repeats", str(repeats), "--json", str(out)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0:
            raise RuntimeError(f"bench/llama_cpp.py failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
        return json.loads(out.read_text())


__all__ = ["Roofline", "measure_roofline", "linear_points", "decode_profile", "llama_cpp_python", "llama_cpp_bench"]
