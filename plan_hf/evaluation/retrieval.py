"""Image-text retrieval: Recall@K / median rank over paired images and reports (each image's own report is its
positive), and class-aware Precision@K (CheXpert 5x200), with seeded bootstrap intervals over the queries.

Intervals resample the *queries* and keep every candidate, so they say how much the score depends on which queries
were drawn, not on the gallery's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..metrics import bootstrap_ci, class_precision_at_k, retrieval_metrics
from .embed import embed_images, embed_texts

DIRECTIONS = ("i2t", "t2i")


def first_positive_ranks(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best-scored positive, tied negatives ranked before it (as `retrieval_metrics`).

    scores, positives: (Q, N) query x candidate -> (Q,)
    """
    best_positive = np.where(positives, scores, -np.inf).max(axis=1)  # (Q,)
    return 1 + np.count_nonzero((scores >= best_positive[:, None]) & ~positives, axis=1)


def _interval(result: dict[str, Any]) -> dict[str, float]:
    return {"low": float(result["low"]), "high": float(result["high"])}


def retrieval_evaluation(similarity: np.ndarray, positives: np.ndarray | None = None, ks: Sequence[int] = (1, 5, 10),
                         n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """`retrieval_metrics` (+ `ci` of each Recall@K and median rank). similarity: (N_img, N_txt); positives: None
    (text i is image i's) or a bool (N_img, N_txt) matrix."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if positives is None:
        positives = np.eye(*similarity.shape, dtype=bool)
    metrics: dict[str, Any] = {"num_images": int(similarity.shape[0]), "num_texts": int(similarity.shape[1]),
                               **retrieval_metrics(similarity, positives, ks)}
    ci: dict[str, dict[str, float]] = {}
    for direction, scores, positive in (("i2t", similarity, positives), ("t2i", similarity.T, positives.T)):
        ranks = first_positive_ranks(scores, positive)
        for k in ks:
            ci[f"{direction}_recall@{k}"] = _interval(
                bootstrap_ci(lambda r, k=k: float(np.mean(r <= k)), ranks, n_boot=n_boot, seed=seed))
        ci[f"{direction}_median_rank"] = _interval(
            bootstrap_ci(lambda r: float(np.median(r)), ranks, n_boot=n_boot, seed=seed))
    metrics["ci"] = ci
    return metrics


def class_retrieval_evaluation(similarity: np.ndarray, image_labels: Sequence[Any], text_labels: Sequence[Any],
                               ks: Sequence[int] = (1, 5, 10), n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """`class_precision_at_k` (+ `ci` of each, resampling the queries of each direction)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    image_labels, text_labels = np.asarray(image_labels), np.asarray(text_labels)
    ks = [k for k in ks if k <= min(similarity.shape)]
    metrics: dict[str, Any] = {"num_images": int(similarity.shape[0]), "num_texts": int(similarity.shape[1]),
                               **class_precision_at_k(similarity, image_labels, text_labels, ks)}
    ci: dict[str, dict[str, float]] = {}
    rows = np.arange(similarity.shape[0])
    columns = np.arange(similarity.shape[1])
    for k in ks:
        ci[f"i2t_precision@{k}"] = _interval(bootstrap_ci(
            lambda r, k=k: class_precision_at_k(similarity[r], image_labels[r], text_labels, [k])[f"i2t_precision@{k}"],
            rows, n_boot=n_boot, seed=seed))
        ci[f"t2i_precision@{k}"] = _interval(bootstrap_ci(
            lambda c, k=k: class_precision_at_k(similarity[:, c], image_labels, text_labels[c], [k])[
                f"t2i_precision@{k}"], columns, n_boot=n_boot, seed=seed))
    metrics["ci"] = ci
    return metrics


@dataclass
class RetrievalResult:
    metrics: dict[str, Any]
    similarity: np.ndarray  # (N_img, N_txt) cosine similarities
    positives: np.ndarray | None = None  # (N_img, N_txt) bool, paired retrieval only


def paired_retrieval(model, processor, images: Sequence[Any], texts: Sequence[str], batch_size: int = 32,
                     n_boot: int = 1000, seed: int = 0, image_embeds: np.ndarray | None = None,
                     progress: bool = True) -> RetrievalResult:
    """Report i belongs to image i. Identical report texts (e.g. two normal studies written the same) are all
    positives of each other's images, so a model is not penalised for not telling copies apart."""
    if len(images) != len(texts):
        raise ValueError(f"paired retrieval needs one text per image, got {len(images)} and {len(texts)}")
    if image_embeds is None:
        image_embeds = embed_images(model, processor, images, batch_size=batch_size, progress=progress)
    text_embeds = embed_texts(model, processor, texts, batch_size=batch_size, progress=progress)
    similarity = image_embeds @ text_embeds.T
    normalised = np.array([" ".join(t.split()).lower() for t in texts])
    positives = normalised[:, None] == normalised[None, :]  # (N, N), the diagonal included
    metrics = retrieval_evaluation(similarity, positives, n_boot=n_boot, seed=seed)
    metrics["num_duplicate_texts"] = int(len(texts) - len(set(normalised.tolist())))
    return RetrievalResult(metrics, similarity, positives)


def class_retrieval(model, processor, images: Sequence[Any], image_labels: Sequence[Any], texts: Sequence[str],
                    text_labels: Sequence[Any], batch_size: int = 32, n_boot: int = 1000, seed: int = 0,
                    image_embeds: np.ndarray | None = None, progress: bool = True) -> RetrievalResult:
    """Class-aware retrieval: a retrieved item is a hit when its class is the query's."""
    if image_embeds is None:
        image_embeds = embed_images(model, processor, images, batch_size=batch_size, progress=progress)
    text_embeds = embed_texts(model, processor, texts, batch_size=batch_size, progress=progress)
    similarity = image_embeds @ text_embeds.T
    return RetrievalResult(class_retrieval_evaluation(similarity, image_labels, text_labels, n_boot=n_boot, seed=seed),
                           similarity)


__all__ = [
    "RetrievalResult",
    "class_retrieval",
    "class_retrieval_evaluation",
    "first_positive_ranks",
    "paired_retrieval",
    "retrieval_evaluation",
]
