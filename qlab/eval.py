"""Evaluation: perplexity, accuracy, embedding fidelity, size and latency, measured honestly."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    data: torch.Tensor,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Perplexity of a causal LM on a 1-D token tensor, with a sliding window.

    Protocol (the one Hugging Face documents for fixed-length models): windows of `seq_len` tokens
    start every `stride` tokens; in each window only the tokens not already scored by the previous window
    count (the last `seq_len - stride` context tokens are free), so every token after the first is
    scored exactly once with at least `seq_len - stride` tokens of context (except near the start).
    `stride = seq_len` is the fast, context-starved variant; the default is `seq_len // 2`.

    The model must map (B, T) int64 tokens to (B, T, vocab) logits.

    Returns:
        {"nll": mean nats per token, "perplexity": exp(nll), "bits_per_token": nll / ln 2, "tokens": count}.
        For byte-level models bits_per_token is bits-per-byte.
    """
    if seq_len is None:
        config = getattr(model, "config", None)
        seq_len = getattr(config, "seq_len", None) or getattr(config, "block_size", None)  # nanoGPT's name
        if seq_len is None:
            raise ValueError("pass seq_len=...: the model has no config.seq_len (or nanoGPT's config.block_size)")
    stride = stride or seq_len // 2
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride={stride} must be in (0, seq_len={seq_len}]")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer: the windows scored per forward pass, "
                         "e.g. 16 (lower it if memory runs out)")
    data = data.reshape(-1).long()
    if max_tokens is not None:
        data = data[: max_tokens + 1]
    if data.numel() < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    # token ids index the embedding and the logits: check them against the vocabulary now if the model says
    # its size (config.vocab_size), else against the logits' width after the first forward pass
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    _check_token_ids(data, vocab_size)
    # (start, first scored position inside the window) for every window
    windows, prev_end = [], 0
    for start in range(0, data.numel() - 1, stride):
        end = min(start + seq_len, data.numel() - 1)
        windows.append((start, end, prev_end - start))  # score positions >= prev_end
        prev_end = end
        if end == data.numel() - 1:
            break
    with evaluating(model):
        _score_windows(model, data, windows, batch_size, progress, totals := [0.0, 0], vocab_size)
    total_nll, total_tokens = totals
    nll = total_nll / total_tokens
    return {"nll": nll, "perplexity": math.exp(nll), "bits_per_token": nll / math.log(2), "tokens": total_tokens}


def _check_token_ids(data: torch.Tensor, vocab_size: int | None) -> None:
    """Raise if a token id is negative or (when vocab_size is known) not below vocab_size."""
    bad = data < 0 if vocab_size is None else (data < 0) | (data >= vocab_size)
    if bool(bad.any()):
        i, n = int(bad.nonzero()[0, 0]), int(bad.sum())
        what = "is negative" if vocab_size is None else f"is outside the model's vocabulary [0, {vocab_size})"
        raise ValueError(f"token id {int(data[i])} at position {i} {what} ({n} such id{'s' if n > 1 else ''} in data); "
                         "tokenize with the model's own tokenizer (the tiny GPT reads bytes: ids 0..255)")


def _score_windows(model, data, windows, batch_size: int, progress: bool, totals: list,
                   vocab_size: int | None = None) -> None:
    """Add the summed NLL and the number of scored tokens of every window to totals[0], totals[1]."""
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        chunk = windows[i : i + batch_size]
        for T in sorted({e - s for s, e, _ in chunk}):  # the last window may be shorter
            group = [(s, e, k) for s, e, k in chunk if e - s == T]
            x = torch.stack([data[s:e] for s, e, _ in group])  # (B, T)
            y = torch.stack([data[s + 1 : e + 1] for s, e, _ in group])  # (B, T)
            logp = torch.log_softmax(model(x).float(), dim=-1)  # (B, T, vocab)
            if vocab_size is None:  # the model did not say its vocabulary: the logits do
                vocab_size = logp.shape[-1]
                _check_token_ids(data, vocab_size)
            nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (B, T)
            for row, (_, _, k) in enumerate(group):
                totals[0] += float(nll[row, max(k, 0) :].sum())
                totals[1] += T - max(k, 0)


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode inside the block; the model's training mode comes back afterwards, even if it raised.
    A plain function (e.g. `lambda x: hf_model(x).logits`) has no mode and is passed through."""
    if not isinstance(model, torch.nn.Module):
        yield model
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on inputs `x` (N, ...) and labels `y` (N,)."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)} labels")
    with evaluating(model):
        correct = sum(int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
                      for i in range(0, len(x), batch_size))
    return correct / len(y)


@torch.no_grad()
def embedding_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """How close a quantized encoder's embeddings stay to the FP32 model's, on the same sentences.

    Args:
        reference, candidate: (N, D) embeddings of the same N sentences.

    Returns:
        {"cosine_mean", "cosine_min"}: per-sentence cosine similarity between the two embeddings, and
        {"retrieval_top1"}: the fraction of sentences whose nearest other sentence (by cosine) is the same
        under both models — does search still return the same result?
    """
    if reference.shape != candidate.shape or reference.dim() != 2:
        raise ValueError(f"expected two (N, D) tensors of equal shape, got {tuple(reference.shape)} and {tuple(candidate.shape)}")
    ref = torch.nn.functional.normalize(reference.float(), dim=-1)
    cand = torch.nn.functional.normalize(candidate.float(), dim=-1)
    cos = (ref * cand).sum(-1)  # (N,)
    out = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    if len(ref) > 1:
        eye = torch.eye(len(ref), dtype=torch.bool)
        nn_ref = (ref @ ref.T).masked_fill(eye, -2).argmax(-1)  # nearest neighbour of each sentence
        nn_cand = (cand @ cand.T).masked_fill(eye, -2).argmax(-1)
        out["retrieval_top1"] = float((nn_ref == nn_cand).float().mean())
    return out


def model_nbytes(model: torch.nn.Module) -> int:
    """Bytes of real storage a model holds: every parameter and buffer, packed codes and scales included.

    Quantized modules keep their packed codes and scales as buffers (or QTensors), so this counts what
    would be written to disk, not a theoretical bits-per-weight. Tied parameters are counted once.
    """
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    for module in model.modules():  # QTensor attributes held outside parameters/buffers
        for value in vars(module).values():
            nbytes = getattr(value, "nbytes", None)
            if hasattr(value, "qdata") and isinstance(nbytes, int):
                total += nbytes
    return total


def measure_latency(fn, *args, warmup: int = 3, repeats: int = 10, **kwargs) -> dict[str, float]:
    """Wall-clock time of fn(*args, **kwargs): `warmup` untimed calls, then `repeats` timed ones.

    Returns median, min and max seconds per call. The median is what the book reports: it ignores the
    occasional call slowed by another process. CUDA work is synchronised before each clock read.
    """
    import statistics
    import time

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def throughput(fn, items_per_call: int, *args, **kwargs) -> float:
    """Items per second (tokens, images, sentences) of fn(*args), from its median latency."""
    return items_per_call / measure_latency(fn, *args, **kwargs)["median_s"]


def memory_bandwidth_gbps(nbytes: int = 256 * 2**20, repeats: int = 10, device: str = "cpu",
                          kind: str = "copy") -> float:
    """Measured memory bandwidth in GB/s over a buffer much larger than the last-level cache.

    kind="copy": a tensor copy reads and writes `nbytes` each (2 * nbytes moved); kind="read": a sum
    reads `nbytes` once. A batch-1 GEMV only reads its weight, so `read` gives its floor: bytes / read GB/s.
    """
    if kind not in ("copy", "read"):
        raise ValueError(f"kind={kind!r} must be 'copy' (read + write) or 'read' (a sum over the buffer)")
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    if kind == "read":
        t = measure_latency(torch.sum, src, warmup=2, repeats=repeats)["median_s"]
        return nbytes / t / 1e9
    dst = torch.empty_like(src)
    t = measure_latency(dst.copy_, src, warmup=2, repeats=repeats)["median_s"]
    return 2 * nbytes / t / 1e9


def median_ms(fn, *args, warmup: int = 1, repeats: int = 5, **kwargs) -> float:
    """Median milliseconds per call of fn(*args, **kwargs) under torch.inference_mode (see measure_latency)."""
    with torch.inference_mode():
        return 1e3 * measure_latency(fn, *args, warmup=warmup, repeats=repeats, **kwargs)["median_s"]


def cpu_name() -> str:
    """The CPU model: platform.processor() is often empty on Linux, so read /proc/cpuinfo first."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    """One line that says where numbers were measured: CPU, cores, torch threads, torch and its CPU kernels."""
    import os
    import platform

    from .kernels import cpu as cpu_kernels

    return (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} logical cores, {torch.get_num_threads()} torch "
            f"thread(s), torch {torch.__version__}, CPU capability {cpu_kernels.capability()}")
