"""Classification metrics for zero-shot and fine-tuned CXR classifiers: AUC, F1max, accuracy, bootstrap intervals.

Every function returns NaN where its metric is undefined (e.g. AUC of a single-class sample) instead of raising, so
that `bootstrap_ci` can skip such resamples and macro averages can leave such classes out (and say so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike


def _binary(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and scores must be 1-D of the same length; got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must be binary (0/1 or bool)")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y.astype(bool), s


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(starts) - 1  # tie-group id of each sorted position
    first = np.flatnonzero(starts)  # 0-based first position of each group
    last = np.r_[first[1:], x.size] - 1
    ranks = np.empty(x.size)
    ranks[order] = (first + last)[group] / 2 + 1
    return ranks


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Binary ROC AUC (a tied positive-negative pair counts 1/2); NaN when ``y_true`` has one class.

    Computed as the Mann-Whitney U statistic from average ranks, which equals sklearn's ``roc_auc_score`` and is
    cheap enough to call a thousand times in `bootstrap_ci`.
    """
    y, s = _binary(y_true, scores)
    num_pos = int(y.sum())
    num_neg = y.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return math.nan
    rank_sum = _average_ranks(s)[y].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def f1_max(y_true: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over every threshold ``t`` in the distinct scores (predict positive iff ``score >= t``).

    Returns ``(f1, threshold)``; among thresholds with the same best F1 the highest is returned. ``(nan, nan)``
    when ``y_true`` has no positive (F1 is then 0 or undefined at every threshold).
    """
    y, s = _binary(y_true, scores)
    num_pos = int(y.sum())
    if num_pos == 0:
        return math.nan, math.nan
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    # Threshold s_sorted[i] takes its whole tie group, so only the last index of each group is a reachable cut.
    last_of_group = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp, fp, thresholds = tp[last_of_group], fp[last_of_group], s_sorted[last_of_group]
    f1 = 2 * tp / (tp + fp + num_pos)  # 2TP / (2TP + FP + FN), FN = P - TP
    best = int(np.argmax(f1))  # first maximum = highest threshold
    return float(f1[best]), float(thresholds[best])


def accuracy_at(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    """Accuracy of predicting positive iff ``score >= threshold``."""
    y, s = _binary(y_true, scores)
    return float(np.mean((s >= threshold) == y))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class_names for {num_classes} classes")
    return names


def _nanmean(values: Sequence[float]) -> float:
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def multiclass_metrics(
    y_true: ArrayLike, logits: ArrayLike, class_names: Sequence[str] | None = None
) -> dict[str, object]:
    """Single-label metrics (e.g. CheXpert 5x200 zero-shot) from ``(N, C)`` logits and ``(N,)`` integer labels.

    The prediction is ``argmax`` (ties go to the lower class index). Macro F1 averages over the classes present
    in ``y_true`` or the predictions (as sklearn's ``f1_score(average="macro")``); a class with support but no
    correct prediction has F1 0. AUC is one-vs-rest on the softmax probabilities (as
    sklearn's ``multi_class="ovr"``: the logit of one class alone does not rank samples the same way); the macro
    AUC leaves out classes whose AUC is undefined. Returns
    ``{"accuracy", "macro_f1", "macro_auc", "per_class": {name: {"auc", "f1"}}}``.
    """
    y = np.asarray(y_true)
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"expected logits (N, C) and y_true (N,); got {z.shape} and {y.shape}")
    num_classes = z.shape[1]
    if not np.issubdtype(y.dtype, np.integer) or y.min(initial=0) < 0 or y.max(initial=0) >= num_classes:
        raise ValueError(f"y_true must hold integer class indices in [0, {num_classes})")
    names = _class_names(class_names, num_classes)
    pred = z.argmax(axis=1)
    probs = _softmax(z)
    onehot_true = y[:, None] == np.arange(num_classes)  # (N, C)
    onehot_pred = pred[:, None] == np.arange(num_classes)
    tp = (onehot_true & onehot_pred).sum(axis=0)
    # 2TP / (2TP + FP + FN) = 2TP / (support + predicted); 0/0 only for a class absent from both.
    denominator = onehot_true.sum(axis=0) + onehot_pred.sum(axis=0)
    per_class_f1 = np.divide(2 * tp, denominator, out=np.zeros(num_classes), where=denominator > 0)
    per_class = {
        name: {"auc": roc_auc(onehot_true[:, c], probs[:, c]), "f1": float(per_class_f1[c])}
        for c, name in enumerate(names)
    }
    return {
        "accuracy": float(np.mean(pred == y)),
        "macro_f1": float(per_class_f1[denominator > 0].mean()),
        "macro_auc": _nanmean([v["auc"] for v in per_class.values()]),
        "per_class": per_class,
    }


def multilabel_metrics(
    y_true: ArrayLike,
    scores: ArrayLike,
    class_names: Sequence[str] | None = None,
    threshold: float | None = None,
) -> dict[str, object]:
    """Per-class AUC, F1max and accuracy for ``(N, C)`` binary labels and scores, and their macro averages.

    Accuracy is taken at ``threshold`` when given, else at each class's F1max threshold (tuned on the evaluated
    set itself, like F1max; say so when reporting it). Macro means leave out classes where a metric is
    undefined. Returns ``{"per_class": {name: {"auc", "f1_max", "threshold", "accuracy"}},
    "macro": {"auc", "f1_max", "accuracy"}}``.
    """
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"y_true and scores must both be (N, C); got {y.shape} and {s.shape}")
    names = _class_names(class_names, y.shape[1])
    per_class: dict[str, dict[str, float]] = {}
    for c, name in enumerate(names):  # C is small (5 to 14 findings); each column is vectorised
        f1, best_threshold = f1_max(y[:, c], s[:, c])
        at = best_threshold if threshold is None else threshold
        per_class[name] = {
            "auc": roc_auc(y[:, c], s[:, c]),
            "f1_max": f1,
            "threshold": best_threshold,
            "accuracy": math.nan if math.isnan(at) else accuracy_at(y[:, c], s[:, c], at),
        }
    macro = {key: _nanmean([v[key] for v in per_class.values()]) for key in ("auc", "f1_max", "accuracy")}
    return {"per_class": per_class, "macro": macro}


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float | int]:
    """Seeded percentile bootstrap interval of ``metric_fn(*arrays)``, resampling rows of all arrays jointly.

    Resamples where ``metric_fn`` returns NaN (undefined, e.g. AUC of a single-class resample) are skipped and
    counted; ``metric_fn`` should return NaN rather than raise there, as every metric in this package does.
    Returns ``{"estimate", "low", "high", "n_boot", "num_skipped"}`` with ``low``/``high`` the ``alpha/2`` and
    ``1 - alpha/2`` quantiles of the kept resamples (NaN if none was kept).
    """
    data = [np.asarray(a) for a in arrays]
    if not data:
        raise ValueError("bootstrap_ci needs at least one array")
    n = data[0].shape[0]
    if any(a.shape[0] != n for a in data):
        raise ValueError(f"all arrays must have the same number of rows; got {[a.shape[0] for a in data]}")
    rng = np.random.default_rng(seed)
    # One index draw per resample (not an (n_boot, n) block, which would not fit for large test sets).
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        values[b] = float(metric_fn(*(a[idx] for a in data)))
    kept = values[~np.isnan(values)]
    low, high = (
        np.quantile(kept, [alpha / 2, 1 - alpha / 2]) if kept.size else (math.nan, math.nan)
    )
    return {
        "estimate": float(metric_fn(*data)),
        "low": float(low),
        "high": float(high),
        "n_boot": n_boot,
        "num_skipped": int(n_boot - kept.size),
    }
