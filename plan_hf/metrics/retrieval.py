"""Image-text retrieval metrics: Recall@K and median rank, and class-aware Precision@K (CheXpert 5x200).

Ties count against the model: an item scored exactly like the correct one is ranked before it, so a model that
scores everything the same gets the worst rank, never a lucky one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def _similarity(similarity: ArrayLike) -> np.ndarray:
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"similarity must be (N_img, N_txt); got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("similarity contains NaN")
    return s


def _positive_matrix(similarity: np.ndarray, positives: ArrayLike | None) -> np.ndarray:
    """``(N_img, N_txt)`` bool matrix of matching pairs from ``None``, a bool matrix, or a ``txt_to_img`` index."""
    num_img, num_txt = similarity.shape
    if positives is None:
        if num_img != num_txt:
            raise ValueError("positives=None means text i describes image i, which needs a square similarity")
        return np.eye(num_img, dtype=bool)
    p = np.asarray(positives)
    if p.dtype == bool:
        if p.shape != similarity.shape:
            raise ValueError(f"a boolean positives matrix must be {similarity.shape}; got {p.shape}")
        return p
    if p.shape != (num_txt,) or not np.issubdtype(p.dtype, np.integer):
        raise ValueError("positives must be None, a bool (N_img, N_txt) matrix or an int txt_to_img of length N_txt")
    if p.min(initial=0) < 0 or p.max(initial=0) >= num_img:
        raise ValueError(f"txt_to_img indices must lie in [0, {num_img})")
    matrix = np.zeros(similarity.shape, dtype=bool)
    matrix[p, np.arange(num_txt)] = True
    return matrix


def _first_positive_rank(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best-scored positive, negatives tied with it ranked first. ``(Q, N) -> (Q,)``."""
    if not positives.any(axis=1).all():
        raise ValueError(f"{int((~positives.any(axis=1)).sum())} queries have no positive to retrieve")
    best_positive = np.where(positives, scores, -np.inf).max(axis=1)  # (Q,)
    return 1 + np.count_nonzero((scores >= best_positive[:, None]) & ~positives, axis=1)


def retrieval_metrics(
    similarity: ArrayLike, positives: ArrayLike | None = None, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@K and median rank from an ``(N_img, N_txt)`` similarity.

    ``positives`` says which pairs match: ``None`` (text i describes image i), an int array ``txt_to_img`` of
    length ``N_txt`` (several captions per image), or a bool ``(N_img, N_txt)`` matrix. A query's rank is the
    1-based rank of its best-scored positive, with tied negatives before it; Recall@K is the share of queries
    with rank <= K. Median rank is ``np.median`` of the ranks (x.5 for an even count of queries). Keys:
    ``i2t_recall@K``, ``i2t_median_rank``, ``t2i_recall@K``, ``t2i_median_rank``.
    """
    s = _similarity(similarity)
    pos = _positive_matrix(s, positives)
    out: dict[str, float] = {}
    for direction, scores, positive in (("i2t", s, pos), ("t2i", s.T, pos.T)):
        ranks = _first_positive_rank(scores, positive)
        for k in ks:
            out[f"{direction}_recall@{k}"] = float(np.mean(ranks <= k))
        out[f"{direction}_median_rank"] = float(np.median(ranks))
    return out


def _precision_at_k(scores: np.ndarray, hits: np.ndarray, k: int) -> float:
    """Mean Precision@k over queries (rows), the tie group straddling the cut filled with misses first."""
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]  # (Q,) k-th largest score
    above = scores > kth[:, None]  # (Q, N), all inside the top k
    tied = scores == kth[:, None]  # the group that fills the remaining slots
    free_slots = k - above.sum(axis=1)
    tied_misses = (tied & ~hits).sum(axis=1)
    tied_hits_taken = np.maximum(0, free_slots - tied_misses)
    return float(np.mean(((above & hits).sum(axis=1) + tied_hits_taken) / k))


def class_precision_at_k(
    similarity: ArrayLike, img_labels: ArrayLike, txt_labels: ArrayLike, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Class-aware Precision@K both ways (CheXpert 5x200): a retrieved item is a hit when its class is the query's.

    Ties at the K-th place are resolved against the model (misses first). K larger than the number of candidates
    is a `ValueError`. Keys: ``i2t_precision@K``, ``t2i_precision@K``.
    """
    s = _similarity(similarity)
    img = np.asarray(img_labels)
    txt = np.asarray(txt_labels)
    if img.shape != (s.shape[0],) or txt.shape != (s.shape[1],):
        raise ValueError(f"labels must be ({s.shape[0]},) and ({s.shape[1]},); got {img.shape} and {txt.shape}")
    same_class = img[:, None] == txt[None, :]  # (N_img, N_txt)
    out: dict[str, float] = {}
    for direction, scores, hits in (("i2t", s, same_class), ("t2i", s.T, same_class.T)):
        for k in ks:
            if not 1 <= k <= scores.shape[1]:
                raise ValueError(f"k={k} is outside [1, {scores.shape[1]}] candidates for {direction}")
            out[f"{direction}_precision@{k}"] = _precision_at_k(scores, hits, k)
    return out
