"""Phrase grounding: a phrase's heat map over the ORIGINAL image (resize and pad undone), and pictures of it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .image_processing_plan import load_image


GROUNDING_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "word_ids", "content_boxes")


@contextmanager
def inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """eval() and no_grad() for the duration, the model's previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def ground_phrases(model, processor, images: Sequence[Any], phrases: Sequence[str], batch_size: int = 16,
                   device: torch.device | str | None = None) -> list[np.ndarray]:
    """Heat maps of phrase i on image i, each float32 (H_i, W_i) over original image i, summing to ~1 inside it.

    images: anything `PlanImageProcessor` reads (arrays, PIL, paths, DICOM). Pixels the model never saw (none, for
    images from the processor) would be NaN.
    """
    maps: list[np.ndarray] = []
    for batch, grid_maps in grid_heatmaps(model, processor, images, phrases, batch_size, device):
        for grid_map, size, box in zip(grid_maps, batch["original_sizes"].tolist(), batch["content_boxes"].tolist()):
            full = processor.image_processor.heatmap_to_original(grid_map, size, box)
            maps.append(full / np.nansum(full))  # a distribution over the original pixels
    return maps


def grid_heatmaps(model, processor, images: Sequence[Any], phrases: Sequence[str], batch_size: int = 16,
                  device: torch.device | str | None = None) -> Iterator[tuple[Any, np.ndarray]]:
    """(processor batch, its phrases' heat maps on the model's feature grid (b, h, w) as float32 numpy), batch by
    batch, from `get_grounding_maps` in inference mode; the batch carries the geometry to map them back."""
    if len(images) != len(phrases):
        raise ValueError(f"ground_phrases needs one phrase per image, got {len(images)} images and {len(phrases)} phrases")
    device = device or next(model.parameters()).device
    with inference_mode(model):
        for start in range(0, len(images), batch_size):
            batch = processor(text=list(phrases[start:start + batch_size]), images=list(images[start:start + batch_size]),
                              return_tensors="pt")
            _require_words(batch, phrases[start:start + batch_size])
            inputs = {k: batch[k].to(device) for k in GROUNDING_INPUT_NAMES if k in batch}
            yield batch, model.get_grounding_maps(**inputs).heatmaps.float().cpu().numpy()


def _require_words(batch: Any, phrases: Sequence[str]) -> None:
    """A phrase without a word to ground (empty, or only stop-words and punctuation, which the processor leaves out
    of the word regions) has no map: say which, rather than return an all-NaN picture."""
    if "word_ids" in batch:
        has_words = (batch["word_ids"] >= 0).any(dim=1)
    else:  # the model then takes every token between [CLS] and [SEP] as a word
        has_words = batch["attention_mask"].sum(dim=1) > 2
    empty = [phrase for phrase, ok in zip(phrases, has_words.tolist()) if not ok]
    if empty:
        raise ValueError(f"nothing to ground in phrase {empty[0]!r}: it is empty or holds only stop-words and "
                         "punctuation; name a finding (e.g. 'left pleural effusion')")


def ground_phrase(model, processor, image: Any, phrase: str) -> np.ndarray:
    """The heat map of `phrase` on `image`: float32 with the original image's height and width."""
    return ground_phrases(model, processor, [image], [phrase])[0]


def _colormap(values: np.ndarray) -> np.ndarray:
    """A perceptually ordered blue -> red map (values in [0, 1]) -> (H, W, 3) uint8, without a plotting library."""
    anchors = np.array([[48, 18, 59], [70, 131, 249], [27, 208, 213], [164, 252, 60], [251, 185, 56], [122, 4, 3]],
                       dtype=np.float64)  # the shape of 'turbo'
    position = np.clip(values, 0, 1) * (len(anchors) - 1)
    low = np.floor(position).astype(int).clip(0, len(anchors) - 2)
    frac = (position - low)[..., None]
    return (anchors[low] * (1 - frac) + anchors[low + 1] * frac).astype(np.uint8)


def render_heatmap(image: Any, heatmap: np.ndarray, boxes: Sequence[Sequence[float]] = (), alpha: float = 0.45,
                   box_color: tuple[int, int, int] = (0, 255, 0)) -> Image.Image:
    """The X-ray with the heat map blended over it (min-max scaled, NaN left clear) and (x, y, w, h) boxes drawn."""
    grey = load_image(image)
    if grey.shape != heatmap.shape:
        raise ValueError(f"heatmap shape {heatmap.shape} differs from the image's {grey.shape}")
    valid = np.isfinite(heatmap)
    scaled = np.zeros_like(heatmap, dtype=np.float64)
    if valid.any():
        low, high = np.nanmin(heatmap), np.nanmax(heatmap)
        scaled[valid] = (heatmap[valid] - low) / (high - low) if high > low else 0.0
    base = np.repeat((grey * 255).astype(np.float64)[..., None], 3, axis=2)
    blend = np.where(valid[..., None], (1 - alpha) * base + alpha * _colormap(scaled), base)
    picture = Image.fromarray(blend.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    width = max(1, round(max(grey.shape) / 200))
    for x, y, w, h in boxes:
        draw.rectangle([x, y, x + w, y + h], outline=box_color, width=width)
    return picture


__all__ = ["GROUNDING_INPUT_NAMES", "ground_phrase", "ground_phrases", "grid_heatmaps", "inference_mode",
           "render_heatmap"]
