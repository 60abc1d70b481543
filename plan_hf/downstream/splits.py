"""Seeded train/validation/test splits and the 1% / 10% / 100% training subsets of the fine-tuning protocol.

A subset is a prefix of one seeded permutation of the training split, so the same seed gives the same subset on any
machine, and the subsets are nested (1% within 10% within 100%): a larger fraction only adds images. The indices and
the images' ids are written out next to the metrics so that a run can be repeated or audited.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PROTOCOL_FRACTIONS: tuple[float, ...] = (0.01, 0.1, 1.0)


def subset_size(num_examples: int, fraction: float) -> int:
    """How many of `num_examples` a fraction keeps: rounded, and at least one so a 1% subset of a tiny set trains."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if num_examples < 1:
        raise ValueError("cannot take a subset of an empty training split")
    return max(1, min(num_examples, int(math.floor(fraction * num_examples + 0.5))))


def seeded_subset(num_examples: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a `fraction` of range(num_examples): the first ones of a permutation drawn from `seed`."""
    order = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(order[: subset_size(num_examples, fraction)])


def seeded_split(
    num_examples: int, validation_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict[str, np.ndarray]:
    """A seeded train / validation / test partition of range(num_examples) for data sets published without one (RSNA,
    SIIM, a user's CSV). Split the *patients*: pass one row per patient (the RSNA and SIIM loaders do)."""
    if validation_fraction < 0 or test_fraction <= 0 or validation_fraction + test_fraction >= 1:
        raise ValueError(
            "need 0 <= validation_fraction, 0 < test_fraction and a sum < 1; "
            f"got {validation_fraction}, {test_fraction}"
        )
    # A stream other than the subsets' (seed, 1): changing the split seed never couples with the subset draw.
    order = np.random.default_rng([seed, 1]).permutation(num_examples)
    num_test = max(1, int(round(test_fraction * num_examples)))
    num_validation = int(round(validation_fraction * num_examples))
    return {
        "test": np.sort(order[:num_test]),
        "validation": np.sort(order[num_test : num_test + num_validation]),
        "train": np.sort(order[num_test + num_validation :]),
    }


@dataclass
class SubsetManifest:
    """What a fine-tuning run trained and was tested on: enough to rebuild the exact subset."""

    dataset: str
    fraction: float
    seed: int
    num_train_total: int
    train_indices: list[int]  # positions in the full training split
    train_ids: list[str]  # the images' (or patients') ids, the stable key across loader versions
    test_ids: list[str]

    def write(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "SubsetManifest":
        return cls(**json.loads(Path(path).read_text()))


def check_disjoint(train_ids: Sequence[str], test_ids: Sequence[str]) -> None:
    """Raise if an id is in both splits: a leak would inflate every metric downstream."""
    shared = set(train_ids) & set(test_ids)
    if shared:
        raise ValueError(f"{len(shared)} ids are in both the training and the test split, e.g. {sorted(shared)[:3]}")


__all__ = ["PROTOCOL_FRACTIONS", "SubsetManifest", "check_disjoint", "seeded_split", "seeded_subset", "subset_size"]
