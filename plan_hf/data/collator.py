"""PlanCollator: dataset rows (`image`, `text`) -> a PlanModel training batch, through PlanProcessor.

Picklable (DataLoader workers get a copy); the optional augmentation draws from a generator seeded per worker
process from torch's worker seed, so runs are reproducible for a fixed seed and number of workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..image_processing_plan import load_image

# What PlanModel.forward consumes: content_boxes keep the padding out of the local terms (PlanConfig.mask_padding);
# the processor's original_sizes is for mapping heat maps back, not for training.
MODEL_INPUT_NAMES = ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "word_ids", "sentence_ids",
                     "content_boxes")


@dataclass(frozen=True)
class Augmentation:
    """Light, anatomy-preserving jitter: chest X-rays are not flipped (the heart is on the left) nor cropped hard
    (findings sit at the borders: costophrenic angles, apices)."""

    max_rotation_degrees: float = 5.0
    max_translation: float = 0.03  # fraction of the image side
    scale_range: tuple[float, float] = (0.95, 1.05)
    max_brightness: float = 0.1  # additive, on [0, 1] intensities
    contrast_range: tuple[float, float] = (0.9, 1.1)

    def __call__(self, grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(H, W) float in [0, 1] -> (H, W) uint8 (uint8, so the processor keeps the brightness change: it would
        min-max stretch a float image)."""
        height, width = grey.shape
        angle = math.radians(rng.uniform(-self.max_rotation_degrees, self.max_rotation_degrees))
        scale = rng.uniform(*self.scale_range)
        shift_x, shift_y = rng.uniform(-self.max_translation, self.max_translation, size=2) * (width, height)
        # PIL maps each output pixel back to its input: in = (1/s) R(-angle) (out - centre - shift) + centre.
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
        ox, oy = centre_x + shift_x, centre_y + shift_y
        matrix = (cos, sin, centre_x - cos * ox - sin * oy, -sin, cos, centre_y + sin * ox - cos * oy)
        picture = Image.fromarray(np.round(grey * 255).astype(np.uint8), mode="L")
        moved = np.asarray(picture.transform((width, height), Image.Transform.AFFINE, matrix,
                                             resample=Image.Resampling.BILINEAR, fillcolor=0), dtype=np.float32) / 255
        contrast = rng.uniform(*self.contrast_range)
        brightness = rng.uniform(-self.max_brightness, self.max_brightness)
        jittered = (moved - moved.mean()) * contrast + moved.mean() + brightness
        return np.round(np.clip(jittered, 0, 1) * 255).astype(np.uint8)


class PlanCollator:
    """Rows with an image (PIL, array, path, ...: anything `PlanImageProcessor` reads) and a report -> tensors.

    Args:
        processor: a `PlanProcessor`.
        augment: apply `augmentation` to every image (training only; off by default).
        augmentation: the jitter's ranges.
        image_column, text_column: the rows' keys.
        seed: base of the augmentation generator; each worker process adds torch's per-worker seed.
    """

    def __init__(self, processor, augment: bool = False, augmentation: Augmentation | None = None,
                 image_column: str = "image", text_column: str = "text", seed: int = 0) -> None:
        self.processor = processor
        self.augment = augment
        self.augmentation = augmentation or Augmentation()
        self.image_column = image_column
        self.text_column = text_column
        self.seed = seed
        self._rng: tuple[int, np.random.Generator] | None = None

    def _generator(self) -> np.random.Generator:
        # One generator per process: a copy pickled into a worker must not replay the parent's draws.
        if self._rng is None or self._rng[0] != os.getpid():
            worker = torch.utils.data.get_worker_info()
            worker_seed = worker.seed if worker is not None else 0
            self._rng = (os.getpid(), np.random.default_rng([self.seed, worker_seed % 2**63]))
        return self._rng[1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rng"] = None
        return state

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PlanCollator got an empty batch")
        texts = [row[self.text_column] for row in rows]
        images = [row[self.image_column] for row in rows]
        if self.augment:
            rng = self._generator()
            images = [self.augmentation(load_image(image), rng) for image in images]
        batch = self.processor(text=texts, images=images, return_tensors="pt")
        return {name: batch[name] for name in MODEL_INPUT_NAMES if name in batch}


__all__ = ["Augmentation", "MODEL_INPUT_NAMES", "PlanCollator"]
