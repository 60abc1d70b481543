"""Training past an unreadable image: a dataset wrapper that decodes each sample and, when it cannot, names the
file, counts it and hands over the next readable sample instead (so every batch stays full: the contrastive loss
and DDP's gather want equal batches), and the collator wrapper that carries the counts into the batch.

The loop (`plan_hf.training.loop`) sums the counts over processes, logs them and stops the run only past
`max_bad_sample_fraction`. To find every bad file before training, load with ``verify=True``
(`plan_hf.data.bad_rows.validate_images`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from datasets import Image

logger = logging.getLogger("plan_hf.data")

BAD_SAMPLES = "bad_samples"  # the batch key: how many samples were replaced (a tensor, every batch)
BAD_FILES = "bad_files"  # and which files they were (a list of strings)
_SKIPPED = "_unreadable"  # a row's note of the files passed over to reach it


class SkipUnreadable(torch.utils.data.Dataset):
    """`dataset[i]` with its image fully decoded; when that fails, `dataset[i + 1]` (and so on), noting the file.

    Args:
        dataset: a map-style dataset of dict rows (a `datasets.Dataset` with an `Image()` column, a DICOM loader's
            dataset, ...).
        image_column: the rows' image key.
    """

    def __init__(self, dataset, image_column: str = "image") -> None:
        self.dataset = dataset
        self.image_column = image_column
        self._undecoded = None

    def __len__(self) -> int:
        return len(self.dataset)

    def _name(self, index: int) -> str:
        """The file behind row `index`, read without decoding it."""
        try:
            if self._undecoded is None:
                plain = self.dataset.with_format(None)
                feature = plain.features.get(self.image_column)
                self._undecoded = plain.cast_column(self.image_column, Image(decode=False)) \
                    if isinstance(feature, Image) else plain
            row = self._undecoded[index]
            value = row.get(self.image_column) if "image_path" not in row else row["image_path"]
            return value.get("path") or "<bytes>" if isinstance(value, dict) else str(value)
        except Exception:  # noqa: BLE001 - a name is a courtesy; the row number is always there
            return "<unknown file>"

    def _load(self, index: int) -> dict[str, Any]:
        row = self.dataset[index]
        image = row[self.image_column]
        if hasattr(image, "load"):  # PIL opens lazily: decode now, where the failure can be caught and named
            image.load()
        return row

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[str] = []
        for attempt in range(len(self.dataset)):
            position = (index + attempt) % len(self.dataset)
            try:
                row = self._load(position)
            except Exception as error:  # noqa: BLE001 - any decoding failure makes the sample unusable
                name = self._name(position)
                logger.warning("unreadable image %s (row %d): %s: %s; using the next sample instead", name, position,
                               type(error).__name__, error)
                skipped.append(name)
                continue
            return {**row, _SKIPPED: skipped}
        raise RuntimeError(f"no image of the {len(self.dataset)} samples could be decoded (e.g. {skipped[0]})")


class CountUnreadable:
    """Wraps a collator: the rows' notes from `SkipUnreadable` become `bad_samples` (a tensor) and `bad_files`."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        files = [name for row in rows for name in row.get(_SKIPPED, ())]
        batch = dict(self.collator([{k: v for k, v in row.items() if k != _SKIPPED} for row in rows]))
        batch[BAD_SAMPLES] = torch.tensor(len(files))
        batch[BAD_FILES] = files
        return batch


__all__ = ["BAD_FILES", "BAD_SAMPLES", "CountUnreadable", "SkipUnreadable"]
