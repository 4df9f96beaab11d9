"""Offline data for the course: text for the Tiny GPT, batches for calibration and evaluation.

Nothing here touches the network. The Tiny GPT's corpus is the Python documentation that ships with
every CPython install (`pydoc_data.topics`: the language reference's topic pages, about 465 KB of
English). Its split is by topic, fixed and documented: every 10th topic (sorted by name, starting at the
6th) is validation, the rest is training, so validation text is never seen in training.
"""

from __future__ import annotations

import torch

VAL_EVERY = 10
VAL_OFFSET = 5


def pydoc_topics() -> dict[str, str]:
    """The standard library's documentation topics, name -> text."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def pydoc_corpus(split: str = "train") -> torch.Tensor:
    """The Tiny GPT corpus as a 1-D uint8 tensor of UTF-8 bytes.

    Args:
        split: "train" or "val" (fixed topic-level split, see the module docstring).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    names = list(pydoc_topics())
    keep = [n for i, n in enumerate(names) if (i % VAL_EVERY == VAL_OFFSET) == (split == "val")]
    text = "\n\n".join(pydoc_topics()[n] for n in keep)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


# A second domain for fine-tuning (chapter 7): Python source code of pure-Python standard-library modules,
# split by module. The Tiny GPT was trained on English documentation, never on code.
SOURCE_MODULES = {
    "train": ("textwrap", "string", "fractions", "colorsys", "heapq", "bisect", "shlex", "fnmatch", "glob", "calendar",
              "dataclasses", "functools", "statistics", "copy", "pprint", "difflib", "numbers", "graphlib", "contextlib",
              "enum", "ipaddress", "operator", "sched", "secrets", "timeit", "tokenize", "weakref", "abc", "base64",
              "cmd", "codeop", "filecmp", "getopt", "gettext", "hmac", "keyword", "linecache", "mimetypes", "netrc",
              "optparse", "posixpath", "queue", "reprlib", "runpy", "selectors", "shutil", "stat", "tempfile",
              "traceback", "types", "warnings", "zipapp"),
    "val": ("json.decoder", "json.encoder", "csv", "random", "argparse"),
}


def python_source(split: str = "train") -> torch.Tensor:
    """Python source code of standard-library modules as a 1-D uint8 tensor of UTF-8 bytes (no network).

    The files are read from this interpreter's standard library (nothing is imported), in the fixed
    order of SOURCE_MODULES[split]; "train" and "val" are different modules. The exact bytes follow the
    Python version, so numbers computed on them are recomputed on each machine.
    """
    import os
    import sysconfig

    if split not in SOURCE_MODULES:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    stdlib = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in SOURCE_MODULES[split]:
        path = os.path.join(stdlib, *name.split(".")) + ".py"
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: this Python ships without the source of {name!r}")
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    return torch.frombuffer(bytearray("\n\n".join(texts).encode("utf-8")), dtype=torch.uint8).clone()


def _prose(split: str) -> set[str]:
    import re

    text = pydoc_corpus(split).numpy().tobytes().decode("utf-8")
    prose = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()-]+")
    pool = set()
    for paragraph in text.split("\n\n"):
        for sent in " ".join(paragraph.split()).split(". "):
            sent = sent.strip().rstrip(".")
            if not sent.endswith(":") and prose.fullmatch(sent) and 6 <= len(sent.split()) <= 30:
                pool.add(sent + ".")
    return pool


def sentences(n: int = 32, split: str = "train", seed: int = 0) -> list[str]:
    """n English sentences from the pydoc text (prose only: no code, no tables), for calibrating an encoder.

    Sentences are split at '. ' and kept when they have 6..30 words, start with a capital letter and hold
    only letters, digits and light punctuation; a seeded shuffle picks n. A few sentences recur in several
    topics: "val" leaves out every sentence that also occurs in "train", so the two never overlap.
    """
    import random

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    pool = _prose(split) - (_prose("train") if split == "val" else set())
    pool = sorted(pool)
    if n > len(pool):
        raise ValueError(f"only {len(pool)} prose sentences in the {split} split; ask for at most that many")
    random.Random(seed).shuffle(pool)
    return pool[:n]


def lm_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `data`: inputs x (B, T) and next-byte targets y (B, T), int64."""
    if data.numel() <= seq_len + 1:
        raise ValueError(f"data has {data.numel()} tokens; need more than seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s : s + seq_len] for s in starts.tolist()]).long()  # (B, T)
    y = torch.stack([data[s + 1 : s + 1 + seq_len] for s in starts.tolist()]).long()  # (B, T)
    return x, y


def lm_calibration_batches(
    n_batches: int = 8, batch_size: int = 8, seq_len: int = 128, seed: int = 0
) -> list[torch.Tensor]:
    """Deterministic calibration inputs for the Tiny GPT: `n_batches` tensors (B, T) of training bytes."""
    g = torch.Generator().manual_seed(seed)
    data = pydoc_corpus("train")
    return [lm_batch(data, batch_size, seq_len, g)[0] for _ in range(n_batches)]


def digits_split(split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as images (N, 1, 8, 8) in [0, 1] and labels (N,), split 80/20.

    The split is stratified by class with a fixed seed, so train and test are the same on every machine.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in range(10):  # stratified: 20 % of every class goes to test
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[: round(0.2 * len(idx))])
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[torch.cat(test_idx)] = True
    keep = is_test if split == "test" else ~is_test
    return images[keep], labels[keep]


def digits_calibration_batches(n_batches: int = 8, batch_size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic calibration images (B, 1, 8, 8) drawn from the digits training split."""
    x, _ = digits_split("train")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    return [x[perm[i * batch_size : (i + 1) * batch_size]] for i in range(n_batches)]


def wikitext2(split: str = "test") -> str:
    """WikiText-2 (raw) as one string, for users who have a dataset hub. Never used by the book or tests.

    Needs the `datasets` package and network access (or its local cache). The lines are joined with
    blank lines, the convention behind most published WikiText-2 perplexities; tokenize the string with
    your model's tokenizer and pass the ids to `ql.eval.perplexity`.
    """
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError("WikiText-2 needs the `datasets` package: pip install datasets (and network access)") from err
    try:
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as err:  # datasets raises several types for "offline / not cached"
        raise FileNotFoundError(
            f"could not load WikiText-2 ({type(err).__name__}: {err}); it needs network access or a local "
            "datasets cache. The book uses ql.data.pydoc_corpus() instead, which is always available."
        ) from err
    return "\n\n".join(rows["text"])
