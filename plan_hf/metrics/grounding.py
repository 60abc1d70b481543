"""Phrase-grounding metrics of the MS-CXR protocol: CNR, mIoU and the pointing game of a heat map against boxes.

Conventions shared by every function here:

* A heat map is a 2-D array ``(height, width)``. NaN pixels are *not part of the image* (a map mapped back to the
  original image is NaN where the model saw padding); they are ignored everywhere, so a map with NaN outside a crop
  scores exactly what the crop scores. ``±inf`` is rejected (`ValueError`): it is a bug upstream, not a score.
* A box is ``(x, y, w, h)`` in the heat map's pixel coordinates, ``(x, y)`` its top-left corner; floats allowed.
  Pixel ``(row r, column c)`` is the unit square ``[c, c+1) x [r, r+1)``; a box covers every pixel it overlaps
  with positive area: columns ``floor(x) .. ceil(x + w) - 1`` and rows ``floor(y) .. ceil(y + h) - 1``, clipped
  to the image. A box with ``w == 0`` or ``h == 0`` covers nothing; a negative size is a `ValueError`.
* The ground truth of a phrase is the union of its boxes, restricted to valid (non-NaN) pixels. A phrase whose
  ground truth is empty there (no boxes, boxes off the image or over NaN only) has no defined score: NaN.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)


def _as_boxes(boxes: ArrayLike) -> np.ndarray:
    """``(K, 4)`` float boxes; an empty list gives ``(0, 4)``."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (K, 4) as (x, y, w, h); got {np.shape(boxes)}")
    if not np.isfinite(array).all():
        raise ValueError("boxes must be finite")
    if (array[:, 2:] < 0).any():
        raise ValueError("box width and height must be >= 0")
    return array


def boxes_to_mask(boxes: ArrayLike, height: int, width: int) -> np.ndarray:
    """Union of the pixels covered by ``boxes`` (``(K, 4)`` as ``(x, y, w, h)``) as a ``(height, width)`` bool mask.

    A pixel is covered when the box overlaps it with positive area (see the module docstring).
    """
    b = _as_boxes(boxes)
    x, y, w, h = b.T
    has_area = (w > 0) & (h > 0)
    # Half-open index ranges [start, stop); np.clip keeps boxes partly (or wholly) off the image on it.
    col_start = np.clip(np.floor(x), 0, width)
    col_stop = np.clip(np.ceil(x + w), 0, width)
    row_start = np.clip(np.floor(y), 0, height)
    row_stop = np.clip(np.ceil(y + h), 0, height)
    cols = np.arange(width)
    rows = np.arange(height)
    in_cols = (cols >= col_start[:, None]) & (cols < col_stop[:, None]) & has_area[:, None]  # (K, W)
    in_rows = (rows >= row_start[:, None]) & (rows < row_stop[:, None])  # (K, H)
    # Union over boxes as a (H, K) @ (K, W) product: no (K, H, W) intermediate.
    return (in_rows.T.astype(np.float32) @ in_cols.astype(np.float32)) > 0


def _prepare(heatmap: ArrayLike, boxes: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, valid, inside): the map as float64, its non-NaN pixels, and the ground truth on those pixels."""
    values = np.asarray(heatmap, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (height, width); got shape {values.shape}")
    if np.isinf(values).any():
        raise ValueError("heatmap contains ±inf; only NaN (outside the image) is allowed")
    valid = ~np.isnan(values)
    inside = boxes_to_mask(boxes, *values.shape) & valid
    return values, valid, inside


def _mean_var(x: np.ndarray) -> tuple[float, float]:
    # A constant region must give variance exactly 0 and its exact value as mean: np.mean of n copies of 0.1 is not
    # always 0.1, and that rounding would turn "0 / 0" into an arbitrary finite CNR.
    if x.min() == x.max():
        return float(x[0]), 0.0
    return float(x.mean()), float(x.var())


def cnr(heatmap: ArrayLike, boxes: ArrayLike) -> float:
    """Contrast-to-noise ratio ``|mu_in - mu_out| / sqrt(var_in + var_out)`` of ``heatmap`` inside vs outside boxes.

    Population variances (ddof=0) over valid pixels. CNR is invariant to an affine rescaling of the map, so the map
    is not normalised first. Returns NaN when the inside or the outside has no valid pixel; when both regions are
    constant it returns 0.0 for equal values and ``inf`` for different ones (a perfect, noise-free separation).
    """
    values, valid, inside = _prepare(heatmap, boxes)
    return region_cnr(values, inside, valid & ~inside)


def signed_cnr(heatmap: ArrayLike, boxes: ArrayLike) -> float:
    """``(mu_in - mu_out) / sqrt(var_in + var_out)``: `cnr` keeping the sign. The field's CNR takes the absolute
    contrast, so a map that avoids the boxes (its mass outside them) scores as well as one that finds them; here it
    scores below 0. NaN, 0.0 and +-``inf`` as `cnr`."""
    values, valid, inside = _prepare(heatmap, boxes)
    return region_cnr(values, inside, valid & ~inside, signed=True)


def region_cnr(values: ArrayLike, inside: ArrayLike, outside: ArrayLike, signed: bool = False) -> float:
    """`cnr` of two given pixel sets of ``values`` (bool masks of its shape), e.g. a lesion against the tissue
    around it: ``|mu_in - mu_out| / sqrt(var_in + var_out)``, population variances (without the absolute value when
    ``signed``). NaN when either set is empty; 0.0 / ``inf`` for two constant regions of equal / different values."""
    values = np.asarray(values, dtype=np.float64)
    inside, outside = np.asarray(inside, dtype=bool), np.asarray(outside, dtype=bool)
    if not inside.any() or not outside.any():
        return math.nan
    mean_in, var_in = _mean_var(values[inside])
    mean_out, var_out = _mean_var(values[outside])
    contrast = mean_in - mean_out if signed else abs(mean_in - mean_out)
    noise = math.sqrt(var_in + var_out)
    if noise == 0.0:
        return 0.0 if contrast == 0.0 else math.copysign(math.inf, contrast)
    return contrast / noise


def normalize_heatmap(heatmap: ArrayLike) -> np.ndarray:
    """Min-max normalise over valid pixels to [0, 1] (NaN stays NaN); a constant map becomes all zeros."""
    values = np.asarray(heatmap, dtype=np.float64)
    valid = ~np.isnan(values)
    if not valid.any():
        return values.copy()
    low, high = values[valid].min(), values[valid].max()
    if high == low:
        return np.where(valid, 0.0, np.nan)
    return (values - low) / (high - low)


def grounding_iou(
    heatmap: ArrayLike, boxes: ArrayLike, thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS
) -> dict[float, float]:
    """IoU between the box mask and the map binarised at each threshold: ``{threshold: iou}``.

    The map is min-max normalised over valid pixels (`normalize_heatmap`); a pixel is foreground when its
    normalised value is ``>= threshold``. Only valid pixels take part. NaN for every threshold when the ground
    truth is empty.
    """
    values, valid, inside = _prepare(heatmap, boxes)
    if not inside.any():
        return {float(t): math.nan for t in thresholds}
    normalized = normalize_heatmap(values)
    t = np.asarray(thresholds, dtype=np.float64)
    foreground = (normalized[None] >= t[:, None, None]) & valid  # (T, H, W); NaN >= t is False
    intersection = (foreground & inside).sum(axis=(1, 2))
    union = (foreground | inside).sum(axis=(1, 2))  # >= inside.sum() > 0
    return {float(k): float(v) for k, v in zip(t, intersection / union)}


def grounding_miou(
    heatmap: ArrayLike, boxes: ArrayLike, thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS
) -> float:
    """Mean over ``thresholds`` of `grounding_iou` (the MS-CXR mIoU); NaN when the ground truth is empty."""
    per_threshold = grounding_iou(heatmap, boxes, thresholds)
    return float(np.mean(list(per_threshold.values())))


def pointing_game(heatmap: ArrayLike, boxes: ArrayLike) -> float:
    """1.0 when the map's maximum (NaN ignored) lies in a box, else 0.0.

    Ties: when several pixels share the maximum, the score is the fraction of them inside the boxes, i.e. the
    expected hit of picking one of them at random. A constant map therefore scores the boxes' share of the image,
    not a free 1.0. NaN when the ground truth is empty.
    """
    values, valid, inside = _prepare(heatmap, boxes)
    if not inside.any():
        return math.nan
    at_max = valid & (values == values[valid].max())
    return float(np.count_nonzero(at_max & inside) / np.count_nonzero(at_max))


def side_agreement(heatmap: ArrayLike, boxes: ArrayLike) -> float:
    """Laterality: does the map put more of its mass on the half of the image (left / right of the vertical
    midline) that holds the finding? 1.0 yes, 0.0 no, 0.5 a tie; NaN when the boxes do not all lie within one half
    (bilateral or central findings) or there are none. The map is shifted to a minimum of 0 (NaN ignored); with an
    odd width the middle column counts for neither half. Chance is 0.5, so a map that is too coarse to hit a box
    can still show whether it knows the side.
    """
    values, valid, _ = _prepare(heatmap, boxes)
    box_array = _as_boxes(boxes)
    width = values.shape[1]
    if box_array.shape[0] == 0:
        return math.nan
    half = width // 2  # columns [0, half) and [width - half, width)
    left_side = np.all(box_array[:, 0] + box_array[:, 2] <= half)
    right_side = np.all(box_array[:, 0] >= width - half)
    if left_side == right_side:  # straddling, on both sides, or (degenerate) both
        return math.nan
    shifted = np.where(valid, values - values[valid].min(), 0.0) if valid.any() else np.zeros_like(values)
    left_mass, right_mass = shifted[:, :half].sum(), shifted[:, width - half:].sum()
    own, other = (left_mass, right_mass) if left_side else (right_mass, left_mass)
    return 1.0 if own > other else 0.0 if own < other else 0.5


def _nanmean(x: np.ndarray) -> float:
    kept = x[~np.isnan(x)]
    return float(kept.mean()) if kept.size else math.nan


def aggregate_by_category(
    records: Iterable[Mapping[str, Any]],
    keys: Sequence[str] = ("cnr", "miou", "pointing"),
    category_key: str = "category",
) -> dict[str, Any]:
    """Average per-phrase scores per category, then across categories.

    ``records`` are mappings holding ``category_key`` and each of ``keys`` (e.g. one per MS-CXR phrase). NaN scores
    (undefined phrases) are left out of every mean and counted in ``num_undefined``; ``inf`` (a perfect CNR) is
    kept, so it propagates. Returns::

        {"per_category": {category: {"count": n, key: mean, ...}},
         "macro": {key: mean of the category means},   # each category weighs the same, as MS-CXR reports
         "micro": {key: mean over all records},
         "count": total records,
         "num_undefined": {key: NaN count}}
    """
    by_category: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_category[str(record[category_key])].append(record)
    columns = {
        category: {key: np.array([float(r[key]) for r in rows], dtype=np.float64) for key in keys}
        for category, rows in sorted(by_category.items())
    }
    per_category = {
        category: {"count": len(by_category[category]), **{key: _nanmean(col[key]) for key in keys}}
        for category, col in columns.items()
    }
    everything = {
        key: np.concatenate([col[key] for col in columns.values()]) if columns else np.zeros(0) for key in keys
    }
    return {
        "per_category": per_category,
        "macro": {key: _nanmean(np.array([c[key] for c in per_category.values()])) for key in keys},
        "micro": {key: _nanmean(everything[key]) for key in keys},
        "count": sum(len(rows) for rows in by_category.values()),
        "num_undefined": {key: int(np.isnan(everything[key]).sum()) for key in keys},
    }
