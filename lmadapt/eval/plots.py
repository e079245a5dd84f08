"""PNG plots for continual-learning reports: score heatmaps, loss across versions, training curves.

Headless by construction: figures are built with matplotlib's object-oriented API on an explicit Agg canvas
(`matplotlib.figure.Figure` + `FigureCanvasAgg`), never through `pyplot`. That needs no display, keeps no global
figure registry (nothing to close, safe from threads), and does not switch the process-wide backend, so importing
this module does not break interactive plotting elsewhere in the same process (e.g. a notebook).

Every function writes its PNG atomically (rendered to a temporary file in the destination directory, then
`os.replace`d over the target), creating parent directories as needed, so a reader never sees a half-written
image; each returns the path it wrote.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

_DPI = 100


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)  # attach an Agg canvas explicitly: rendering never depends on the configured backend
    return fig


def _save_atomic(fig: Figure, path: str | os.PathLike[str]) -> str:
    """Render `fig` to `path` as PNG via a temp file in the same directory + os.replace (atomic on POSIX)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    # Same directory as the target: os.replace is only atomic within one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=_DPI, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _text_colour(rgba: Sequence[float]) -> str:
    """Black on light cells, white on dark ones (perceived luminance, ITU-R BT.601 weights)."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def heatmap(
    R: Sequence[Sequence[float]] | np.ndarray,
    row_names: Sequence[str],
    col_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str,
    fmt: str = ".3f",
    cmap: str = "viridis",
) -> str:
    """Annotated heatmap of `R` (rows = e.g. versions, columns = e.g. tasks), each cell labelled with its value.

    `fmt` is a format spec for the cell labels; NaN cells are drawn blank and labelled "n/a". For losses,
    a reversed colour map (e.g. ``"viridis_r"``) makes "better" the same colour as for accuracies.
    """
    arr = np.asarray(R, dtype=np.float64)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"heatmap needs a non-empty 2-D matrix, got shape {arr.shape}")
    if len(row_names) != arr.shape[0] or len(col_names) != arr.shape[1]:
        raise ValueError(f"{len(row_names)} row names and {len(col_names)} column names "
                         f"for a matrix of shape {arr.shape}")
    n, m = arr.shape
    finite = arr[np.isfinite(arr)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    norm = Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1.0)  # a constant matrix still gets a scale
    colour_map = colormaps[cmap]

    fig = _new_figure(max(4.0, 1.8 + 0.9 * m), max(3.0, 1.2 + 0.5 * n))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(arr), cmap=colour_map, norm=norm, aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(m), labels=[str(c) for c in col_names], rotation=30 if m > 4 else 0,
                  ha="right" if m > 4 else "center")
    ax.set_yticks(range(n), labels=[str(r) for r in row_names])
    ax.set_title(title)
    font = max(6, 11 - max(n, m) // 3)  # shrink labels on big matrices so they stay inside their cells
    for i in range(n):
        for j in range(m):
            v = arr[i, j]
            if math.isfinite(v):
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=font,
                        color=_text_colour(colour_map(norm(v))))
            else:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=font, color="black")
    return _save_atomic(fig, path)


def loss_across_versions(
    scores: Mapping[str, Sequence[float | None]],
    versions: Sequence[str],
    path: str | os.PathLike[str],
    ylabel: str = "held-out loss",
    title: str | None = None,
) -> str:
    """One line per dataset: its score at each model version (x axis = `versions`, in order).

    A `None` / NaN score (dataset not evaluated for that version) leaves a gap in that line.
    """
    if not scores:
        raise ValueError("loss_across_versions needs at least one dataset")
    if not versions:
        raise ValueError("loss_across_versions needs at least one version")
    for name, ys in scores.items():
        if len(ys) != len(versions):
            raise ValueError(f"dataset {name!r} has {len(ys)} scores for {len(versions)} versions")

    fig = _new_figure(max(5.0, 2.5 + 0.6 * len(versions)), 3.8)
    ax = fig.add_subplot()
    x = np.arange(len(versions))
    for name, ys in scores.items():
        y = np.array([np.nan if v is None else float(v) for v in ys])
        ax.plot(x, y, marker="o", label=str(name))
    ax.set_xticks(x, labels=[str(v) for v in versions], rotation=30 if len(versions) > 5 else 0,
                  ha="right" if len(versions) > 5 else "center")
    ax.set_xlabel("version")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save_atomic(fig, path)


def training_curves(
    runs: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike[str],
    ylabel: str = "train loss",
    title: str | None = None,
    logy: bool = False,
) -> str:
    """One line per run from its ``(step, value)`` points (sorted by step; runs with no points are skipped)."""
    if not any(len(points) for points in runs.values()):
        raise ValueError("training_curves needs at least one run with at least one (step, value) point")
    fig = _new_figure(6.0, 3.8)
    ax = fig.add_subplot()
    for name, points in runs.items():
        if not points:
            continue
        steps, values = zip(*sorted((int(s), float(v)) for s, v in points), strict=True)
        ax.plot(steps, values, label=str(name), marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save_atomic(fig, path)
