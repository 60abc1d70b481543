"""Dense-task metrics: box mAP over IoU 0.40-0.75 through pycocotools' COCOeval, and per-image Dice.

Box mAP follows the protocol family of MGCA (RSNA detection): COCO's 101-point interpolated AP with
`params.iouThrs = 0.40, 0.45, ..., 0.75`, averaged over those eight thresholds and over the categories that have ground
truth. The matching, the interpolation and the ranking are pycocotools' own; this module only builds its inputs.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# MGCA's detection thresholds; rounded so 0.5 is exactly 0.5 (np.arange accumulates float error).
MGCA_IOU_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.40, 0.751, 0.05), 2).tolist())


@dataclass
class BoxSet:
    """The boxes of one image: (n, 4) `[x, y, w, h]` (x, y = top-left; any pixel frame, the same for predictions and
    ground truth), (n,) integer category ids, and for predictions (n,) scores."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None

    @classmethod
    def of(cls, boxes, labels=None, scores=None) -> "BoxSet":
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        labels = np.zeros(len(boxes), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        return cls(boxes, labels.reshape(-1), None if scores is None else np.asarray(scores, np.float64).reshape(-1))


def coco_map(
    predictions: Sequence[BoxSet],
    ground_truths: Sequence[BoxSet],
    num_classes: int | None = None,
    iou_thresholds: Sequence[float] = MGCA_IOU_THRESHOLDS,
    max_detections: int = 100,
) -> dict[str, object]:
    """Box mAP of `predictions` against `ground_truths` (aligned lists, one `BoxSet` per image) with COCOeval.

    Images without ground truth count: their detections are false positives. Returns ``{"map": mean AP over the
    thresholds and the categories with ground truth, "ap_per_iou": {threshold: AP}, "ap_per_class": {id: AP}}``;
    ``map`` is 0.0 when there are ground-truth boxes but no detections and NaN when there is no ground truth at all.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} prediction sets for {len(ground_truths)} images")
    if num_classes is None:
        all_labels = [s.labels for s in (*predictions, *ground_truths) if s.labels.size]
        num_classes = int(max((labels.max() for labels in all_labels), default=0)) + 1
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)

    # COCO ids start at 1: COCOeval stores the matched ground-truth id per detection and reads 0 as "unmatched".
    images = [{"id": i + 1} for i in range(len(ground_truths))]
    truth_rows = [
        (i + 1, box, label) for i, truth in enumerate(ground_truths) for box, label in zip(truth.boxes, truth.labels)
    ]
    annotations = [
        {"id": k + 1, "image_id": image_id, "category_id": int(label) + 1, "bbox": [float(v) for v in box],
         "area": float(box[2] * box[3]), "iscrowd": 0}
        for k, (image_id, box, label) in enumerate(truth_rows)
    ]
    detections = [
        {"image_id": i + 1, "category_id": int(label) + 1, "bbox": [float(v) for v in box], "score": float(score)}
        for i, predicted in enumerate(predictions)
        for box, label, score in zip(predicted.boxes, predicted.labels, predicted.scores)
    ]
    per_iou = {f"{t:.2f}": float("nan") for t in thresholds}
    per_class = {c: float("nan") for c in range(num_classes)}
    if not annotations:
        return {"map": float("nan"), "ap_per_iou": per_iou, "ap_per_class": per_class}
    if not detections:  # COCO.loadRes cannot take an empty list; nothing detected is AP 0 wherever there is truth
        present = {a["category_id"] - 1 for a in annotations}
        return {"map": 0.0, "ap_per_iou": {k: 0.0 for k in per_iou},
                "ap_per_class": {c: 0.0 if c in present else float("nan") for c in per_class}}

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth_api = COCO()
        truth_api.dataset = {"images": images, "annotations": annotations,
                             "categories": [{"id": c + 1} for c in range(num_classes)]}
        truth_api.createIndex()
        detection_api = truth_api.loadRes(detections)
        evaluator = COCOeval(truth_api, detection_api, iouType="bbox")
        evaluator.params.iouThrs = thresholds
        evaluator.params.maxDets = [1, 10, max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
    # precision: (T thresholds, R=101 recall points, K categories, A area ranges, M max-dets); -1 where K has no truth.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # area "all", the largest max-dets
    valid = precision > -1

    def mean(values: np.ndarray, mask: np.ndarray) -> float:
        return float(values[mask].mean()) if mask.any() else float("nan")

    return {
        "map": mean(precision, valid),
        "ap_per_iou": {f"{t:.2f}": mean(precision[i], valid[i]) for i, t in enumerate(thresholds)},
        "ap_per_class": {c: mean(precision[:, :, c], valid[:, :, c]) for c in range(num_classes)},
    }


def dice_per_image(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dice 2|P n T| / (|P| + |T|) of each (H, W) mask pair in (N, H, W) stacks (or one pair of (H, W) masks).

    Two empty masks score 1 (nothing to find, nothing found: the convention of the SIIM-ACR challenge), so an image
    without a lesion rewards a model for predicting nothing there rather than being left out of the mean.
    """
    predicted, target = np.asarray(predicted).astype(bool), np.asarray(target).astype(bool)
    if predicted.shape != target.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} and {target.shape}")
    if predicted.ndim == 2:
        predicted, target = predicted[None], target[None]
    axes = tuple(range(1, predicted.ndim))
    intersection = (predicted & target).sum(axis=axes)  # (N,)
    total = predicted.sum(axis=axes) + target.sum(axis=axes)  # (N,)
    return np.where(total == 0, 1.0, 2.0 * intersection / np.maximum(total, 1))


def mean_dice(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean per-image Dice over (predicted, target) mask pairs that may differ in size from image to image."""
    if not pairs:
        return float("nan")
    return float(np.mean([dice_per_image(p, t)[0] for p, t in pairs]))


__all__ = ["BoxSet", "MGCA_IOU_THRESHOLDS", "coco_map", "dice_per_image", "mean_dice"]
