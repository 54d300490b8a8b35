"""Figures for the sequence experiments (matplotlib, Agg): attention maps, confusion
matrices, tag strips. Each takes plain numbers and labels, saves a PNG, returns its path."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxnets.plots import save_figure  # noqa: E402

__all__ = ["attention_maps", "confusion"]


def attention_maps(
    examples: Sequence[tuple[Sequence[str], Sequence[str], np.ndarray]],
    path: str | os.PathLike,
    title: str | None = None,
    cols: int = 3,
) -> Path:
    """One heat map per ``(source symbols, output symbols, weights (out, src))``.

    Rows are output steps (what the decoder emitted), columns source positions; a row
    sums to one. A monotone diagonal is what g2p attention should learn.
    """
    n = len(examples)
    if n == 0:
        raise ValueError("examples: expected at least one (source, output, weights) triple")
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, (src, out, w) in zip(axes.ravel(), examples, strict=False):
        w = np.asarray(w, dtype=float)
        if w.shape != (len(out), len(src)):
            raise ValueError(
                f"weights: expected shape ({len(out)}, {len(src)}) for {''.join(src)!r}, "
                f"got {w.shape}"
            )
        ax.imshow(w, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(src)), list(src), fontsize=8)
        ax.set_yticks(range(len(out)), list(out), fontsize=7)
        ax.set_title("".join(src), fontsize=9)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def confusion(
    matrix: np.ndarray, labels: Sequence[str], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Row-normalised confusion matrix (true class on rows) with the counts printed."""
    m = np.asarray(matrix, dtype=float)
    frac = m / np.maximum(m.sum(1, keepdims=True), 1.0)
    fig, ax = plt.subplots(figsize=(1.0 * len(labels) + 2.0, 0.9 * len(labels) + 1.5))
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(
                j,
                i,
                int(m[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if frac[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
