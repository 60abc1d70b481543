"""The fine-tuning protocol behind the `plan-finetune-*` command lines (`plan_hf.cli.finetune`): build the model
from a pre-trained export (or a random tower of the same config), take the seeded training fraction, train with
`transformers.Trainer`, evaluate on the test split, write the report.

The training budget is fixed (epochs or steps) and nothing is selected on the test split. The Trainer is used as it
is: ``remove_unused_columns=False`` because the datasets' ``image`` column is not a forward argument (the collators
turn it into ``pixel_values``), and the models set ``accepts_loss_kwargs = False`` so gradient accumulation divides
their per-batch mean losses.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import EvalPrediction, PreTrainedModel, Trainer, TrainingArguments, set_seed

from ..configuration_plan import PlanConfig
from ..image_processing_plan import PlanImageProcessor
from ..metrics import multiclass_metrics, multilabel_metrics
from ..modeling_plan import PlanForImageClassification
from .data import (
    ClassificationCollator,
    DetectionCollator,
    ProblemType,
    SYNTHETIC_LESION_TYPES,
    SegmentationCollator,
    TaskData,
    boxes_xyxy_to_xywh,
    iterate_examples,
    load_classification_data,
    load_detection_data,
    load_segmentation_data,
)
from .detection import PlanForObjectDetection
from .metrics import BoxSet, coco_map, dice_per_image
from .report import plot_detections, plot_roc, plot_segmentations, write_json, write_summary
from .segmentation import PlanForSegmentation
from .splits import SubsetManifest, check_disjoint, seeded_subset

logger = logging.getLogger(__name__)

RANDOM_MODEL = "random"
TINY_CONFIGS = ("tiny-resnet", "tiny-vit")


class Task(str, Enum):
    CLASSIFICATION = "classification"
    DETECTION = "detection"
    SEGMENTATION = "segmentation"


MODEL_CLASSES: dict[Task, type[PreTrainedModel]] = {
    Task.CLASSIFICATION: PlanForImageClassification,
    Task.DETECTION: PlanForObjectDetection,
    Task.SEGMENTATION: PlanForSegmentation,
}


@dataclass
class FinetuneConfig:
    """One run of the protocol. `model` is a pre-trained export folder / Hub id, or "random" (then `config` names the
    PlanConfig to initialise: a folder / Hub id, or "tiny-resnet" / "tiny-vit")."""

    task: Task
    model: str
    dataset: str
    data: str | None
    out: str
    fraction: float = 1.0
    seed: int = 0
    split_seed: int = 0
    linear_probe: bool = False
    config: str | None = None
    image_size: int = 224
    epochs: float = 10.0
    max_steps: int = -1
    batch_size: int = 16
    learning_rate: float | None = None
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.05
    num_workers: int = 0
    class_names: list[str] | None = None
    problem_type: str | None = None
    image_column: str = "image"  # a datasets source's (classification)
    allow_outside_root: bool = False
    strict: bool = False
    box_classes: str = "agnostic"
    finding_types: list[str] = field(default_factory=lambda: list(SYNTHETIC_LESION_TYPES))
    head_dim: int = 64
    score_threshold: float = 0.01
    nms_iou: float = 0.5
    mask_threshold: float = 0.5
    num_pictures: int = 4
    save_model: bool = True
    use_cpu: bool = False

    def __post_init__(self) -> None:
        self.task = Task(self.task)
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.model == RANDOM_MODEL and not self.config:
            raise ValueError("model='random' needs config: a PlanConfig folder / Hub id, or tiny-resnet / tiny-vit")

    @property
    def default_learning_rate(self) -> float:
        # A linear probe or a new head alone takes a larger step than a whole pre-trained tower.
        return self.learning_rate if self.learning_rate is not None else (1e-3 if self.linear_probe else 3e-4)


# --------------------------------------------------------------------------------------------------------------------
# Model and processor
# --------------------------------------------------------------------------------------------------------------------
def _plan_config(source: str, image_size: int) -> PlanConfig:
    if source in TINY_CONFIGS:
        from ..tiny import tiny_plan_config

        return tiny_plan_config(vision=source.split("-")[1], image_size=image_size)
    return PlanConfig.from_pretrained(source)


def build_image_processor(cfg: FinetuneConfig) -> PlanImageProcessor:
    """The processor saved with the model (or with the random baseline's config) so both arms see the same inputs;
    a `PlanImageProcessor(size=image_size)` when there is none."""
    source = cfg.config if cfg.model == RANDOM_MODEL else cfg.model
    processor = None
    if source not in TINY_CONFIGS:
        try:  # preprocessor_config.json, or the image processor inside a PlanProcessor's processor_config.json
            processor = PlanImageProcessor.from_pretrained(source)
        except OSError:
            processor = None
    if processor is None:
        logger.info("no preprocessor_config.json with %s: using PlanImageProcessor(size=%d)", source, cfg.image_size)
        processor = PlanImageProcessor(size=cfg.image_size)
    return processor


def build_model(cfg: FinetuneConfig, num_labels: int, class_names: Sequence[str],
                problem_type: ProblemType | None = None) -> PreTrainedModel:
    """The task model: vision tower from the export (`from_pretrained` keeps PlanModel's `vision_model.*`) or random."""
    model_class = MODEL_CLASSES[cfg.task]
    overrides: dict[str, Any] = {
        "num_labels": num_labels,
        "id2label": dict(enumerate(class_names)),
        "label2id": {name: i for i, name in enumerate(class_names)},
        "downstream_head_dim": cfg.head_dim,
    }
    if problem_type is not None:
        overrides["problem_type"] = ProblemType(problem_type).value
    # Set on the config object: `from_pretrained(**kwargs)` hands keys the config does not know to the model's init.
    config = _plan_config(cfg.config if cfg.model == RANDOM_MODEL else cfg.model, cfg.image_size)
    for key, value in overrides.items():
        setattr(config, key, value)
    set_seed(cfg.seed)  # the new head (and a random tower) start from the same weights for the same seed
    if cfg.model == RANDOM_MODEL:
        model = model_class(config)
    else:
        model = model_class.from_pretrained(cfg.model, config=config)
    if cfg.linear_probe:
        model.freeze_vision_tower()
    return model


def _check_input_size(model: PreTrainedModel, processor: PlanImageProcessor) -> None:
    expected = getattr(model.config.vision_config, "image_size", None)
    side = processor.size["height"]
    if expected is not None and hasattr(model.config.vision_config, "patch_size") and expected != side:
        raise ValueError(f"the ViT tower takes {expected}px inputs but the image processor makes {side}px; "
                         f"pass --image-size {expected} or a processor of that size")


# --------------------------------------------------------------------------------------------------------------------
# Subset and training
# --------------------------------------------------------------------------------------------------------------------
def take_training_subset(data: TaskData, cfg: FinetuneConfig) -> tuple[Any, SubsetManifest]:
    """The seeded fraction of the training split, and its manifest (indices and ids); checks it misses the test set."""
    indices = seeded_subset(len(data.train), cfg.fraction, cfg.seed)
    subset = data.train.select(indices)
    manifest = SubsetManifest(
        dataset=cfg.dataset, fraction=cfg.fraction, seed=cfg.seed, num_train_total=len(data.train),
        train_indices=indices.tolist(), train_ids=[str(v) for v in subset.with_format(None)[data.id_column]],
        test_ids=data.ids("test"),
    )
    check_disjoint(manifest.train_ids, manifest.test_ids)
    return subset, manifest


def training_arguments(cfg: FinetuneConfig, num_train: int, **overrides: Any) -> TrainingArguments:
    logging_steps = max(1, math.ceil(num_train / cfg.batch_size) // 2)
    return TrainingArguments(
        output_dir=str(Path(cfg.out) / "trainer"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.default_learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type="cosine",
        logging_steps=logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # keep `image`: the collator, not the model, consumes it
        dataloader_num_workers=cfg.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for host-to-GPU copies only
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=cfg.use_cpu,
        **overrides,
    )


def train(model: PreTrainedModel, train_dataset, collator: Callable, cfg: FinetuneConfig,
          compute_metrics: Callable | None = None) -> tuple[Trainer, dict[str, float]]:
    trainer = Trainer(model=model, args=training_arguments(cfg, len(train_dataset)), train_dataset=train_dataset,
                      data_collator=collator, compute_metrics=compute_metrics)
    start = time.perf_counter()
    result = trainer.train()
    return trainer, {"steps": result.global_step, "loss": float(result.training_loss),
                     "seconds": round(time.perf_counter() - start, 2)}


# --------------------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------------------
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without exp's overflow for large |x|


def classification_compute_metrics(problem_type: ProblemType | str, class_names: Sequence[str]) -> Callable:
    """`compute_metrics` for Trainer: flat scalars (Trainer logs them) -- macro AUC, accuracy, per-class AUC/accuracy.

    Multi-label accuracy is taken at probability 0.5 (a fixed threshold: nothing tuned on the evaluated set).
    """
    problem = ProblemType(problem_type)

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        labels = prediction.label_ids
        if problem is ProblemType.MULTI_LABEL:
            result = multilabel_metrics(labels, _sigmoid(logits), class_names, threshold=0.5)
            flat = {"macro_auc": result["macro"]["auc"], "accuracy": result["macro"]["accuracy"]}
            for name, row in result["per_class"].items():
                flat[f"auc/{name}"], flat[f"accuracy/{name}"] = row["auc"], row["accuracy"]
        else:
            result = multiclass_metrics(labels.astype(np.int64), logits, class_names)
            flat = {"macro_auc": result["macro_auc"], "accuracy": result["accuracy"], "macro_f1": result["macro_f1"]}
            for name, row in result["per_class"].items():
                flat[f"auc/{name}"] = row["auc"]
        return {key: float(value) for key, value in flat.items()}

    return compute


def _nest_per_class(flat: dict[str, float], prefix: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Trainer's flat "<prefix>_auc/<class>" keys -> headline metrics and {class: {metric: value}}."""
    headline, per_class = {}, {}
    for key, value in flat.items():
        name = key[len(prefix) + 1:] if key.startswith(prefix + "_") else key
        if "/" in name:
            metric, cls = name.split("/", 1)
            per_class.setdefault(cls, {})[metric] = value
        else:
            headline[name] = value
    return headline, per_class


def run_classification(cfg: FinetuneConfig) -> dict[str, Any]:
    data = load_classification_data(cfg.dataset, cfg.data, cfg.class_names, cfg.problem_type, cfg.split_seed,
                                    cfg.image_column, cfg.strict, cfg.allow_outside_root)
    processor = build_image_processor(cfg)
    model = build_model(cfg, len(data.class_names), data.class_names, data.problem_type)
    _check_input_size(model, processor)
    subset, manifest = take_training_subset(data, cfg)
    collator = ClassificationCollator(processor, data.problem_type)
    compute = classification_compute_metrics(data.problem_type, data.class_names)
    trainer, training = train(model, subset, collator, cfg, compute)
    prediction = trainer.predict(data.test, metric_key_prefix="test")  # logits, labels and compute_metrics at once
    headline, per_class = _nest_per_class(prediction.metrics, "test")

    out = Path(cfg.out)
    logits, labels = prediction.predictions, prediction.label_ids
    if data.problem_type is ProblemType.MULTI_LABEL:
        scores, onehot = _sigmoid(logits), labels
    else:
        scores = np.exp(logits - logits.max(1, keepdims=True))
        scores, onehot = scores / scores.sum(1, keepdims=True), np.eye(len(data.class_names))[labels.astype(int)]
    plot_roc(out / "roc.png", onehot, scores, data.class_names)
    metrics = {
        "macro_auc": headline.get("macro_auc"),
        "accuracy": headline.get("accuracy"),
        "per_class_auc": {name: row.get("auc") for name, row in per_class.items()},
        "per_class_accuracy": {name: row["accuracy"] for name, row in per_class.items() if "accuracy" in row},
        "test_loss": headline.get("loss"),
    }
    return _finish(cfg, data, manifest, training, metrics, per_class, "roc.png", model, processor)


# --------------------------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------------------------
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_boxes(model: PlanForObjectDetection, dataset, processor: PlanImageProcessor, batch_size: int = 16,
                  score_threshold: float = 0.01, nms_iou: float = 0.5) -> list[BoxSet]:
    """Each test image's detections as a `BoxSet` in its original pixels ([x, y, w, h])."""
    model.eval()
    collator, device, results = DetectionCollator(processor), _device(model), []
    batches = tqdm(iterate_examples(dataset, batch_size), total=math.ceil(len(dataset) / batch_size), desc="detect")
    for examples in batches:  # lazily: a test set of full-size DICOMs does not fit in memory at once
        batch = collator(examples)
        found = model.detect(batch["pixel_values"].to(device), score_threshold=score_threshold, nms_iou=nms_iou)
        for i in range(len(examples)):
            keep = found.keep[i].cpu().numpy()
            boxes = boxes_xyxy_to_xywh(found.boxes[i].cpu().numpy()[keep])
            original = processor.boxes_to_original(
                boxes, batch["original_sizes"][i].tolist(), batch["content_boxes"][i].tolist()
            ).reshape(-1, 4)
            labels, scores = found.labels[i].cpu().numpy()[keep], found.scores[i].cpu().numpy()[keep]
            results.append(BoxSet.of(original, labels, scores))
    return results


def run_detection(cfg: FinetuneConfig) -> dict[str, Any]:
    data = load_detection_data(cfg.dataset, cfg.data, cfg.box_classes, cfg.finding_types, cfg.split_seed)
    processor = build_image_processor(cfg)
    model = build_model(cfg, len(data.class_names), data.class_names)
    _check_input_size(model, processor)
    subset, manifest = take_training_subset(data, cfg)
    _, training = train(model, subset, DetectionCollator(processor), cfg)

    predictions = predict_boxes(model, data.test, processor, cfg.batch_size, cfg.score_threshold, cfg.nms_iou)
    truth_rows = data.test.with_format(None)
    truths = [BoxSet.of(b, l) for b, l in zip(truth_rows["boxes"], truth_rows["box_labels"])]
    result = coco_map(predictions, truths, num_classes=len(data.class_names))
    per_class = {name: {"ap": result["ap_per_class"][c]} for c, name in enumerate(data.class_names)}
    metrics = {"map": result["map"], "ap_per_iou": result["ap_per_iou"],
               "ap_per_class": {name: row["ap"] for name, row in per_class.items()},
               "iou_thresholds": list(result["ap_per_iou"])}

    # The picture: the first test images that have boxes, with detections above 0.3 (or the best one).
    with_boxes = [i for i, t in enumerate(truths) if len(t.boxes)]
    shown = with_boxes[: cfg.num_pictures] or list(range(min(cfg.num_pictures, len(truths))))
    if shown:
        rows = data.test.select(shown)
        best = [(p.boxes[p.scores >= 0.3], p.scores[p.scores >= 0.3]) if (p.scores >= 0.3).any()
                else (p.boxes[:1], p.scores[:1]) for p in (predictions[i] for i in shown)]
        plot_detections(Path(cfg.out) / "detections.png", [r["image"] for r in rows], [truths[i].boxes for i in shown],
                        best, [data.ids("test")[i] for i in shown])
    picture = "detections.png" if shown else None
    return _finish(cfg, data, manifest, training, metrics, per_class, picture, model, processor)


# --------------------------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_masks(model: PlanForSegmentation, dataset, processor: PlanImageProcessor, batch_size: int = 16,
                  threshold: float = 0.5, keep: int = 0) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Per-image Dice of thresholded predictions at each image's original size, whether each image has a lesion,
    and (image, true mask, predicted mask) of the first `keep` images for the picture."""
    model.eval()
    collator, device = SegmentationCollator(processor), _device(model)
    dice, positive, kept = [], [], []
    batches = tqdm(iterate_examples(dataset, batch_size), total=math.ceil(len(dataset) / batch_size), desc="segment")
    for examples in batches:
        batch = collator(examples)
        probabilities = model(batch["pixel_values"].to(device)).logits[:, 0].float().sigmoid().cpu()  # (B, S, S)
        for i, example in enumerate(examples):
            # Undo pad and resize on the probabilities, then threshold: the mask is judged at the original size.
            original = processor.heatmap_to_original(
                probabilities[i], batch["original_sizes"][i].tolist(), batch["content_boxes"][i].tolist()
            )
            predicted, truth = original >= threshold, np.asarray(example["mask"], dtype=bool)
            dice.append(float(dice_per_image(predicted, truth)[0]))
            positive.append(bool(truth.any()))
            if len(kept) < keep:
                kept.append((example["image"], truth, predicted))
    return np.asarray(dice), np.asarray(positive, dtype=bool), kept


def run_segmentation(cfg: FinetuneConfig) -> dict[str, Any]:
    data = load_segmentation_data(cfg.dataset, cfg.data, cfg.finding_types, cfg.split_seed)
    processor = build_image_processor(cfg)
    model = build_model(cfg, 1, data.class_names)
    _check_input_size(model, processor)
    subset, manifest = take_training_subset(data, cfg)
    _, training = train(model, subset, SegmentationCollator(processor), cfg)

    dice, positive, kept = predict_masks(model, data.test, processor, cfg.batch_size, cfg.mask_threshold,
                                         keep=cfg.num_pictures)

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else float("nan")

    metrics = {"dice": mean(dice), "dice_with_lesion": mean(dice[positive]),
               "dice_without_lesion": mean(dice[~positive]),
               "num_with_lesion": int(positive.sum()), "mask_threshold": cfg.mask_threshold,
               "empty_empty": "an image with no true and no predicted lesion scores 1"}
    if kept:
        images, truths, predictions = zip(*kept)
        plot_segmentations(Path(cfg.out) / "masks.png", images, truths, predictions, data.ids("test")[: len(kept)])
    return _finish(cfg, data, manifest, training, metrics, None, "masks.png" if kept else None, model, processor)


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------
def _finish(cfg: FinetuneConfig, data: TaskData, manifest: SubsetManifest, training: dict[str, Any],
            metrics: dict[str, Any], per_class: dict | None, picture: str | None, model: PreTrainedModel,
            processor: PlanImageProcessor) -> dict[str, Any]:
    out = Path(cfg.out)
    manifest.write(out / "subset.json")
    run = {
        "task": cfg.task.value, "model": cfg.model, "config": cfg.config, "dataset": cfg.dataset,
        "fraction": cfg.fraction, "seed": cfg.seed, "linear_probe": cfg.linear_probe,
        "num_train": len(manifest.train_ids), "num_test": len(manifest.test_ids), "classes": data.class_names,
    }
    payload = {**run, "metrics": metrics, "training": training,
               "settings": {k: v.value if isinstance(v, Enum) else v for k, v in asdict(cfg).items()}}
    write_json(out / "metrics.json", payload)
    headline = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list, str))}
    headline.update({f"AP@{t}": v for t, v in metrics.get("ap_per_iou", {}).items()})
    headline.update({f"train_{k}": v for k, v in training.items()})
    summary_run = {k: (", ".join(v) if isinstance(v, list) else v) for k, v in run.items()}
    write_summary(out / "summary.md", f"Fine-tuning: {cfg.task.value} on {cfg.dataset}", summary_run, headline,
                  per_class, picture)
    if cfg.save_model:
        model.save_pretrained(out / "model")
        processor.save_pretrained(out / "model")
    return payload


RUNNERS: dict[Task, Callable[[FinetuneConfig], dict[str, Any]]] = {
    Task.CLASSIFICATION: run_classification,
    Task.DETECTION: run_detection,
    Task.SEGMENTATION: run_segmentation,
}


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run one protocol cell (task, data set, fraction, seed, model) and write its report under `cfg.out`."""
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return RUNNERS[cfg.task](cfg)


__all__ = [
    "FinetuneConfig",
    "Task",
    "build_image_processor",
    "build_model",
    "classification_compute_metrics",
    "predict_boxes",
    "predict_masks",
    "run_classification",
    "run_detection",
    "run_finetune",
    "run_segmentation",
    "take_training_subset",
]
