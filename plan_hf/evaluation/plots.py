"""Pictures of the evaluation for people to look at: grounding heat maps with their true boxes, a retrieval strip
(a report and the images it retrieves, hits marked), ROC curves. matplotlib with the Agg backend (no display)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..grounding import render_heatmap  # noqa: E402
from ..image_processing_plan import load_image  # noqa: E402

HIT_COLOUR = "#1a9850"
MISS_COLOUR = "#d73027"


@dataclass
class HeatmapPanel:
    image: Any  # anything `load_image` reads
    heatmap: np.ndarray  # (H, W) over the original image
    boxes: Sequence[Sequence[float]]
    phrase: str
    cnr: float
    pointing: float


def _save(figure: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_grounding_grid(panels: Sequence[HeatmapPanel], path: str | Path, title: str = "", columns: int = 4) -> Path:
    """One tile per phrase: the X-ray, its heat map blended over it, the true boxes (green), the phrase and CNR."""
    rows = max(1, math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.9 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, panel in zip(axes.flat, panels):
        axis.imshow(render_heatmap(panel.image, panel.heatmap, panel.boxes))
        hit = "hit" if panel.pointing >= 0.5 else "miss"
        caption = "\n".join(textwrap.wrap(panel.phrase, 34)[:2])
        axis.set_title(f"{caption}\nCNR {panel.cnr:.2f} | pointing: {hit}", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


@dataclass
class RetrievalRow:
    query: str  # the report
    images: Sequence[Any]  # the top-k retrieved images, best first
    hits: Sequence[bool]
    rank_of_positive: int


def plot_retrieval_strip(rows: Sequence[RetrievalRow], path: str | Path, title: str = "") -> Path:
    """Each row: a query report, then its top-k images with a green (own image) or red frame."""
    k = max((len(r.images) for r in rows), default=1)
    figure, axes = plt.subplots(len(rows) or 1, k + 1, figsize=(2.1 * (k + 1) + 1.6, 2.4 * max(len(rows), 1)),
                                squeeze=False, gridspec_kw={"width_ratios": [1.8] + [1] * k})
    for axis in axes.flat:
        axis.axis("off")
    for row_axes, row in zip(axes, rows):
        wrapped = textwrap.wrap(" ".join(row.query.split()), 40)
        text = "\n".join(wrapped[:9]) + (" ..." if len(wrapped) > 9 else "")
        row_axes[0].text(0, 0.5, f"{text}\n(own image at rank {row.rank_of_positive})", fontsize=7, va="center",
                         ha="left", transform=row_axes[0].transAxes)
        for rank, (axis, image, hit) in enumerate(zip(row_axes[1:], row.images, row.hits), start=1):
            axis.imshow(load_image(image), cmap="gray", vmin=0, vmax=1)
            axis.axis("on")
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_color(HIT_COLOUR if hit else MISS_COLOUR)
                spine.set_linewidth(4)
            axis.set_title(f"#{rank} {'hit' if hit else 'miss'}", fontsize=8, color=HIT_COLOUR if hit else MISS_COLOUR)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of every threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    y, s = labels[order].astype(bool), scores[order]
    last_of_group = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_group]
    fp = np.cumsum(~y)[last_of_group]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def plot_roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path,
                    title: str = "") -> Path:
    """One curve per class: {name: (labels 0/1, scores, auc)}."""
    figure, axis = plt.subplots(figsize=(5, 5))
    for name, (labels, scores, auc) in curves.items():
        if labels.min(initial=1) == labels.max(initial=0):
            continue  # one class only: no curve
        fpr, tpr = roc_points(np.asarray(labels), np.asarray(scores, dtype=np.float64))
        axis.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    axis.set_aspect("equal")
    axis.legend(loc="lower right", fontsize=7)
    axis.set_title(title, fontsize=10)
    return _save(figure, path)


__all__ = ["HeatmapPanel", "RetrievalRow", "plot_grounding_grid", "plot_retrieval_strip", "plot_roc_curves", "roc_points"]
