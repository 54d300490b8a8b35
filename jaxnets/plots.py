"""Matplotlib figures from results (Agg backend: files, never windows).

Each function draws one figure, saves it as a PNG and returns the path. They take plain
numbers (lists, numpy arrays, metrics records), never models.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["metric_curves", "lines", "bars", "heatmap", "series", "save_figure"]


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` (folders created), close it.

    In a multi-process run (`jaxnets.distributed`) only process 0 writes the file.
    """
    from jaxnets import distributed

    path = Path(path)
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def series(records: Iterable[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` over metrics records that have it."""
    pts = [(r["step"], r[key]) for r in records if key in r and "step" in r]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts, strict=True)
    return np.asarray(s), np.asarray(v, dtype=float)


def metric_curves(
    runs: Mapping[str, Iterable[Mapping]] | Iterable[Mapping],
    path: str | os.PathLike,
    keys: Sequence[str] = ("loss", "eval_loss"),
    *,
    title: str | None = None,
    logy: bool = False,
) -> Path:
    """One panel per metric key, one line per run, x = step.

    ``runs``: metrics records (e.g. ``run_dir.metrics()``) or ``{label: records}``.
    Keys no run has are skipped; a key absent everywhere gives an empty panel-free figure.
    """
    if not isinstance(runs, Mapping):
        runs = {"": list(runs)}
    runs = {k: list(v) for k, v in runs.items()}
    keys = [k for k in keys if any(series(r, k)[0].size for r in runs.values())] or list(keys[:1])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, recs in runs.items():
            s, v = series(recs, key)
            if s.size:
                ax.plot(s, v, label=label or None, marker="." if s.size < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if any(runs.keys()) and len(runs) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def lines(
    xs: Sequence | np.ndarray,
    ys: Mapping[str, Sequence | np.ndarray],
    path: str | os.PathLike,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
    bands: Mapping[str, Sequence | np.ndarray] | None = None,
    errors: Mapping[str, Sequence | np.ndarray] | None = None,
) -> Path:
    """Line plot of ``{label: y}`` against shared ``xs``; ``bands[label]`` draws y +- band
    as a shaded area, ``errors[label]`` as error bars."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = np.asarray(xs)
    for label, y in ys.items():
        y = np.asarray(y, dtype=float)
        if y.shape != xs.shape:
            raise ValueError(f"lines: series {label!r} has shape {y.shape}, xs has {xs.shape}")
        if errors and label in errors:
            e = np.asarray(errors[label], dtype=float)
            ax.errorbar(xs, y, yerr=e, label=label, marker="o", ms=3, capsize=3)
        else:
            ax.plot(xs, y, label=label)
        if bands and label in bands:
            b = np.asarray(bands[label], dtype=float)
            ax.fill_between(xs, y - b, y + b, alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(ys) > 1:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def bars(
    values: Mapping[str, float],
    path: str | os.PathLike,
    *,
    errors: Mapping[str, float] | None = None,
    reference: Mapping[str, float] | None = None,
    ylabel: str = "",
    title: str | None = None,
) -> Path:
    """Bar chart of ``{label: value}``, optional error bars and reference markers (e.g. a
    published number drawn as a black tick next to ours)."""
    labels = list(values)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(3.5, 0.9 * len(labels) + 1.5), 3.4))
    err = [errors.get(k, 0.0) for k in labels] if errors else None
    ax.bar(x, [values[k] for k in labels], yerr=err, capsize=3, color="tab:blue", label="ours")
    if reference:
        rx = [i for i, k in enumerate(labels) if k in reference]
        ax.scatter(
            rx,
            [reference[labels[i]] for i in rx],
            color="k",
            marker="_",
            s=400,
            zorder=3,
            label="published",
        )
        ax.legend(fontsize=8)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 5 else 0)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def heatmap(
    matrix: np.ndarray,
    path: str | os.PathLike,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str | None = None,
    cmap: str = "viridis",
    log: bool = False,
    colorbar_label: str = "",
) -> Path:
    """Heat map of a 2-D array (rows on y); ``log`` colours log10(|m|)."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"heatmap: matrix must be 2-D, got shape {m.shape}")
    if log:
        m = np.log10(np.maximum(np.abs(m), 1e-30))
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    im = ax.imshow(m, aspect="auto", cmap=cmap, origin="lower", interpolation="nearest")
    cb = fig.colorbar(im, ax=ax)
    if colorbar_label or log:
        cb.set_label(colorbar_label or "log10 |value|")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
