"""Load any Hugging Face causal language model by hub name or local path (for users who have a hub).

Nothing in the book or the tests needs a hub: the tests build a tiny model from a config, save it to a
folder and load it back through this same code path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_causal_lm(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A transformers causal LM and its tokenizer (None if the folder has none), in eval mode.

    Args:
        name_or_path: a hub id such as "facebook/opt-125m", or a folder written by `save_pretrained`.
        dtype: parameter dtype, e.g. torch.float16 on a GPU.
        device: where to put the model.

    Raises:
        FileNotFoundError: the model is neither a local folder nor in the local hub cache while offline,
            or the hub cannot be reached; the message says how to get it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_path).expanduser()
    source = str(local) if local.exists() else str(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=_offline() and not local.exists())
    except OSError as err:
        where = "offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set)" if _offline() else "and the hub could not be reached"
        raise FileNotFoundError(
            f"cannot load causal LM {str(name_or_path)!r}: it is not a local folder, not in the local Hugging Face "
            f"cache, {where}. Download it on a machine with access (`huggingface-cli download {name_or_path}`) and "
            f"pass the folder path, or unset HF_HUB_OFFLINE. Original error: {err}"
        ) from err
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    tokenizer = None
    if not local.exists() or any((local / f).exists() for f in tokenizer_files):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=_offline() and not local.exists())
        except (OSError, ValueError, TypeError):
            tokenizer = None  # some checkpoints ship weights only
    return model.to(device).eval(), tokenizer
