"""Downstream fine-tuning of a pre-trained PLAN vision tower: classification (Trainer + AUC/ACC), detection
(CenterNet-style head, COCO mAP over IoU 0.40-0.75) and segmentation (pyramid decoder, Dice), on the 1% / 10% / 100%
training-fraction protocol. The `plan-finetune-*` command lines (`plan_hf.cli.finetune`) run `finetune.run_finetune`."""

from .data import (
    ClassificationCollator,
    DetectionCollator,
    SegmentationCollator,
    TaskData,
    load_classification_data,
    load_detection_data,
    load_segmentation_data,
)
from .detection import PlanForObjectDetection, box_iou, decode_centernet, fast_nms
from .finetune import FinetuneConfig, Task, classification_compute_metrics, run_finetune
from .metrics import MGCA_IOU_THRESHOLDS, BoxSet, coco_map, dice_per_image, mean_dice
from .segmentation import PlanForSegmentation
from .splits import PROTOCOL_FRACTIONS, SubsetManifest, seeded_split, seeded_subset

__all__ = [
    "BoxSet",
    "ClassificationCollator",
    "DetectionCollator",
    "FinetuneConfig",
    "MGCA_IOU_THRESHOLDS",
    "PROTOCOL_FRACTIONS",
    "PlanForObjectDetection",
    "PlanForSegmentation",
    "SegmentationCollator",
    "SubsetManifest",
    "Task",
    "TaskData",
    "box_iou",
    "classification_compute_metrics",
    "coco_map",
    "decode_centernet",
    "dice_per_image",
    "fast_nms",
    "load_classification_data",
    "load_detection_data",
    "load_segmentation_data",
    "mean_dice",
    "run_finetune",
    "seeded_split",
    "seeded_subset",
]
