"""Matplotlib helpers the chapters share: histograms, outlier heat maps, error-vs-bits curves."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import torch

from . import metrics


def histogram(x: torch.Tensor, ax=None, bins: int = 200, title: str = "", log: bool = True, label: str | None = None):
    """Histogram of all values of `x` (log-count by default, so rare outliers stay visible)."""
    ax = ax or plt.gca()
    ax.hist(x.detach().float().reshape(-1).numpy(), bins=bins, log=log, alpha=0.7, label=label)
    ax.set_xlabel("value")
    ax.set_ylabel("count (log)" if log else "count")
    ax.set_title(title)
    return ax


def outlier_heatmap(x: torch.Tensor, ax=None, title: str = "|activation| per token and channel"):
    """Heat map of |x| for x of shape (tokens, channels): outlier channels show as bright columns."""
    if x.dim() != 2:
        raise ValueError(f"outlier_heatmap takes a (tokens, channels) tensor, got shape {tuple(x.shape)}; reshape first")
    ax = ax or plt.gca()
    im = ax.imshow(x.detach().abs().float().numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("channel")
    ax.set_ylabel("token")
    ax.set_title(title)
    plt.colorbar(im, ax=ax)
    return ax


def channel_absmax(x: torch.Tensor, ax=None, title: str = "max |value| per channel"):
    """Bar plot of the per-channel max |x| over all leading axes (the usual outlier diagnostic)."""
    ax = ax or plt.gca()
    amax = x.detach().abs().float().reshape(-1, x.shape[-1]).amax(0)
    ax.bar(range(len(amax)), amax.numpy(), width=1.0)
    ax.set_xlabel("channel")
    ax.set_ylabel("max |value|")
    ax.set_title(title)
    return ax


def error_vs_bits(
    x: torch.Tensor,
    quantizers: dict[str, Callable[[torch.Tensor, int], torch.Tensor]],
    bits: Sequence[int] = (2, 3, 4, 5, 6, 7, 8),
    ax=None,
    metric: str = "sqnr_db",
):
    """Plot SQNR (or MSE) of each quantizer `fn(x, bits) -> x_hat` against bit width; returns the table."""
    ax = ax or plt.gca()
    fn = getattr(metrics, metric)
    table = {}
    for name, quantizer in quantizers.items():
        ys = [fn(x, quantizer(x, b)) for b in bits]
        table[name] = ys
        ax.plot(list(bits), ys, marker="o", label=name)
    ax.set_xlabel("bits")
    ax.set_ylabel("SQNR (dB)" if metric == "sqnr_db" else metric)
    if metric == "mse":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return table


def _cell(value) -> str:
    """A table cell's text: `|` escaped (it would end the cell), newlines folded."""
    return " ".join(str(value).split("\n")).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A pipe table: cells may hold any text (a `|` is escaped), every row has the header's width."""
    if not header:
        raise ValueError("a table needs at least one column in its header")
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells, the header {len(header)}: {list(row)}")
    lines = ["| " + " | ".join(_cell(h) or " " for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def show_markdown(text: str, top_level: int = 1) -> None:
    """Display Markdown in a notebook (print it elsewhere), its headings moved so the first is at top_level
    (a model card's "# Title" shown inside a page becomes "### Title" with top_level=3)."""
    levels = [len(m.group(1)) for m in re.finditer(r"^(#{1,6}) ", text, flags=re.M)]
    shift = top_level - min(levels) if levels else 0
    if shift:
        text = re.sub(r"^(#{1,6}) ", lambda m: "#" * min(6, max(1, len(m.group(1)) + shift)) + " ", text, flags=re.M)
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display

        if get_ipython() is not None:
            display(Markdown(text))
            return
    except ImportError:
        pass
    print(text)


def table(header: list[str], rows: list[list]) -> None:
    """Show rows as a Markdown table in a notebook (plain text elsewhere)."""
    show_markdown(markdown_table(header, rows))
