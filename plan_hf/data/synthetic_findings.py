"""What a synthetic chest X-ray shows: finding types, their sampling, and their CheXpert / MS-CXR labels.

Sides are the *patient's* sides (radiological PA convention): the patient's right lung is on the image's left.
Everything here is drawn from ``np.random.default_rng([seed, index, stream])`` so one image's findings can be
re-derived alone, without drawing its pixels (fast label statistics, tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from .labels import CHEXPERT_5X200_CLASSES, CHEXPERT_LABELS, MS_CXR_CATEGORIES

# Per-image random streams: one per concern, so changing how a report is phrased never moves a drawn lesion.
STREAM_FINDINGS = 1
STREAM_ANATOMY = 2
STREAM_REPORT = 3
STREAM_LATERAL = 4
STREAM_META = 5


class FindingType(str, Enum):
    CONSOLIDATION = "consolidation"
    OPACITY = "opacity"
    PLEURAL_EFFUSION = "pleural_effusion"
    PNEUMOTHORAX = "pneumothorax"
    CARDIOMEGALY = "cardiomegaly"
    NODULE = "nodule"
    ATELECTASIS = "atelectasis"
    EDEMA = "edema"
    SUPPORT_DEVICE = "support_device"


class Side(str, Enum):
    RIGHT = "right"  # patient's right = image left
    LEFT = "left"  # patient's left = image right


class Zone(str, Enum):
    UPPER = "upper"
    MIDDLE = "middle"
    LOWER = "lower"
    APICAL = "apical"
    PERIHILAR = "perihilar"


FIVE_CLASSES = CHEXPERT_5X200_CLASSES


@dataclass(frozen=True)
class FindingSpec:
    """One finding to draw and report. ``sides`` holds two entries for bilateral findings."""

    type: FindingType
    sides: tuple[Side, ...] = ()
    zone: Zone | None = None
    severity: str = "mild"  # small | mild | moderate | large; drives size and report wording
    hedged: bool = False  # reported as "possible ..." -> CheXpert -1.0 (the lesion is still drawn)
    pneumonia: bool = False  # consolidation reported as pneumonia -> CheXpert Pneumonia, MS-CXR "Pneumonia"

    @property
    def bilateral(self) -> bool:
        return len(self.sides) == 2

    def chexpert_labels(self) -> tuple[str, ...]:
        return {
            FindingType.CONSOLIDATION: ("Consolidation", "Lung Opacity") + (("Pneumonia",) if self.pneumonia else ()),
            FindingType.OPACITY: ("Lung Opacity",),
            FindingType.PLEURAL_EFFUSION: ("Pleural Effusion",),
            FindingType.PNEUMOTHORAX: ("Pneumothorax",),
            FindingType.CARDIOMEGALY: ("Cardiomegaly",),
            FindingType.NODULE: ("Lung Lesion",),
            FindingType.ATELECTASIS: ("Atelectasis",),
            FindingType.EDEMA: ("Edema",),
            FindingType.SUPPORT_DEVICE: ("Support Devices",),
        }[self.type]

    def ms_cxr_category(self) -> str | None:
        """MS-CXR's eight categories; nodules and devices have none and stay out of the grounding CSV."""
        return {
            FindingType.CONSOLIDATION: "Pneumonia" if self.pneumonia else "Consolidation",
            FindingType.OPACITY: "Lung Opacity",
            FindingType.PLEURAL_EFFUSION: "Pleural Effusion",
            FindingType.PNEUMOTHORAX: "Pneumothorax",
            FindingType.CARDIOMEGALY: "Cardiomegaly",
            FindingType.ATELECTASIS: "Atelectasis",
            FindingType.EDEMA: "Edema",
        }.get(self.type)


# Relative frequency of each pathology among abnormal images. Chosen so that with 5,000 images each of the five
# 5x200 classes has well over 200 images positive for it alone (see `label_statistics`).
_TYPE_WEIGHTS: dict[FindingType, float] = {
    FindingType.CONSOLIDATION: 0.16,
    FindingType.OPACITY: 0.10,
    FindingType.PLEURAL_EFFUSION: 0.16,
    FindingType.PNEUMOTHORAX: 0.09,
    FindingType.CARDIOMEGALY: 0.14,
    FindingType.NODULE: 0.08,
    FindingType.ATELECTASIS: 0.15,
    FindingType.EDEMA: 0.12,
}
NORMAL_FRACTION = 0.30
SUPPORT_DEVICE_FRACTION = 0.07


def _pick(rng: np.random.Generator, options: tuple | list, p: list[float] | None = None):
    return options[int(rng.choice(len(options), p=p))]


def _one_finding(rng: np.random.Generator, kind: FindingType) -> FindingSpec:
    side = _pick(rng, (Side.RIGHT, Side.LEFT))
    hedged = bool(rng.random() < 0.05)
    if kind in (FindingType.CONSOLIDATION, FindingType.OPACITY):
        zone = _pick(rng, (Zone.UPPER, Zone.MIDDLE, Zone.LOWER), [0.3, 0.3, 0.4])
        sides = (Side.RIGHT, Side.LEFT) if rng.random() < (0.12 if kind is FindingType.CONSOLIDATION else 0.25) else (side,)
        severity = _pick(rng, ("mild", "moderate"))
        pneumonia = kind is FindingType.CONSOLIDATION and bool(rng.random() < 0.3)
        return FindingSpec(kind, sides, zone, severity, hedged, pneumonia)
    if kind is FindingType.PLEURAL_EFFUSION:
        sides = (Side.RIGHT, Side.LEFT) if rng.random() < 0.3 else (side,)
        return FindingSpec(kind, sides, Zone.LOWER, _pick(rng, ("small", "moderate"), [0.55, 0.45]), hedged)
    if kind is FindingType.PNEUMOTHORAX:
        return FindingSpec(kind, (side,), Zone.APICAL, _pick(rng, ("small", "moderate"), [0.5, 0.5]), hedged)
    if kind is FindingType.CARDIOMEGALY:
        return FindingSpec(kind, (), None, _pick(rng, ("mild", "moderate"), [0.6, 0.4]), hedged)
    if kind is FindingType.NODULE:
        zone = _pick(rng, (Zone.UPPER, Zone.MIDDLE, Zone.LOWER))
        return FindingSpec(kind, (side,), zone, _pick(rng, ("small", "mild")), hedged)
    if kind is FindingType.ATELECTASIS:
        zone = _pick(rng, (Zone.MIDDLE, Zone.LOWER), [0.3, 0.7])
        sides = (Side.RIGHT, Side.LEFT) if zone is Zone.LOWER and rng.random() < 0.3 else (side,)
        return FindingSpec(kind, sides, zone, "mild", hedged)
    if kind is FindingType.EDEMA:
        return FindingSpec(kind, (Side.RIGHT, Side.LEFT), Zone.PERIHILAR, _pick(rng, ("mild", "moderate")), hedged)
    raise ValueError(f"no sampler for {kind}")


def sample_findings(seed: int, index: int) -> list[FindingSpec]:
    """The findings of image ``index``: 0-3 distinct pathologies (about 30% normal) plus, rarely, a central line."""
    rng = np.random.default_rng([seed, index, STREAM_FINDINGS])
    kinds = list(_TYPE_WEIGHTS)
    weights = np.array([_TYPE_WEIGHTS[k] for k in kinds])
    num = 0 if rng.random() < NORMAL_FRACTION else int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    chosen = rng.choice(len(kinds), size=num, replace=False, p=weights / weights.sum())
    findings = [_one_finding(rng, kinds[int(i)]) for i in sorted(chosen)]
    if rng.random() < SUPPORT_DEVICE_FRACTION:
        findings.append(FindingSpec(FindingType.SUPPORT_DEVICE, (Side.RIGHT,), None, "mild"))
    return findings


def positive_labels(findings: list[FindingSpec]) -> dict[str, float]:
    """CheXpert values implied by the findings alone: 1.0, or -1.0 when hedged (negations come from the report)."""
    labels: dict[str, float] = {}
    for f in findings:
        for name in f.chexpert_labels():
            value = -1.0 if f.hedged else 1.0
            labels[name] = max(labels.get(name, value), value)
    if not any(v == 1.0 or v == -1.0 for k, v in labels.items() if k != "Support Devices"):
        labels["No Finding"] = 1.0
    return labels


def single_positive_class(labels: dict[str, float]) -> str | None:
    """The one 5x200 class this image is positive for, if exactly one (the CheXpert 5x200 selection rule)."""
    positive = [c for c in FIVE_CLASSES if labels.get(c) == 1.0]
    return positive[0] if len(positive) == 1 else None


def label_statistics(seed: int, num_images: int) -> dict[str, dict[str, int]]:
    """Positive and 5x200 single-positive counts per label, from the sampler alone (no pixels drawn)."""
    positives = {name: 0 for name in CHEXPERT_LABELS}
    single = {name: 0 for name in FIVE_CLASSES}
    for index in range(num_images):
        labels = positive_labels(sample_findings(seed, index))
        for name, value in labels.items():
            positives[name] += value == 1.0
        cls = single_positive_class(labels)
        if cls is not None:
            single[cls] += 1
    return {"positive": positives, "single_positive_5x200": single}
