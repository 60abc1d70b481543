"""Reference rows of the grounding table: heat maps that need no pre-trained model, scored with the same phrases and
metrics as a model's maps, so that every number is read against what position alone, the grid and supervision give.

* ``position_prior``: the best *fixed-position* map, the mean of the training phrases' box masks per category (in
  relative image coordinates). A model whose maps code position only can at most reach it.
* ``position_prior_words``: the same, per category and the location words of the phrase ("left", "basilar", ...),
  backing off to the category alone: what a positional code that reads the phrase's location words can reach.
* ``grid_ceiling``: the true boxes averaged onto the model's feature grid (`grid_oracle_maps`): what the grid's
  resolution allows.
* ``supervised_ceiling``: a segmentation model trained on the benchmark's own lesion masks, one output channel per
  phrase category (`benchmarks.supervised_ceiling` trains it): what the images allow a supervised model at that
  resolution.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..image_processing_plan import _resize, load_image
from ..metrics import boxes_to_mask
from .grounding import GroundingItem, ReferenceFn, grid_oracle_maps

logger = logging.getLogger(__name__)

PRIOR_RESOLUTION = 128
PRIOR_MIN_PHRASES = 5  # a location-word key needs this many training phrases, else it backs off to the category
CEILING_FILE = "supervised_ceiling.json"  # next to the ceiling's weights: its categories and training benchmark

_BILATERAL = {"bilateral", "both", "bibasilar", "biapical", "bibasal"}
_UPPER = {"upper", "apical", "apex", "apices", "biapical"}
_LOWER = {"lower", "basilar", "base", "bases", "basal", "bibasilar", "bibasal", "costophrenic"}
_MIDDLE = {"mid", "middle", "lingula", "lingular", "perihilar"}


def location_words(phrase: str) -> tuple[str, str]:
    """(side, zone) a phrase names: side in {"left", "right", "bilateral", ""}, zone in {"upper", "middle",
    "lower", ""} ("" when the phrase does not say)."""
    words = set(re.findall(r"[a-z]+", phrase.lower()))
    left, right = bool(words & {"left", "lingula", "lingular"}), "right" in words
    side = "bilateral" if words & _BILATERAL or (left and right) else "left" if left else "right" if right else ""
    zone = "upper" if words & _UPPER else "lower" if words & _LOWER else "middle" if words & _MIDDLE else ""
    return side, zone


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of an image, read from the file header when it is an image file."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                return opened.height, opened.width
        except OSError:  # DICOM and other formats PIL does not open: decode
            pass
    return tuple(load_image(image).shape)  # type: ignore[return-value]


@dataclass
class PositionPrior:
    """Mean box masks of training phrases on a `PRIOR_RESOLUTION` square of relative image coordinates (x / width,
    y / height), per key (category, side, zone); side and zone are "" in the category-only prior."""

    maps: dict[tuple[str, str, str], np.ndarray]
    counts: dict[tuple[str, str, str], int]
    use_location_words: bool = False
    everything: np.ndarray = field(default=None)  # type: ignore[assignment]  # all phrases: for unseen categories

    @classmethod
    def fit(cls, phrases: Sequence[dict[str, Any]], use_location_words: bool = False,
            resolution: int = PRIOR_RESOLUTION) -> "PositionPrior":
        """``phrases``: dicts with ``category_name``, ``label_text``, ``boxes`` ([[x, y, w, h], ...] original pixels),
        ``image_width`` and ``image_height`` (the rows of `load_ms_cxr`)."""
        if not phrases:
            raise ValueError("a position prior needs training phrases; got none")
        sums: dict[tuple[str, str, str], np.ndarray] = defaultdict(lambda: np.zeros((resolution, resolution)))
        counts: dict[tuple[str, str, str], int] = defaultdict(int)
        total = np.zeros((resolution, resolution))
        for row in phrases:
            scale = np.array([resolution / row["image_width"], resolution / row["image_height"]] * 2)
            mask = boxes_to_mask(np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 4) * scale,
                                 resolution, resolution)
            total += mask
            for key in cls._keys(row["category_name"], row["label_text"], use_location_words):
                sums[key] += mask
                counts[key] += 1
        maps = {key: (sums[key] / counts[key]).astype(np.float32) for key in sums}
        return cls(maps, dict(counts), use_location_words, (total / len(phrases)).astype(np.float32))

    @classmethod
    def from_csv(cls, csv_path: str | Path, images_root: str | Path, split: str = "train",
                 use_location_words: bool = False) -> "PositionPrior":
        """Fitted on the `split` phrases of an MS-CXR-style CSV (no image is read)."""
        from ..data.loaders import load_ms_cxr

        rows = load_ms_cxr(csv_path, images_root, split=split, check_files=False).remove_columns("image")
        return cls.fit(rows.to_list(), use_location_words)

    @staticmethod
    def _keys(category: str, phrase: str, use_location_words: bool) -> list[tuple[str, str, str]]:
        """The keys a phrase is counted under and looked up by, most specific first."""
        if not use_location_words:
            return [(category, "", "")]
        side, zone = location_words(phrase)
        return list(dict.fromkeys([(category, side, zone), (category, side, ""), (category, "", "")]))

    def grid_map(self, category: str, phrase: str) -> np.ndarray:
        """The prior's map for a phrase on its relative-coordinate square."""
        for key in self._keys(category, phrase, self.use_location_words):
            if key in self.maps and (key[1:] == ("", "") or self.counts[key] >= PRIOR_MIN_PHRASES):
                return self.maps[key]
        return self.everything

    def __call__(self, items: Sequence[GroundingItem]) -> list[np.ndarray]:
        """Each item's prior map stretched over its image (a `ReferenceFn`)."""
        return [_resize(self.grid_map(item.category, item.phrase), *image_size(item.image)) for item in items]


class SupervisedCeiling:
    """A `PlanForSegmentation` with one output channel per phrase category; an item's map is the sigmoid of its
    category's channel mapped back onto the original image (a `ReferenceFn`)."""

    def __init__(self, model, image_processor, benchmark: str | None = None, batch_size: int = 16):
        self.model = model.eval()
        self.image_processor = image_processor
        self.categories = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.benchmark = benchmark
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "SupervisedCeiling":
        """From the folder `benchmarks.supervised_ceiling` writes (or the ``model`` folder inside it)."""
        from ..downstream.segmentation import PlanForSegmentation
        from ..image_processing_plan import PlanImageProcessor

        path = Path(path)
        if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
            path = path / "model"
        if not (path / CEILING_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no {CEILING_FILE}: not a supervised-ceiling export "
                                    "(python -m benchmarks.supervised_ceiling writes one)")
        info = json.loads((path / CEILING_FILE).read_text(encoding="utf-8"))
        model = PlanForSegmentation.from_pretrained(path).to(device)
        return cls(model, PlanImageProcessor.from_pretrained(path), info.get("benchmark"))

    @torch.inference_mode()
    def __call__(self, items: Sequence[GroundingItem]) -> list[np.ndarray]:
        unknown = sorted({item.category for item in items} - set(self.categories))
        if unknown:
            raise ValueError(f"the supervised ceiling has no channel for the categories {unknown}; "
                             f"it was trained on {self.categories}")
        device = next(self.model.parameters()).device
        maps = []
        for start in range(0, len(items), self.batch_size):
            batch_items = items[start:start + self.batch_size]
            batch = self.image_processor([item.image for item in batch_items], return_tensors="pt",
                                         return_geometry=True)
            probabilities = self.model(batch["pixel_values"].to(device)).logits.float().sigmoid().cpu()  # (B, K, S, S)
            for i, item in enumerate(batch_items):
                channel = probabilities[i, self.categories.index(item.category)]
                maps.append(self.image_processor.heatmap_to_original(
                    channel, batch["original_sizes"][i].tolist(), batch["content_boxes"][i].tolist()))
        return maps


def grid_ceiling(image_processor, grid: int) -> ReferenceFn:
    """`grid_oracle_maps` at a `grid` x `grid` feature grid as a `ReferenceFn`."""
    return lambda items: grid_oracle_maps(image_processor, [i.image for i in items], [i.boxes for i in items], grid)


def position_priors(csv_path: str | Path, images_root: str | Path, split: str = "train") -> dict[str, ReferenceFn]:
    """Both position-prior rows fitted on `split` of the CSV; none (with a warning) when that split is empty or
    the CSV has no split column (MS-CXR 1.0.0): fitting on the evaluated phrases would not be a baseline."""
    try:
        return {"position_prior": PositionPrior.from_csv(csv_path, images_root, split),
                "position_prior_words": PositionPrior.from_csv(csv_path, images_root, split, use_location_words=True)}
    except ValueError as error:
        logger.warning("no position prior: %s (%s, split %r)", error, csv_path, split)
        return {}


__all__ = ["CEILING_FILE", "PositionPrior", "SupervisedCeiling", "grid_ceiling", "image_size", "location_words",
           "position_priors"]
