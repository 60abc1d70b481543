"""What a fine-tuning run leaves behind: ``metrics.json``, a markdown ``summary.md`` and one picture
(ROC curves; predicted vs true boxes; predicted vs true masks), all in the original images' pixels."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on build machines
    import matplotlib.pyplot as plt

    return plt


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN is written as null: JSON has no NaN, and strict parsers reject Python's bare `NaN`.
    path.write_text(json.dumps(_nan_to_none(payload), indent=2, default=_json_default))
    return path


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_summary(path: str | os.PathLike[str], title: str, run: dict[str, Any], headline: dict[str, Any],
                  per_class: dict[str, dict[str, Any]] | None, picture: str | None) -> Path:
    """A markdown page: the run's settings, the headline metrics, a per-class table and the picture."""
    lines = [f"# {title}", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in run.items()]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in headline.items()]
    if per_class:
        columns = sorted({key for row in per_class.values() for key in row})
        lines += ["", "| class | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [
            f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for name, row in per_class.items()
        ]
    if picture:
        lines += ["", f"![{title}]({picture})"]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every distinct score threshold, from (0, 0) to (1, 1).

    Written here rather than imported from sklearn.metrics, whose import alone costs seconds.
    """
    order = np.argsort(-scores, kind="mergesort")
    positive, ranked = np.asarray(labels, dtype=bool)[order], np.asarray(scores)[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]  # tied scores move together
    true_positives = np.cumsum(positive)[last_of_each_score]
    false_positives = last_of_each_score + 1 - true_positives
    return np.r_[0.0, false_positives / false_positives[-1]], np.r_[0.0, true_positives / true_positives[-1]]


def plot_roc(path: str | os.PathLike[str], labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str]) -> Path:
    """One ROC curve per class ((N, C) binary labels and scores; multi-class: one-vs-rest of one-hot labels)."""
    from ..metrics import roc_auc

    plt = _plt()
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    for c, name in enumerate(class_names):
        if 0 < labels[:, c].sum() < len(labels):  # a curve needs both classes
            fpr, tpr = roc_points(labels[:, c], scores[:, c])
            axis.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(labels[:, c], scores[:, c]):.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="Test ROC")
    axis.legend(fontsize=7, loc="lower right")
    return _save(figure, path)


def _save(figure, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Title (optional), lay out, write at 110 dpi and close the figure."""
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _plt().close(figure)
    return Path(path)


def _grey(image: Any) -> np.ndarray:
    from ..image_processing_plan import load_image

    return load_image(image)


def plot_detections(path: str | os.PathLike[str], images: Sequence[Any], truths: Sequence[np.ndarray],
                    predictions: Sequence[tuple[np.ndarray, np.ndarray]], ids: Sequence[str]) -> Path:
    """Images with true boxes (green) and predicted boxes (red, score written), all [x, y, w, h] original pixels."""
    from matplotlib.patches import Rectangle

    plt = _plt()
    count = len(images)
    figure, axes = plt.subplots(1, count, figsize=(3.2 * count, 3.6), squeeze=False)
    for axis, image, truth, (boxes, scores), name in zip(axes[0], images, truths, predictions, ids):
        axis.imshow(_grey(image), cmap="gray")
        for x, y, w, h in np.asarray(truth).reshape(-1, 4):
            axis.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="lime", linewidth=1.5))
        for (x, y, w, h), score in zip(np.asarray(boxes).reshape(-1, 4), scores):
            axis.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="red", linewidth=1.0, linestyle="--"))
            axis.text(x, y, f"{score:.2f}", color="red", fontsize=6, va="bottom")
        axis.set_title(str(name)[:18], fontsize=7)
        axis.axis("off")
    return _save(figure, path, "true (green) vs predicted (red) boxes")


def plot_segmentations(path: str | os.PathLike[str], images: Sequence[Any], truths: Sequence[np.ndarray],
                       predictions: Sequence[np.ndarray], ids: Sequence[str]) -> Path:
    """Images with the true mask's outline (green) and the predicted mask filled (red), original pixels."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    count = len(images)
    figure, axes = plt.subplots(1, count, figsize=(3.2 * count, 3.6), squeeze=False)
    for axis, image, truth, predicted, name in zip(axes[0], images, truths, predictions, ids):
        axis.imshow(_grey(image), cmap="gray")
        axis.imshow(np.ma.masked_where(~predicted.astype(bool), predicted.astype(float)), cmap=ListedColormap(["red"]),
                    alpha=0.4, vmin=0, vmax=1)
        if truth.any():
            axis.contour(truth.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
        axis.set_title(str(name)[:18], fontsize=7)
        axis.axis("off")
    return _save(figure, path, "true (green outline) vs predicted (red) masks")


__all__ = ["plot_detections", "plot_roc", "plot_segmentations", "roc_points", "write_json", "write_summary"]
