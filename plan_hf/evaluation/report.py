"""The markdown report of an evaluation run (`report.md`): tables of the numbers with their 95% intervals, and the
pictures embedded by relative path."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, str):  # "inf" / "-inf" from metrics.json
        return value
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def with_interval(value: Any, interval: Mapping[str, Any] | None, digits: int = 3) -> str:
    """"0.812 [0.781, 0.840]"."""
    if interval is None:
        return number(value, digits)
    return f"{number(value, digits)} [{number(interval.get('low'), digits)}, {number(interval.get('high'), digits)}]"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _picture(pictures: Mapping[str, str], key: str, caption: str) -> list[str]:
    return [f"![{caption}]({pictures[key]})", ""] if key in pictures else []


def _grounding_section(grounding: Mapping[str, Any], pictures: Mapping[str, str]) -> list[str]:
    lines = ["## Phrase grounding", "",
             "Heat maps mapped back onto the original image; CNR, mIoU (thresholds 0.1-0.5) and pointing game per "
             "phrase, averaged per category, then across categories (macro). Chance = pointing game of a random "
             "point (box area share). `local`: the model's word-pixel grounding map; `global`: dense similarity of "
             "the phrase's global embedding with each projected pixel of the last feature grid. Laterality: share of "
             "one-sided findings whose map holds more mass on the finding's half of the image (chance 0.5). "
             "Same-image correlation: mean Pearson correlation of the maps of different phrases on one image (near "
             "1: the map ignores the phrase). Reference rows (no pre-trained model): `position_prior` = mean training "
             "box mask per category, `position_prior_words` = the same per category and location words, "
             "`grid_ceiling` = the true boxes averaged onto the model's grid, `supervised_ceiling` = a segmentation "
             "model trained on the set's lesion masks.", ""]
    rows = []
    for method, summary in grounding.items():
        if not summary:
            continue
        ci = summary.get("ci", {})
        rows.append([method, str(summary["count"])] + [with_interval(summary["macro"][k], ci.get(k))
                                                       for k in ("cnr", "miou", "pointing", "side")]
                    + [number(summary.get("chance_pointing")), number(summary.get("same_image_map_correlation"))])
    lines += [table(["method", "phrases", "CNR", "mIoU", "pointing game", "laterality", "chance pointing",
                     "same-image correlation"], rows), ""]
    for method, summary in grounding.items():
        if not summary:
            continue
        lines += [f"Per category ({method}):", ""]
        lines += [table(["category", "phrases", "CNR", "mIoU", "pointing game", "laterality"],
                        [[name, str(v["count"]), number(v["cnr"]), number(v["miou"]), number(v["pointing"]),
                          number(v.get("side"))]
                         for name, v in summary["per_category"].items()]), ""]
        lines += _picture(pictures, f"grounding_{method}", f"grounding heat maps ({method})")
    return lines


def _zero_shot_section(zero_shot: Mapping[str, Any], pictures: Mapping[str, str]) -> list[str]:
    lines = ["## Zero-shot classification", "",
             "Prompt ensembles (`plan_hf.prompts`): class embedding = normalised mean of the normalised prompt "
             "embeddings. F1 is the maximum over thresholds and ACC is taken at that threshold (both tuned on this "
             "set). Intervals: 95% percentile bootstrap over images.", ""]
    multi = zero_shot.get("multiclass")
    if multi:
        counts = ", ".join(f"{k} {v}" for k, v in multi["class_counts"].items())
        lines += [f"### Multi-class ({len(multi['class_counts'])} classes, {multi['num_images']} images: {counts})", ""]
        ci = multi["ci"]
        lines += [table(["accuracy", "macro AUC", "macro F1"],
                        [[with_interval(multi["accuracy"], ci["accuracy"]),
                          with_interval(multi["macro_auc"], ci["macro_auc"]),
                          with_interval(multi["macro_f1"], ci["macro_f1"])]]), ""]
        lines += [table(["class", "images", "AUC (one-vs-rest)", "F1"],
                        [[name, str(multi["class_counts"][name]), number(v["auc"]), number(v["f1"])]
                         for name, v in multi["per_class"].items()]), ""]
        lines += _picture(pictures, "roc_multiclass", "ROC curves, multi-class (one-vs-rest)")
    binary = zero_shot.get("binary")
    if binary:
        lines += [f"### Binary (positive vs negative prompts, {binary['num_images']} images)", ""]
        rows = [[name, f"{v['num_positive']}/{v['num_negative']}", with_interval(v["auc"], v["ci"]["auc"]),
                 with_interval(v["f1_max"], v["ci"]["f1_max"]), with_interval(v["accuracy"], v["ci"]["accuracy"]),
                 number(v["threshold"])] for name, v in binary["findings"].items()]
        macro = binary["macro"]
        rows.append(["**macro**", "", number(macro["auc"]), number(macro["f1_max"]), number(macro["accuracy"]), ""])
        lines += [table(["finding", "pos/neg", "AUC", "F1 (max)", "ACC at F1max", "threshold"], rows), ""]
        lines += _picture(pictures, "roc_binary", "ROC curves, binary findings")
    return lines


def _retrieval_section(metrics: Mapping[str, Any], pictures: Mapping[str, str]) -> list[str]:
    lines = ["## Image-text retrieval", ""]
    paired = metrics.get("retrieval")
    if paired:
        lines += [f"{paired['num_images']} images and their own reports (identical reports count as positives of "
                  f"each other; {paired['num_duplicate_texts']} duplicates). Intervals: bootstrap over queries.", ""]
        ci = paired["ci"]
        rows = []
        for direction, label in (("i2t", "image → text"), ("t2i", "text → image")):
            rows.append([label] + [with_interval(paired[f"{direction}_recall@{k}"], ci[f"{direction}_recall@{k}"])
                                   for k in (1, 5, 10)]
                        + [with_interval(paired[f"{direction}_median_rank"], ci[f"{direction}_median_rank"], 1)])
        lines += [table(["direction", "R@1", "R@5", "R@10", "median rank"], rows), ""]
        lines += _picture(pictures, "retrieval_strip", "retrieval strip")
    by_class = metrics.get("class_retrieval")
    if by_class:
        lines += [f"Class-aware retrieval ({by_class['num_images']} images, {by_class['num_texts']} texts; a hit "
                  f"shares the query's class): {by_class.get('texts', '')}", ""]
        ks = [k for k in (1, 5, 10) if f"i2t_precision@{k}" in by_class]
        rows = [[label] + [with_interval(by_class[f"{d}_precision@{k}"], by_class["ci"][f"{d}_precision@{k}"])
                           for k in ks]
                for d, label in (("i2t", "image → text"), ("t2i", "text → image"))]
        lines += [table(["direction"] + [f"P@{k}" for k in ks], rows), ""]
    return lines


def render_report(metrics: Mapping[str, Any], pictures: Mapping[str, str]) -> str:
    """The whole report.md text for an evaluation's metrics dict (see `plan_hf.evaluation.runner`)."""
    lines = [f"# Evaluation: `{metrics['suite']}` suite, split `{metrics['split']}`", "",
             f"- model: `{metrics['model']}`"]
    if metrics.get("benchmark"):
        lines.append(f"- data: {metrics['benchmark']}")
    if metrics.get("objectives"):
        lines.append(f"- objectives: {'; '.join(metrics['objectives'])}")
    lines += [f"- seed {metrics['seed']}, {metrics['n_boot']} bootstrap resamples, max samples "
              f"{metrics['max_samples'] if metrics['max_samples'] is not None else 'all'}",
              f"- time: {', '.join(f'{k} {v:.1f} s' for k, v in metrics.get('seconds', {}).items())}", ""]
    if metrics.get("grounding"):
        lines += _grounding_section(metrics["grounding"], pictures)
    if metrics.get("zero_shot"):
        lines += _zero_shot_section(metrics["zero_shot"], pictures)
    if metrics.get("retrieval") or metrics.get("class_retrieval"):
        lines += _retrieval_section(metrics, pictures)
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["number", "render_report", "table", "with_interval"]
