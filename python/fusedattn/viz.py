"""Alignment pictures: ``plot_alignment(weights, source, target, path)``.

matplotlib is an optional dependency (``pip install "fusedattn[viz]"``); it is only
imported when a plot is drawn.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

__all__ = ["plot_alignment"]


def _import_pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "fusedattn.viz.plot_alignment needs matplotlib, which is not installed; install the "
            "'viz' extra: pip install \"fusedattn[viz]\" (or: pip install matplotlib)") from e
    matplotlib.use("Agg", force=False)  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _labels(tokens: Union[str, Sequence[str]]) -> list[str]:
    # a string is a character sequence; a space is drawn as an open-box sign so it stays visible
    return ["\u2423" if t == " " else str(t) for t in tokens]


def _ticks(n: int, max_labels: int) -> list[int]:
    step = max(1, -(-n // max_labels))
    return list(range(0, n, step))


def _thinned(ticks: list[int]) -> str:
    if len(ticks) < 2 or ticks[1] == 1:
        return ""
    return f" (a label every {ticks[1]} tokens)"


def plot_alignment(weights, source: Union[str, Sequence[str]], target: Union[str, Sequence[str]],
                   path: str, *, title: Optional[str] = None, max_labels: int = 60, dpi: int = 150) -> str:
    """Draw an attention alignment as a labelled heatmap PNG, the classic translation figure.

    Args:
        weights: ``(Lt, Ls)`` weights of one sequence (a tensor or nested lists): row ``i``
            is the attention of output step ``i`` over the source. A tensor with leading
            size-1 dims (``(1, 1, Lt, Ls)`` from ``attention_weights``) is squeezed.
        source: the ``Ls`` source tokens (a string is a sequence of characters) on the x axis.
        target: the ``Lt`` output tokens on the y axis, first step at the top.
        path: where to write the PNG; returned.
        title: optional title.
        max_labels: at most this many tick labels per axis; longer sequences label every
            ``ceil(L / max_labels)``-th token (the heatmap itself keeps every cell).
        dpi: resolution of the PNG.

    Raises:
        ValueError: weights not 2-D after squeezing, or lengths that do not match.
        ImportError: matplotlib is missing (names the ``viz`` extra).
    """
    w = torch.as_tensor(weights).detach().to("cpu", torch.float32)
    while w.dim() > 2 and w.shape[0] == 1:
        w = w[0]
    if w.dim() != 2:
        raise ValueError(f"weights must be (Lt, Ls) for one sequence, got shape {tuple(w.shape)}")
    src, tgt = _labels(source), _labels(target)
    if (len(tgt), len(src)) != tuple(w.shape):
        raise ValueError(f"weights shape {tuple(w.shape)} must be (len(target), len(source)) = "
                         f"({len(tgt)}, {len(src)})")
    if isinstance(max_labels, bool) or not isinstance(max_labels, int) or max_labels < 1:
        raise ValueError(f"max_labels must be a positive int, got {max_labels!r}")
    plt = _import_pyplot()
    Lt, Ls = w.shape
    cell = 0.22 if max(Lt, Ls) <= max_labels else 10.0 / max(Lt, Ls, 1)
    width = min(24.0, max(4.0, Ls * cell + 1.8))
    height = min(24.0, max(3.5, Lt * cell + 1.5))
    fig, ax = plt.subplots(figsize=(width, height))
    try:
        im = ax.imshow(w.numpy(), cmap="gray_r", vmin=0.0, vmax=1.0, aspect="auto",
                       interpolation="nearest")
        xt, yt = _ticks(Ls, max_labels), _ticks(Lt, max_labels)
        fontsize = 8 if max(len(xt), len(yt)) <= 40 else 6
        ax.set_xticks(xt)
        ax.set_xticklabels([src[i] for i in xt], fontsize=fontsize, family="monospace")
        ax.set_yticks(yt)
        ax.set_yticklabels([tgt[i] for i in yt], fontsize=fontsize, family="monospace")
        ax.xaxis.tick_top()
        ax.xaxis.set_label_position("top")
        ax.tick_params(length=0)
        ax.set_xlabel("source" + _thinned(xt))
        ax.set_ylabel("output" + _thinned(yt))
        if title:
            ax.set_title(title, fontsize=10, pad=24)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="attention weight")
        fig.tight_layout()
        fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    finally:
        plt.close(fig)
    return path
