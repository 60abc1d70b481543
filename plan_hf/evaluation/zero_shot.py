"""Zero-shot classification: prompt-set class embeddings, multi-class (CheXpert 5x200) and binary (RSNA, SIIM, each
synthetic finding) scores, and their metrics with seeded bootstrap intervals.

Aggregation is documented in `plan_hf.prompts`: class embedding = normalised mean of the normalised prompt
embeddings; multi-class = softmax over the classes' positive embeddings; binary = softmax over one finding's
positive vs negative embedding. F1 is the maximum over thresholds and accuracy is taken at that threshold (both tuned
on the evaluated set itself, as the CheXpert zero-shot literature reports them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..metrics import accuracy_at, bootstrap_ci, f1_max, multiclass_metrics, roc_auc
from ..prompts import ClassPrompts
from .embed import embed_images, embed_texts, logit_scale


def class_embeddings(model, processor, prompts: Mapping[str, Sequence[str]], batch_size: int = 64) -> np.ndarray:
    """(C, d): per class, the normalised mean of its prompts' normalised text embeddings."""
    names = list(prompts)
    flat = [sentence for name in names for sentence in prompts[name]]
    if any(len(prompts[name]) == 0 for name in names):
        raise ValueError("every class needs at least one prompt")
    embeddings = embed_texts(model, processor, flat, batch_size=batch_size, progress=False)
    bounds = np.cumsum([0] + [len(prompts[name]) for name in names])
    means = np.stack([embeddings[bounds[i]:bounds[i + 1]].mean(axis=0) for i in range(len(names))])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def multiclass_logits(image_embeds: np.ndarray, class_embeds: np.ndarray, scale: float) -> np.ndarray:
    """(N, C) logits s * v . e_c."""
    return scale * image_embeds @ class_embeds.T


def binary_probabilities(image_embeds: np.ndarray, positive_embeds: np.ndarray, negative_embeds: np.ndarray,
                         scale: float) -> np.ndarray:
    """(N, C) P(finding c present) = softmax(s * [v . e_pos_c, v . e_neg_c])[0]."""
    logits = scale * np.stack([image_embeds @ positive_embeds.T, image_embeds @ negative_embeds.T], axis=-1)
    return _softmax(logits)[..., 0]


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------
def _interval(result: Mapping[str, Any]) -> dict[str, float]:
    return {"low": float(result["low"]), "high": float(result["high"])}


def multiclass_evaluation(labels: np.ndarray, logits: np.ndarray, class_names: Sequence[str], n_boot: int = 1000,
                          seed: int = 0) -> dict[str, Any]:
    """`multiclass_metrics` + class counts + 95% bootstrap intervals of accuracy, macro AUC and macro F1."""
    labels = np.asarray(labels, dtype=np.int64)
    # Log-probabilities: the same argmax as the logits, and a one-vs-rest ranking of the softmax probabilities
    # (what the AUC must rank) whether or not the metric applies a softmax itself.
    log_probabilities = _log_softmax(np.asarray(logits, dtype=np.float64))
    metrics = multiclass_metrics(labels, log_probabilities, class_names)
    ci = {
        key: _interval(bootstrap_ci(lambda y, z, key=key: multiclass_metrics(y, z, class_names)[key], labels,
                                    log_probabilities, n_boot=n_boot, seed=seed))
        for key in ("accuracy", "macro_auc", "macro_f1")
    }
    counts = {name: int((labels == c).sum()) for c, name in enumerate(class_names)}
    return {"num_images": int(labels.size), "class_counts": counts, **metrics, "ci": ci}


def binary_evaluation(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """AUC, F1max, its threshold and the accuracy there, with bootstrap intervals, for one finding."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    f1, threshold = f1_max(labels, scores)
    result: dict[str, Any] = {
        "num_positive": int(labels.sum()),
        "num_negative": int((~labels).sum()),
        "auc": roc_auc(labels, scores),
        "f1_max": f1,
        "threshold": threshold,
        "accuracy": math.nan if math.isnan(threshold) else accuracy_at(labels, scores, threshold),
    }

    def f1_only(y: np.ndarray, s: np.ndarray) -> float:
        return f1_max(y, s)[0]

    def accuracy_at_best(y: np.ndarray, s: np.ndarray) -> float:
        best = f1_max(y, s)[1]
        return math.nan if math.isnan(best) else accuracy_at(y, s, best)

    result["ci"] = {name: _interval(bootstrap_ci(fn, labels, scores, n_boot=n_boot, seed=seed))
                    for name, fn in (("auc", roc_auc), ("f1_max", f1_only), ("accuracy", accuracy_at_best))}
    return result


def binary_set_evaluation(labels: np.ndarray, scores: np.ndarray, names: Sequence[str], n_boot: int = 1000,
                          seed: int = 0) -> dict[str, Any]:
    """Per-finding `binary_evaluation` over (N, C) labels (1 positive, 0 negative, NaN: left out for that finding),
    and macro means over the findings whose metric is defined."""
    labels = np.asarray(labels, dtype=np.float64)
    findings = {}
    for c, name in enumerate(names):
        known = ~np.isnan(labels[:, c])
        findings[name] = binary_evaluation(labels[known, c] == 1, scores[known, c], n_boot=n_boot, seed=seed)
    macro = {}
    for key in ("auc", "f1_max", "accuracy"):
        values = [f[key] for f in findings.values() if not math.isnan(f[key])]
        macro[key] = float(np.mean(values)) if values else math.nan
    return {"findings": findings, "macro": macro}


# --------------------------------------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ZeroShotResult:
    """Metrics (JSON-ready) and the raw scores, kept for ROC curves."""

    metrics: dict[str, Any]
    class_names: list[str]
    labels: np.ndarray  # (N,) class indices (multi-class) or (N, C) 1/0/NaN (binary)
    scores: np.ndarray  # (N, C) softmax probabilities (multi-class) or P(positive) (binary)
    extra: dict[str, Any] = field(default_factory=dict)


def zero_shot_multiclass(model, processor, images: Sequence[Any], labels: Sequence[int],
                         prompts: Mapping[str, ClassPrompts], batch_size: int = 32, n_boot: int = 1000, seed: int = 0,
                         image_embeds: np.ndarray | None = None, progress: bool = True) -> ZeroShotResult:
    """Multi-class zero-shot (each image has exactly one of the classes): argmax over positive class embeddings."""
    names = list(prompts)
    if image_embeds is None:
        image_embeds = embed_images(model, processor, images, batch_size=batch_size, progress=progress)
    positive = class_embeddings(model, processor, {n: p.positive for n, p in prompts.items()})
    logits = multiclass_logits(image_embeds, positive, logit_scale(model))
    labels = np.asarray(labels, dtype=np.int64)
    metrics = multiclass_evaluation(labels, logits, names, n_boot=n_boot, seed=seed)
    metrics["prompts_per_class"] = {n: len(p.positive) for n, p in prompts.items()}
    return ZeroShotResult(metrics, names, labels, _softmax(logits))


def zero_shot_binary(model, processor, images: Sequence[Any], labels: np.ndarray,
                     prompts: Mapping[str, ClassPrompts], batch_size: int = 32, n_boot: int = 1000, seed: int = 0,
                     image_embeds: np.ndarray | None = None, progress: bool = True) -> ZeroShotResult:
    """Binary zero-shot per finding: positive vs negative prompt sets. labels: (N, C), NaN = not known."""
    names = list(prompts)
    if image_embeds is None:
        image_embeds = embed_images(model, processor, images, batch_size=batch_size, progress=progress)
    positive = class_embeddings(model, processor, {n: p.positive for n, p in prompts.items()})
    negative = class_embeddings(model, processor, {n: p.negative for n, p in prompts.items()})
    scores = binary_probabilities(image_embeds, positive, negative, logit_scale(model))
    labels = np.asarray(labels, dtype=np.float64).reshape(len(scores), len(names))
    metrics = binary_set_evaluation(labels, scores, names, n_boot=n_boot, seed=seed)
    metrics["num_images"] = int(len(scores))
    return ZeroShotResult(metrics, names, labels, scores)


__all__ = [
    "ZeroShotResult",
    "binary_evaluation",
    "binary_probabilities",
    "binary_set_evaluation",
    "class_embeddings",
    "multiclass_evaluation",
    "multiclass_logits",
    "zero_shot_binary",
    "zero_shot_multiclass",
]
