"""Phrase grounding, MS-CXR protocol: each (image, phrase) heat map mapped back onto the ORIGINAL image, CNR / mIoU /
pointing game against the phrase's boxes per pair, averaged per category, then across categories.

Two ways to get a heat map (`HeatmapMethod`):

* ``local``: the model's own grounding map (`PlanModel.get_grounding_maps`: for PLAN each word's dense soft region
  softmax(w.p / tau_s), weighted by the word gate; GLoRIA's and MGCA's word attention), through
  `plan_hf.grounding.ground_phrases`;
* ``global``: the dense similarity of the phrase's *global* text embedding with each pixel of the last feature grid
  put through the *global* image projection (softmax over pixels). This is how a CLIP-style model without a local
  objective grounds (BioViL's way), so it is the fair baseline for a ``global``-only model, whose word and pixel
  projections are never trained.

`evaluate_grounding` scores reference rows with the same metrics (`plan_hf.evaluation.references`: position priors,
grid ceiling, supervised ceiling).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..grounding import grid_heatmaps, ground_phrases
from ..metrics import (
    aggregate_by_category,
    bootstrap_ci,
    boxes_to_mask,
    cnr,
    grounding_miou,
    pointing_game,
    side_agreement,
    signed_cnr,
)
from ..modeling_plan import encode_image_tower
from .embed import TEXT_INPUT_NAMES, inference_mode, logit_scale, model_device, pooled_embedding

METRIC_KEYS = ("cnr", "signed_cnr", "miou", "pointing", "side")


class HeatmapMethod(str, Enum):
    LOCAL = "local"
    GLOBAL = "global"


@dataclass
class GroundingItem:
    """One MS-CXR phrase: its image (anything `PlanImageProcessor` reads), text, boxes [[x, y, w, h], ...] in the
    original image's pixels, and category."""

    image: Any
    phrase: str
    boxes: list[list[float]]
    category: str
    image_id: str = ""


# --------------------------------------------------------------------------------------------------------------------
# Heat maps
# --------------------------------------------------------------------------------------------------------------------
def dense_similarity_maps(model, processor, images: Sequence[Any], phrases: Sequence[str], batch_size: int = 16
                          ) -> list[np.ndarray]:
    """``global`` heat maps over the original images: softmax_n(s * t . normalise(W_v p_n)), each summing to 1."""
    device = model_device(model)
    maps: list[np.ndarray] = []
    scale = logit_scale(model)
    with inference_mode(model):
        for start in range(0, len(images), batch_size):
            batch = processor(text=list(phrases[start:start + batch_size]),
                              images=list(images[start:start + batch_size]), return_tensors="pt")
            text_inputs = {k: batch[k].to(device) for k in TEXT_INPUT_NAMES if k in batch}
            text = torch.nn.functional.normalize(pooled_embedding(model.get_text_features(**text_inputs)), dim=-1)  # (b, d)
            tower = encode_image_tower(model.vision_model, batch["pixel_values"].to(device))  # last grid (b, N, C)
            pixels = torch.nn.functional.normalize(model.visual_projection(tower.grid), dim=-1)  # (b, N, d)
            weights = torch.softmax(scale * torch.einsum("bd,bnd->bn", text, pixels), dim=-1)  # (b, N)
            height, width = tower.grid_size
            for grid_map, size, box in zip(weights.view(-1, height, width).float().cpu().numpy(),
                                           batch["original_sizes"].tolist(), batch["content_boxes"].tolist()):
                full = processor.image_processor.heatmap_to_original(grid_map, size, box)
                maps.append(full / np.nansum(full))
    return maps


def grid_oracle_maps(image_processor, images: Sequence[Any], boxes: Sequence[Sequence[Sequence[float]]],
                     grid: int) -> list[np.ndarray]:
    """The best heat maps a model with a `grid` x `grid` feature grid can give: the true boxes' mask in the model's
    input square, averaged onto the grid, and mapped back onto the original image as a model's map is.

    Scoring these gives the ceiling of each metric at that resolution (a small box holding no grid cell's centre
    cannot win the pointing game, whatever the model learns).
    """
    maps = []
    for image, item_boxes in zip(images, boxes):
        batch = image_processor([image], return_tensors="np")
        size = [int(v) for v in batch["original_sizes"][0]]
        content_box = [int(v) for v in batch["content_boxes"][0]]
        side = int(batch["pixel_values"].shape[-1])
        square = boxes_to_mask(image_processor.boxes_to_processed(item_boxes, size, content_box), side, side)
        cell = side / grid
        rows = np.minimum((np.arange(side) / cell).astype(int), grid - 1)
        pooled = np.zeros((grid, grid))
        np.add.at(pooled, (rows[:, None], rows[None, :]), square)  # (grid, grid) box pixels per cell
        maps.append(image_processor.heatmap_to_original(pooled.astype(np.float32), size, content_box))
    return maps


HeatmapFn = Callable[[Any, Any, Sequence[Any], Sequence[str], int], list[np.ndarray]]
HEATMAP_FUNCTIONS: dict[HeatmapMethod, HeatmapFn] = {
    HeatmapMethod.LOCAL: lambda model, processor, images, phrases, batch_size: ground_phrases(
        model, processor, images, phrases, batch_size=batch_size),
    HeatmapMethod.GLOBAL: dense_similarity_maps,
}


def available_methods(model) -> list[HeatmapMethod]:
    """The heat-map methods a model supports: ``local`` needs `get_grounding_maps`, ``global`` a visual projection."""
    methods = []
    if hasattr(model, "get_grounding_maps"):
        methods.append(HeatmapMethod.LOCAL)
    if hasattr(model, "visual_projection") and hasattr(model, "vision_model"):
        methods.append(HeatmapMethod.GLOBAL)
    return methods


# --------------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------------
def score_heatmap(heatmap: np.ndarray, boxes: Sequence[Sequence[float]]) -> dict[str, float]:
    """CNR (the field's |contrast| and the signed one), mIoU, pointing game and side agreement (laterality, NaN for
    findings not on one side) of one heat map (original pixels, NaN outside the image) against its boxes."""
    return {"cnr": cnr(heatmap, boxes), "signed_cnr": signed_cnr(heatmap, boxes), "miou": grounding_miou(heatmap, boxes),
            "pointing": pointing_game(heatmap, boxes), "side": side_agreement(heatmap, boxes)}


def box_area_fraction(boxes: Sequence[Sequence[float]], height: int, width: int) -> float:
    """The share of the image the boxes cover: the pointing game of a uniformly random point (chance level)."""
    return float(boxes_to_mask(boxes, height, width).mean()) if boxes else math.nan


def macro_mean(values: np.ndarray, category_ids: np.ndarray) -> float:
    """Mean over categories of each category's NaN-ignoring mean (`aggregate_by_category`'s macro), vectorised for
    the bootstrap: categories without a defined value are left out."""
    defined = ~np.isnan(values)
    sums = np.bincount(category_ids[defined], weights=values[defined], minlength=category_ids.max(initial=0) + 1)
    counts = np.bincount(category_ids[defined], minlength=sums.size)
    return float((sums[counts > 0] / counts[counts > 0]).mean()) if counts.any() else math.nan


THUMBNAIL_SIDE = 24


def thumbnail(heatmap: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """A (side, side) antialiased copy of a heat map (NaN filled with the mean), for comparing maps of one image."""
    filled = np.where(np.isnan(heatmap), np.nanmean(heatmap), heatmap).astype(np.float32)
    return np.asarray(Image.fromarray(filled).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64)


def same_image_correlation(thumbnails: Sequence[np.ndarray], image_ids: Sequence[str]) -> float:
    """Mean Pearson correlation between the heat maps of *different* phrases on the *same* image (over every such
    pair; items without an image id are not paired). Near 1: the map hardly depends on the phrase (a saliency map
    of the image); NaN when no image has two phrases."""
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for picture, image_id in zip(thumbnails, image_ids):
        if image_id:
            groups[image_id].append(picture.ravel())
    correlations = []
    for maps in groups.values():
        for a in range(len(maps)):
            for b in range(a + 1, len(maps)):
                if maps[a].std() > 0 and maps[b].std() > 0:
                    correlations.append(float(np.corrcoef(maps[a], maps[b])[0, 1]))
    return float(np.mean(correlations)) if correlations else math.nan


def summarise(records: Sequence[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """`aggregate_by_category` of per-phrase records, plus `ci` (bootstrap over phrases) of each macro score and
    `chance_pointing`, the pointing game of a random point averaged the same way (per category, then across)."""
    summary = aggregate_by_category(records, keys=METRIC_KEYS)
    categories = sorted({str(r["category"]) for r in records})
    category_ids = np.array([categories.index(str(r["category"])) for r in records])
    chance = np.array([r["chance_pointing"] for r in records], dtype=np.float64)
    summary["chance_pointing"] = macro_mean(chance, category_ids)
    ci = {}
    for key in METRIC_KEYS:
        values = np.array([r[key] for r in records], dtype=np.float64)
        result = bootstrap_ci(macro_mean, values, category_ids, n_boot=n_boot, seed=seed)
        ci[key] = {"low": result["low"], "high": result["high"]}
    summary["ci"] = ci
    return summary


@dataclass
class GroundingResult:
    """Per-method summaries, per-phrase records, and the heat maps of the phrases chosen for the picture."""

    metrics: dict[str, Any]  # {method: summary}
    records: dict[str, list[dict[str, Any]]]  # {method: [{"index", "category", "phrase", "cnr", ...}, ...]}
    shown: list[int]  # indices of the items whose heat maps are kept
    heatmaps: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # {method: {index: map}}


def choose_examples(items: Sequence[GroundingItem], count: int = 8, seed: int = 0) -> list[int]:
    """`count` item indices for the picture: one per category first (categories sorted), then the rest, seeded."""
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[int]] = defaultdict(list)
    for index in rng.permutation(len(items)).tolist():
        by_category[items[index].category].append(index)
    chosen: list[int] = []
    while len(chosen) < min(count, len(items)):
        for category in sorted(by_category):
            if by_category[category] and len(chosen) < count:
                chosen.append(by_category[category].pop(0))
    return chosen


def _chunks(count: int, size: int, desc: str, progress: bool) -> Iterator[range]:
    for start in tqdm(range(0, count, size), desc=desc, unit="batch", disable=not progress or count == 0, leave=False):
        yield range(start, min(start + size, count))


# A reference row's maps: model-free or from another model (`plan_hf.evaluation.references`), one per item.
ReferenceFn = Callable[[Sequence[GroundingItem]], list[np.ndarray]]


def evaluate_grounding(model, processor, items: Sequence[GroundingItem],
                       methods: Sequence[HeatmapMethod | str] = (HeatmapMethod.LOCAL,), batch_size: int = 16,
                       n_boot: int = 1000, seed: int = 0, num_examples: int = 8, progress: bool = True,
                       heatmap_functions: dict[HeatmapMethod, HeatmapFn] | None = None,
                       references: dict[str, ReferenceFn] | None = None) -> GroundingResult:
    """Score every item with each method, then with each reference row (name -> maps of a batch of items), all with
    the same metrics; only the `num_examples` chosen items' heat maps are kept in memory (full-resolution maps of a
    thousand MS-CXR phrases would not fit)."""
    functions = heatmap_functions or HEATMAP_FUNCTIONS
    sources: dict[str, ReferenceFn] = {
        HeatmapMethod(m).value: lambda batch, fn=functions[HeatmapMethod(m)]: fn(
            model, processor, [item.image for item in batch], [item.phrase for item in batch], batch_size)
        for m in methods
    }
    sources.update(references or {})
    shown = choose_examples(items, num_examples, seed)
    result = GroundingResult(metrics={}, records={}, shown=shown)
    for name, maps_of in sources.items():
        records: list[dict[str, Any]] = []
        kept: dict[int, np.ndarray] = {}
        thumbnails: list[np.ndarray] = []
        for chunk in _chunks(len(items), batch_size, f"Grounding ({name})", progress):
            batch = [items[i] for i in chunk]
            heatmaps = maps_of(batch)
            for index, item, heatmap in zip(chunk, batch, heatmaps):
                records.append({"index": index, "image_id": item.image_id, "category": item.category,
                                "phrase": item.phrase, **score_heatmap(heatmap, item.boxes),
                                "chance_pointing": box_area_fraction(item.boxes, *heatmap.shape)})
                thumbnails.append(thumbnail(heatmap))
                if index in shown:
                    kept[index] = heatmap
        result.metrics[name] = summarise(records, n_boot=n_boot, seed=seed) if records else {}
        if records:
            result.metrics[name]["same_image_map_correlation"] = same_image_correlation(
                thumbnails, [str(item.image_id) for item in items])
        result.records[name] = records
        result.heatmaps[name] = kept
    return result


__all__ = [
    "GroundingItem",
    "GroundingResult",
    "HEATMAP_FUNCTIONS",
    "HeatmapMethod",
    "METRIC_KEYS",
    "ReferenceFn",
    "available_methods",
    "box_area_fraction",
    "choose_examples",
    "dense_similarity_maps",
    "evaluate_grounding",
    "grid_oracle_maps",
    "macro_mean",
    "same_image_correlation",
    "thumbnail",
    "score_heatmap",
    "summarise",
]
