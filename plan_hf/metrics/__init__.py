"""Evaluation metrics (numpy in, Python floats and dicts out): phrase grounding, classification, retrieval."""

from .classification import accuracy_at, bootstrap_ci, f1_max, multiclass_metrics, multilabel_metrics, roc_auc
from .grounding import (
    DEFAULT_IOU_THRESHOLDS,
    aggregate_by_category,
    boxes_to_mask,
    cnr,
    grounding_iou,
    grounding_miou,
    normalize_heatmap,
    pointing_game,
    region_cnr,
    signed_cnr,
    side_agreement,
)
from .retrieval import class_precision_at_k, retrieval_metrics

__all__ = [
    "DEFAULT_IOU_THRESHOLDS",
    "accuracy_at",
    "aggregate_by_category",
    "bootstrap_ci",
    "boxes_to_mask",
    "class_precision_at_k",
    "cnr",
    "f1_max",
    "grounding_iou",
    "grounding_miou",
    "multiclass_metrics",
    "multilabel_metrics",
    "normalize_heatmap",
    "pointing_game",
    "region_cnr",
    "signed_cnr",
    "retrieval_metrics",
    "roc_auc",
    "side_agreement",
]
