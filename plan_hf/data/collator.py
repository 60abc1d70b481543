"""PlanCollator: dataset rows (`image`, `text`) -> a PlanModel training batch, through PlanProcessor.

Picklable (DataLoader workers get a copy); the optional augmentation (`plan_hf.data.augment`, training only) draws
from a generator seeded per worker process from torch's worker seed, so runs are reproducible for a fixed seed and
number of workers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .augment import Augmentation

# What PlanModel.forward consumes: content_boxes keep the padding out of the local terms (PlanConfig.mask_padding);
# the processor's original_sizes is for mapping heat maps back, not for training.
MODEL_INPUT_NAMES = ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "word_ids", "sentence_ids",
                     "content_boxes")


class PlanCollator:
    """Rows with an image (PIL, array, path, ...: anything `PlanImageProcessor` reads) and a report -> tensors.

    Args:
        processor: a `PlanProcessor`.
        augment: apply `augmentation` to every image (training only; off by default).
        augmentation: the ranges of the crop, rotation, translation and intensity jitter.
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
        self._rng: tuple[int, torch.Generator] | None = None

    def _generator(self) -> torch.Generator:
        # One generator per process: a copy pickled into a worker must not replay the parent's draws.
        if self._rng is None or self._rng[0] != os.getpid():
            worker = torch.utils.data.get_worker_info()
            worker_seed = worker.seed if worker is not None else 0
            seed = np.random.SeedSequence([self.seed, worker_seed % 2**63]).generate_state(1, np.uint64)[0]
            self._rng = (os.getpid(), torch.Generator().manual_seed(int(seed)))
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
        batch = self.processor(text=texts, images=images, return_tensors="pt")
        batch = {name: batch[name] for name in MODEL_INPUT_NAMES if name in batch}
        if self.augment:
            batch.update(self.augmentation.augment_batch(batch, self.processor.image_processor, self._generator()))
        return batch


__all__ = ["Augmentation", "MODEL_INPUT_NAMES", "PlanCollator"]
