"""The evaluation sets of each suite, read through `plan_hf.data.loaders` (so the synthetic benchmark and the real
datasets go through the same code): grounding phrases, paired image-report sets, labelled image sets.

Labels follow the CheXpert convention of the loaders (1.0 positive, 0.0 negative, -1.0 uncertain, NaN blank). For a
binary finding, blank counts as negative (a report that does not mention a finding), and uncertain is left out of
that finding's evaluation. Every subsample (``max_samples``, the 5x200 draw) is seeded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Image

from ..data.loaders import (
    CHEXPERT_5X200_CLASSES,
    CHEXPERT_LABELS,
    build_chexpert_5x200,
    load_chexpert,
    load_mimic_cxr,
    load_ms_cxr,
    load_rsna,
    load_siim,
)
from .embed import LazyColumn
from .grounding import GroundingItem

logger = logging.getLogger(__name__)

# Findings evaluated one by one (binary) on MIMIC-style sets: the five 5x200 classes and the other findings the
# synthetic benchmark draws.
BINARY_FINDINGS: tuple[str, ...] = CHEXPERT_5X200_CLASSES + ("Pneumothorax", "Pneumonia", "Lung Opacity", "Lung Lesion")
# MIMIC-CXR names its validation split "validate", MS-CXR "val".
MS_CXR_SPLIT_NAMES = {"validate": "val", "val": "val", "train": "train", "test": "test"}


@dataclass
class ImageSet:
    """Images (lazily read) with per-image texts and/or labels."""

    images: Sequence[Any]
    ids: list[str]
    texts: list[str] | None = None
    labels: np.ndarray | None = None  # (N, C) CheXpert values, or (N,) class indices
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        indices = list(indices)
        images = self.images[indices] if isinstance(self.images, LazyColumn) else [self.images[i] for i in indices]
        return ImageSet(
            images=images,
            ids=[self.ids[i] for i in indices],
            texts=None if self.texts is None else [self.texts[i] for i in indices],
            labels=None if self.labels is None else self.labels[indices],
            label_names=self.label_names,
        )


def _lazy_paths(rows: Any, column: str = "image") -> LazyColumn:
    """Image paths instead of decoded PIL images: rows are read when a batch needs them."""
    undecoded = rows.cast_column(column, Image(decode=False))
    return _PathColumn(undecoded, column)


class _PathColumn(LazyColumn):
    """An undecoded `datasets.Image` column read as file paths (or the bytes' dict when there is no path)."""

    def read(self, value: Any) -> Any:
        return value["path"] if isinstance(value, dict) and value.get("path") else value


def seeded_subset(count: int, max_samples: int | None, seed: int) -> list[int]:
    """All indices, or `max_samples` of them drawn with `default_rng(seed)`, in their original order."""
    if max_samples is None or count <= max_samples:
        return list(range(count))
    return np.sort(np.random.default_rng(seed).choice(count, size=max_samples, replace=False)).tolist()


# --------------------------------------------------------------------------------------------------------------------
# Phrase grounding
# --------------------------------------------------------------------------------------------------------------------
def find_ms_cxr_csv(data_dir: str | os.PathLike[str]) -> Path:
    """The MS-CXR box CSV in `data_dir`: ms_cxr_synthetic.csv or MS_CXR_Local_Alignment_v*.csv (newest)."""
    root = Path(data_dir)
    candidates = sorted(root.glob("MS_CXR_Local_Alignment_v*.csv")) + sorted(root.glob("ms_cxr_synthetic.csv"))
    if not candidates:
        raise FileNotFoundError(f"no MS_CXR_Local_Alignment_v*.csv or ms_cxr_synthetic.csv in {root}")
    return candidates[-1]


def grounding_items(csv_path: str | os.PathLike[str], images_root: str | os.PathLike[str], split: str | None,
                    max_samples: int | None = None, seed: int = 0) -> list[GroundingItem]:
    """MS-CXR phrases of `split` (MIMIC or MS-CXR split names; None or a CSV without a split column: all rows)."""
    has_split = "split" in Path(csv_path).open(encoding="utf-8").readline().strip().split(",")
    wanted = MS_CXR_SPLIT_NAMES.get(split, split) if split is not None and has_split else None
    if split is not None and not has_split:
        logger.warning("%s has no split column (MS-CXR 1.0.0): every phrase is evaluated", csv_path)
    rows = load_ms_cxr(csv_path, images_root, split=wanted)
    paths = _lazy_paths(rows)
    plain = rows.remove_columns("image")
    items = [
        GroundingItem(image=paths[i], phrase=row["label_text"], boxes=row["boxes"], category=row["category_name"],
                      image_id=row["dicom_id"])
        for i, row in enumerate(plain)
    ]
    return [items[i] for i in seeded_subset(len(items), max_samples, seed)]


# --------------------------------------------------------------------------------------------------------------------
# Image sets
# --------------------------------------------------------------------------------------------------------------------
def mimic_image_set(root: str | os.PathLike[str], split: str, max_samples: int | None = None, seed: int = 0) -> ImageSet:
    """Frontal images of a MIMIC-CXR-style split with their report text (findings + impression) and the 14 labels."""
    rows = load_mimic_cxr(root, split=split)
    plain = rows.remove_columns("image")
    labels = np.stack([np.asarray(plain[name], dtype=np.float64) for name in CHEXPERT_LABELS], axis=1)
    full = ImageSet(images=_lazy_paths(rows), ids=list(plain["dicom_id"]), texts=list(plain["text"]), labels=labels,
                    label_names=list(CHEXPERT_LABELS))
    return full.subset(seeded_subset(len(full), max_samples, seed))


def source_image_set(source, split: str, label_columns: Sequence[str] = (), max_samples: int | None = None,
                     seed: int = 0) -> ImageSet:
    """The image-report pairs of any `plan_hf.data.sources.PairSource` split, with its ``label_columns`` (CheXpert
    values: 1.0 positive) when given; images are decoded when a batch reads them."""
    from ..data.sources import load_pairs

    rows = load_pairs(source, split, label_columns=label_columns)
    texts = list(rows.select_columns(["text"])["text"])
    labels = (np.stack([np.asarray(rows.select_columns([name])[name], dtype=np.float64) for name in label_columns],
                       axis=1) if label_columns else None)
    full = ImageSet(images=LazyColumn(rows, "image"), ids=[f"row {i}" for i in range(len(rows))], texts=texts,
                    labels=labels, label_names=list(label_columns) if label_columns else None)
    return full.subset(seeded_subset(len(full), max_samples, seed))


def binary_labels(labels: np.ndarray, label_names: Sequence[str], findings: Sequence[str]) -> np.ndarray:
    """(N, F) 1.0 / 0.0 / NaN (uncertain, left out) of `findings` from CheXpert values; blank counts as negative."""
    columns = np.stack([labels[:, list(label_names).index(name)] for name in findings], axis=1)
    out = np.where(columns == 1.0, 1.0, 0.0)
    out[columns == -1.0] = np.nan
    return out


def single_positive_indices(labels: np.ndarray, label_names: Sequence[str],
                            classes: Sequence[str] = CHEXPERT_5X200_CLASSES, n_per_class: int | None = 200,
                            seed: int = 0) -> tuple[list[int], np.ndarray]:
    """The CheXpert 5x200 rule on any labelled set: images positive (1.0) for exactly one of `classes`, at most
    `n_per_class` of each (seeded draw). Returns (indices in the set, class index of each)."""
    columns = np.stack([labels[:, list(label_names).index(name)] for name in classes], axis=1) == 1.0  # (N, C)
    single = columns.sum(axis=1) == 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    classes_of: list[int] = []
    for c in range(len(classes)):
        candidates = np.flatnonzero(single & columns[:, c])
        if n_per_class is not None and len(candidates) > n_per_class:
            candidates = np.sort(rng.choice(candidates, size=n_per_class, replace=False))
        chosen.extend(candidates.tolist())
        classes_of.extend([c] * len(candidates))
    return chosen, np.asarray(classes_of, dtype=np.int64)


def chexpert_5x200_set(root: str | os.PathLike[str], manifest_path: str | os.PathLike[str], n_per_class: int = 200,
                       seed: int = 0) -> ImageSet:
    """CheXpert 5x200 (drawn from train.csv with `build_chexpert_5x200`, the manifest written next to the results);
    a class with fewer candidates takes them all, and the counts say so."""
    rows = build_chexpert_5x200(load_chexpert(root, "train"), manifest_path, n_per_class=n_per_class, seed=seed,
                                allow_fewer=True)
    plain = rows.remove_columns("image")
    return ImageSet(images=_lazy_paths(rows), ids=list(plain["path"]), labels=np.asarray(plain["label"]),
                    label_names=list(CHEXPERT_5X200_CLASSES))


def dicom_binary_set(loader: str, root: str | os.PathLike[str], max_samples: int | None = None,
                     seed: int = 0) -> ImageSet:
    """RSNA (pneumonia) or SIIM (pneumothorax): images decoded from DICOM on access, one binary label."""
    load, finding, id_column = {"rsna": (load_rsna, "Pneumonia", "patient_id"),
                                "siim": (load_siim, "Pneumothorax", "image_id")}[loader]
    rows = load(root)
    plain = rows.with_format(None)
    indices = seeded_subset(len(plain), max_samples, seed)
    labels = np.asarray(plain["label"], dtype=np.float64)[indices, None]
    return ImageSet(images=LazyColumn(rows, "image", indices), ids=[plain[id_column][i] for i in indices],
                    labels=labels, label_names=[finding])


__all__ = [
    "BINARY_FINDINGS",
    "ImageSet",
    "binary_labels",
    "chexpert_5x200_set",
    "dicom_binary_set",
    "find_ms_cxr_csv",
    "grounding_items",
    "mimic_image_set",
    "seeded_subset",
    "single_positive_indices",
    "source_image_set",
]
