"""Fine-tuning data: each benchmark's train/test splits with one target column per task, and the batch collators.

Every task set is a pair of `datasets.Dataset`s whose rows give ``image`` (anything `PlanImageProcessor` reads, decoded
when the row is read) plus the task's targets in the **original** image's pixels:

- classification: ``labels``, a float list (multi-label, BCE) or an int (multi-class, CE);
- detection: ``boxes`` (list of ``[x, y, w, h]``, x, y = top-left) and ``box_labels`` (class indices);
- segmentation: ``mask``, bool (H, W) at the image's size.

Published splits are kept (MIMIC-CXR-style synthetic: train/test of the split CSV; CheXpert: train.csv / valid.csv;
a `datasets` source's train and test); sets published without one (RSNA, SIIM, a user's CSV, a source with one split)
get a seeded patient-level split (`seeded_split`). The training fraction of the protocol is taken afterwards, from the
training split only (`seeded_subset`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from ..data.labels import CHEXPERT_5X200_CLASSES
from ..data.sources import PairSource, load_labelled, source_splits
from ..data.synthetic_findings import FindingType
from ..image_processing_plan import PlanImageProcessor
from .splits import seeded_split

# The five CheXpert competition tasks: MGCA/GLoRIA's fine-tuning classes, the same five as the 5x200 protocol's.
CHEXPERT_COMPETITION_TASKS: tuple[str, ...] = CHEXPERT_5X200_CLASSES
# Uncertain (-1) labels: the per-class policy of the CheXpert paper as GLoRIA/MGCA apply it (U-Ones where it helped,
# U-Zeros elsewhere); classes not listed become 0. Blank labels become 0 (not mentioned = not reported present).
CHEXPERT_UNCERTAIN_POLICY: dict[str, float] = {
    "Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0, "Pleural Effusion": 1.0,
}
# Synthetic finding types that make boxes and masks: every lesion type; support devices are not findings.
SYNTHETIC_LESION_TYPES: tuple[str, ...] = tuple(
    sorted(kind.value for kind in FindingType if kind is not FindingType.SUPPORT_DEVICE)
)


class DatasetName(str, Enum):
    CHEXPERT = "chexpert"
    RSNA = "rsna"
    SIIM = "siim"
    CSV = "csv"
    SYNTHETIC = "synthetic"


class ProblemType(str, Enum):
    MULTI_LABEL = "multi_label_classification"
    SINGLE_LABEL = "single_label_classification"


@dataclass
class TaskData:
    """A task's train and test sets, its class names, and the column that names each row (image or patient id)."""

    train: Dataset
    test: Dataset
    class_names: list[str]
    id_column: str
    problem_type: ProblemType = ProblemType.MULTI_LABEL

    def ids(self, split: str) -> list[str]:
        return [str(v) for v in getattr(self, split).with_format(None)[self.id_column]]


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------
def chexpert_targets(values: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """(N, C) CheXpert values (1, 0, -1, NaN) -> (N, C) float32 {0, 1}: NaN -> 0, -1 -> `CHEXPERT_UNCERTAIN_POLICY`."""
    values = np.asarray(values, dtype=np.float32)
    uncertain_value = np.array([CHEXPERT_UNCERTAIN_POLICY.get(name, 0.0) for name in class_names], dtype=np.float32)
    targets = np.where(np.isnan(values), 0.0, values)
    return np.where(targets == -1, uncertain_value[None, :], targets).astype(np.float32)


def _columns(dataset: Dataset, names: Sequence[str]) -> np.ndarray:
    """(N, len(names)) of metadata columns, read without decoding any image (no transform, no Image decoding)."""
    plain = dataset.with_format(None)
    return np.stack([np.asarray(plain[name], dtype=np.float32) for name in names], axis=1)


def _image_paths(dataset: Dataset) -> list[str]:
    return [item["path"] for item in dataset.with_format(None).cast_column("image", Image(decode=False))["image"]]


def _split_by_seed(dataset: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded train/test for sets published without a split. The validation part is held out (unused: no model
    selection in the fixed-budget protocol), so the train split does not change if early stopping is added."""
    split = seeded_split(len(dataset), seed=seed)
    return dataset.select(split["train"]), dataset.select(split["test"])


def _with_column(dataset: Dataset, name: str, values: list) -> Dataset:
    # add_column keeps a dataset's lazy transform (DICOM decoding), so images stay undecoded.
    if name in dataset.column_names:
        dataset = dataset.remove_columns(name)
    return dataset.add_column(name, values)


# --------------------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------------------
def _labelled_task(full: Dataset, columns: Sequence[str], problem: ProblemType | None, split_seed: int,
                   test: Dataset | None = None) -> TaskData:
    """A task from image rows and their label `columns`: multi-label 0/1 columns (blank: 0) by default; single-label
    from one column of class indices (a `ClassLabel` names its classes). Named by the image path (``image_id``; the
    row when the image is bytes). Without `test`, a seeded split of `full`."""
    columns = list(columns)
    label = full.features.get(columns[0])
    named = label.names if len(columns) == 1 and isinstance(label, ClassLabel) else None
    problem = problem or (ProblemType.SINGLE_LABEL if named else ProblemType.MULTI_LABEL)
    if named and problem is ProblemType.MULTI_LABEL:
        raise ValueError(f"column {columns[0]!r} holds one class per image ({', '.join(named)}): it is a "
                         "single_label_classification task")
    if problem is ProblemType.SINGLE_LABEL and len(columns) != 1:
        raise ValueError(f"single_label_classification takes one column of class indices, got {columns}")

    def with_labels(part: Dataset, split: str | None) -> Dataset:
        where = f"{split} row" if split else "row"
        values = _columns(part, columns)
        if problem is ProblemType.SINGLE_LABEL:
            if np.isnan(values).any():
                row = int(np.flatnonzero(np.isnan(values[:, 0]))[0])
                raise ValueError(f"{where} {row} has no class in column {columns[0]!r}")
            labels: list = values[:, 0].astype(np.int64).tolist()
        else:
            labels = np.nan_to_num(values, nan=0.0).tolist()
        part = _with_column(part, "labels", labels)
        if "image_path" in part.column_names:
            return part
        paths = _image_paths(part)
        return _with_column(part, "image_id", [path or f"{where} {i}" for i, path in enumerate(paths)])

    if test is None:
        full = with_labels(full, None)
        train, test = _split_by_seed(full, split_seed)
    else:
        train, test = with_labels(full, "train"), with_labels(test, "test")
    if problem is ProblemType.SINGLE_LABEL:
        classes = named or [str(c) for c in range(max([*train["labels"], *test["labels"]]) + 1)]
    else:
        classes = columns
    id_column = "image_path" if "image_path" in train.column_names else "image_id"
    return TaskData(train, test, classes, id_column, problem)


def _source_task(source: PairSource, class_names: Sequence[str] | None, problem: ProblemType | None,
                 split_seed: int) -> TaskData:
    """A `datasets` source (`load_labelled`): its train and test (or validation) splits when it has both, else a
    seeded split of the whole."""
    splits = source_splits(source) or []
    test_split = next((name for name in ("test", "validation", "valid") if name in splits), None)
    full = load_labelled(source, "train", class_names)
    columns = [name for name in full.column_names if name != "image"]
    test = None
    if "train" in splits and test_split is not None:
        test = load_labelled(source, test_split, columns)
    return _labelled_task(full, columns, problem, split_seed, test)


def load_classification_data(
    dataset: str | DatasetName,
    data: str | os.PathLike[str] | None,
    class_names: Sequence[str] | None = None,
    problem_type: str | ProblemType | None = None,
    split_seed: int = 0,
    image_column: str = "image",
    strict: bool = False,
    allow_outside_root: bool = False,
) -> TaskData:
    """Train/test sets with a ``labels`` column.

    - ``chexpert``: `data` is the CheXpert folder; train.csv / valid.csv (frontal); the five competition tasks.
    - ``synthetic``: `data` is a `plan_hf.data.synthetic` (or MIMIC-CXR-JPG) root; the split CSV's train / test; the
      five tasks from the CheXpert-label CSV.
    - ``rsna``: pneumonia yes/no, one multi-label output ("Pneumonia"); seeded patient split.
    - ``csv``: `data` is a CSV/JSONL with an ``image`` column and `class_names` label columns (`load_image_text`);
      multi-label (0/1 columns) by default; ``single_label_classification`` takes one column of class indices.
    - any `datasets` source of `plan_hf.data.sources` (``imagefolder``, ``disk``, ``parquet``, ``arrow``, or a
      `load_dataset` name with `data` None): `image_column` and the `class_names` label columns, read as ``csv``'s;
      without `class_names`, the one `ClassLabel` column (an imagefolder of class sub-folders: single-label, the
      folders' names). Its train and test (or validation) splits when it has both, else a seeded split.
    """
    from ..data.loaders import load_chexpert, load_image_text, load_mimic_cxr, load_rsna

    problem = ProblemType(problem_type) if problem_type is not None else None
    if dataset not in {name.value for name in DatasetName}:  # a datasets source (load_labelled refuses the lists)
        try:
            source = PairSource(dataset=str(dataset), data_dir=data, image_column=image_column, strict=strict,
                                allow_outside_root=allow_outside_root)
        except ValueError as error:
            raise ValueError(f"classification: {error}") from error
        return _source_task(source, class_names, problem, split_seed)
    name = DatasetName(dataset)
    if name in (DatasetName.CHEXPERT, DatasetName.SYNTHETIC):
        classes = list(class_names or CHEXPERT_COMPETITION_TASKS)
        if name is DatasetName.CHEXPERT:
            train, test, id_column = load_chexpert(data, "train"), load_chexpert(data, "valid"), "path"
        else:
            splits, id_column = load_mimic_cxr(data), "dicom_id"
            train, test = splits["train"], splits["test"]
        train = _with_column(train, "labels", chexpert_targets(_columns(train, classes), classes).tolist())
        test = _with_column(test, "labels", chexpert_targets(_columns(test, classes), classes).tolist())
        return TaskData(train, test, classes, id_column, ProblemType.MULTI_LABEL)
    if name is DatasetName.RSNA:
        full = load_rsna(data)
        full = _with_column(full, "labels", [[float(v)] for v in full.with_format(None)["label"]])
        train, test = _split_by_seed(full, split_seed)
        return TaskData(train, test, ["Pneumonia"], "patient_id", ProblemType.MULTI_LABEL)
    if name is DatasetName.CSV:
        if not class_names:
            raise ValueError("dataset 'csv' needs the label column names (class_names / --label-columns)")
        full = load_image_text(data, text_column=None, label_columns=list(class_names))
        return _labelled_task(full, class_names, problem, split_seed)
    raise ValueError(f"classification takes chexpert, rsna, csv, synthetic or a datasets source, got {name.value!r}")


# --------------------------------------------------------------------------------------------------------------------
# Detection and segmentation: the synthetic benchmark's findings.jsonl, RSNA boxes, SIIM masks
# --------------------------------------------------------------------------------------------------------------------
def _read_findings(root: Path) -> list[dict[str, Any]]:
    with open(root / "findings.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _synthetic_splits(
    root: Path, records: list[dict], columns: dict[str, list], features: dict
) -> tuple[Dataset, Dataset]:
    splits = [r["split"] for r in records]
    table = Dataset.from_dict(
        {"image": [str(root / r["path"]) for r in records], "dicom_id": [r["dicom_id"] for r in records], **columns},
        features=Features({"image": Image(), "dicom_id": Value("string"), **features}),
    )
    pick = lambda split: table.select([i for i, s in enumerate(splits) if s == split])  # noqa: E731
    return pick("train"), pick("test")


def load_detection_data(
    dataset: str | DatasetName,
    data: str | os.PathLike[str],
    box_classes: str = "agnostic",
    finding_types: Sequence[str] = SYNTHETIC_LESION_TYPES,
    split_seed: int = 0,
) -> TaskData:
    """Train/test sets with ``boxes`` ([x, y, w, h] original pixels) and ``box_labels``.

    - ``rsna``: pneumonia boxes, one class; seeded patient split (negatives kept: their detections are false positives).
    - ``synthetic``: the boxes of `finding_types` in ``findings.jsonl`` (every image, normal ones too); one class
      "finding" (``box_classes="agnostic"``, RSNA's one-class protocol) or one class per type (``"type"``).
    """
    from ..data.loaders import load_rsna

    name = DatasetName(dataset)
    if name is DatasetName.RSNA:
        full = load_rsna(data)
        full = _with_column(full, "box_labels", [[0] * len(b) for b in full.with_format(None)["boxes"]])
        train, test = _split_by_seed(full, split_seed)
        return TaskData(train, test, ["pneumonia"], "patient_id")
    if name is DatasetName.SYNTHETIC:
        if box_classes not in ("agnostic", "type"):
            raise ValueError(f"box_classes must be 'agnostic' or 'type', got {box_classes!r}")
        root = Path(data)
        records = _read_findings(root)
        types = sorted(finding_types)
        classes = ["finding"] if box_classes == "agnostic" else types
        boxes, labels = [], []
        for record in records:
            kept = [(box, f["type"]) for f in record["findings"] if f["type"] in types for box in f["boxes"]]
            boxes.append([[float(v) for v in box] for box, _ in kept])
            labels.append([0 if box_classes == "agnostic" else types.index(kind) for _, kind in kept])
        train, test = _synthetic_splits(
            root, records, {"boxes": boxes, "box_labels": labels},
            {"boxes": List(List(Value("float32"))), "box_labels": List(Value("int64"))},
        )
        return TaskData(train, test, classes, "dicom_id")
    raise ValueError(f"detection takes rsna or synthetic, got {name.value!r}")


class SyntheticMaskDecoder:
    """Lazy transform adding ``mask``: the pixels of `masks/<dicom_id>.png` with any of ``mask_bits`` set, bool (H, W);
    or bool (K, H, W) when ``mask_bits`` is a list (one bit set per class).

    A class, not a closure, so DataLoader workers can pickle it.
    """

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        masks = []
        for path, bits in zip(batch["mask_path"], batch["mask_bits"]):
            pixels = np.asarray(PILImage.open(path))
            masks.append((pixels[None] & np.asarray(bits)[:, None, None]) > 0 if isinstance(bits, list) else
                         (pixels & bits) > 0)
        return {**batch, "mask": masks}


def load_segmentation_data(
    dataset: str | DatasetName,
    data: str | os.PathLike[str],
    finding_types: Sequence[str] = SYNTHETIC_LESION_TYPES,
    split_seed: int = 0,
    categories: Sequence[str] | None = None,
) -> TaskData:
    """Train/test sets whose rows give ``mask`` (bool, original size) on access; one class.

    - ``siim``: pneumothorax masks (RLE rows merged); seeded split.
    - ``synthetic``: the union of the `finding_types` masks of each image (all lesions by default; pass
      ``["pneumothorax"]`` for a SIIM-like task), from ``masks/<dicom_id>.png`` bit planes. With ``categories``
      (MS-CXR category names) instead one class per category: ``mask`` is (K, H, W), channel k the findings of
      category k (the phrase-grounding categories; `finding_types` is then not used).
    """
    from ..data.loaders import load_siim

    name = DatasetName(dataset)
    if name is DatasetName.SIIM:
        train, test = _split_by_seed(load_siim(data), split_seed)
        return TaskData(train, test, ["pneumothorax"], "image_id")
    if name is DatasetName.SYNTHETIC:
        root = Path(data)
        records = _read_findings(root)
        types = set(finding_types)
        if categories is None:
            bits: list = [sum(f["mask_bit"] for f in r["findings"] if f["type"] in types) for r in records]
            bits_feature: Any = Value("int64")
            labels = ["finding" if types == set(SYNTHETIC_LESION_TYPES) else "+".join(sorted(types))]
        else:
            bits = [[sum(f["mask_bit"] for f in r["findings"] if f["category"] == c) for c in categories]
                    for r in records]
            bits_feature, labels = List(Value("int64")), list(categories)
        train, test = _synthetic_splits(
            root, records, {"mask_path": [str(root / r["mask_path"]) for r in records], "mask_bits": bits},
            {"mask_path": Value("string"), "mask_bits": bits_feature},
        )
        decoder = SyntheticMaskDecoder()
        return TaskData(train.with_transform(decoder), test.with_transform(decoder), labels, "dicom_id")
    raise ValueError(f"segmentation takes siim or synthetic, got {name.value!r}")


# --------------------------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------------------------
def mask_to_processed(mask: np.ndarray, content_box: Sequence[int], side: int) -> np.ndarray:
    """A bool (H, W) mask of the original image -> float32 (side, side) on the processor's padded square (nearest)."""
    top, left, height, width = (int(v) for v in content_box)
    image = PILImage.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    resized = image.resize((width, height), PILImage.Resampling.NEAREST)
    square = np.zeros((side, side), dtype=np.float32)
    square[top : top + height, left : left + width] = np.asarray(resized) > 127
    return square


def boxes_xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def boxes_xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


class _ImageCollator:
    def __init__(self, image_processor: PlanImageProcessor):
        self.image_processor = image_processor

    def images(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """pixel_values (B, C, S, S), original_sizes (B, 2), content_boxes (B, 4)."""
        processed = self.image_processor([e["image"] for e in examples], return_tensors="pt", return_geometry=True)
        return dict(processed)


class ClassificationCollator(_ImageCollator):
    """Examples with ``image`` and ``labels`` -> `PlanForImageClassification` inputs; every other column is dropped,
    which is why the Trainer recipe sets ``remove_unused_columns=False`` (it would otherwise delete ``image`` first,
    since the model's forward does not name it)."""

    def __init__(self, image_processor: PlanImageProcessor, problem_type: ProblemType | str = ProblemType.MULTI_LABEL):
        super().__init__(image_processor)
        self.problem_type = ProblemType(problem_type)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": self.images(examples)["pixel_values"]}
        if self.problem_type is ProblemType.MULTI_LABEL:
            batch["labels"] = torch.tensor(np.asarray([e["labels"] for e in examples], dtype=np.float32))  # (B, C)
        else:
            batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)  # (B,)
        return batch


class DetectionCollator(_ImageCollator):
    """-> pixel_values, boxes (B, N, 4) xyxy in processed pixels and box_labels (B, N), padded with -1 labels."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.images(examples)
        count = max([len(e["boxes"]) for e in examples] + [1])  # >= 1: a batch of negatives still has a box axis
        boxes = np.zeros((len(examples), count, 4), dtype=np.float32)
        labels = np.full((len(examples), count), -1, dtype=np.int64)
        for i, example in enumerate(examples):
            if len(example["boxes"]):
                processed = self.image_processor.boxes_to_processed(
                    np.asarray(example["boxes"], dtype=np.float64).reshape(-1, 4),
                    batch["original_sizes"][i].tolist(), batch["content_boxes"][i].tolist(),
                )
                boxes[i, : len(processed)] = boxes_xywh_to_xyxy(processed)
                labels[i, : len(processed)] = example["box_labels"]
        batch.update(boxes=torch.from_numpy(boxes), box_labels=torch.from_numpy(labels))
        return batch


class SegmentationCollator(_ImageCollator):
    """-> pixel_values and masks (B, S, S), or (B, K, S, S) for (K, H, W) masks, float {0, 1} on the processed
    square."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.images(examples)
        side = batch["pixel_values"].shape[-1]
        masks = []
        for example, box in zip(examples, batch["content_boxes"].tolist()):
            mask = np.asarray(example["mask"])
            masks.append(np.stack([mask_to_processed(m, box, side) for m in mask]) if mask.ndim == 3 else
                         mask_to_processed(mask, box, side))
        batch["masks"] = torch.from_numpy(np.stack(masks))
        return batch


def iterate_examples(dataset: Dataset, batch_size: int):
    """Row dicts in batches (decoded as the dataset decodes them), for evaluation loops that need the raw targets."""
    for start in range(0, len(dataset), batch_size):
        columns = dataset[start : start + batch_size]
        size = len(next(iter(columns.values())))
        yield [{key: values[i] for key, values in columns.items()} for i in range(size)]


__all__ = [
    "CHEXPERT_COMPETITION_TASKS",
    "CHEXPERT_UNCERTAIN_POLICY",
    "ClassificationCollator",
    "DatasetName",
    "DetectionCollator",
    "ProblemType",
    "SYNTHETIC_LESION_TYPES",
    "SegmentationCollator",
    "SyntheticMaskDecoder",
    "TaskData",
    "boxes_xywh_to_xyxy",
    "boxes_xyxy_to_xywh",
    "chexpert_targets",
    "iterate_examples",
    "load_classification_data",
    "load_detection_data",
    "load_segmentation_data",
    "mask_to_processed",
]
