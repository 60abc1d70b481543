"""Image-report pairs for report generation: the MIMIC-CXR layout (real or the synthetic benchmark's copy of it) split
into train/test, the collator that turns rows into `pixel_values` + `labels`, and batched `generate()` over a split."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, Image
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..image_processing_plan import PlanImageProcessor

_SPACES = re.compile(r"\s+")


class ReportDataset(str, Enum):
    SYNTHETIC = "synthetic"
    MIMIC = "mimic"


@dataclass
class ReportData:
    """Rows with ``image`` (decoded lazily), ``text`` (the report, one line) and ``dicom_id``."""

    train: Dataset
    test: Dataset

    @staticmethod
    def image_paths(dataset: Dataset) -> list[str]:
        """The image files of a split, without decoding them."""
        return [row["path"] for row in dataset.cast_column("image", Image(decode=False))["image"]]


def clean_report(text: str) -> str:
    """One line: the FINDINGS and IMPRESSION paragraphs joined (the target the decoder learns, and the reference)."""
    return _SPACES.sub(" ", text).strip()


def _ensure_synthetic(root: Path, num_images: int, image_size: int) -> None:
    if any(root.glob("mimic-cxr-2.0.0-split.csv*")):
        return
    if num_images <= 0:
        raise FileNotFoundError(f"{root} holds no mimic-cxr-2.0.0-split.csv[.gz]; pass synthetic_num_images > 0 "
                                "(--synthetic-num-images) to write the synthetic set there first")
    from ..data.synthetic import generate_synthetic

    generate_synthetic(root, num_images, image_size=image_size)


def load_report_data(
    dataset: str | ReportDataset,
    data: str | os.PathLike[str],
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    synthetic_num_images: int = 0,
    synthetic_image_size: int = 224,
    sections: Sequence[str] = ("findings", "impression"),
    source: Any = None,
    split_seed: int = 0,
) -> ReportData:
    """Train on the ``train`` split, evaluate on ``test`` (frontal views).

    ``dataset`` is ``synthetic`` or ``mimic``, or else ``source`` (a `plan_hf.data.sources.PairSource`) gives the
    pairs from any source: its ``train`` and ``test`` splits, or a partition of it seeded by ``split_seed`` (20% to
    test) when it has no test split; its rows are named ``train-<i>`` / ``test-<i>``.

    Both data sets are read by `load_mimic_cxr`: the synthetic benchmark writes the MIMIC-CXR-JPG layout. For
    ``synthetic``, an empty folder is filled first when ``synthetic_num_images`` > 0. ``sections`` are the report
    sections that make the target text (R2Gen's MIMIC-CXR protocol, which the report-generation literature follows,
    uses ``("findings",)``; studies without them are left out). ``max_*_samples`` keep the first N rows (quick runs;
    the order is the split CSV's).
    """
    from ..data.loaders import load_mimic_cxr
    from ..data.sources import load_pairs, source_splits

    root = Path(data) if data is not None else Path(".")
    if source is not None:
        names = source_splits(source) or []
        if "train" in names and "test" in names:
            splits: Any = {split: load_pairs(source, split) for split in ("train", "test")}
        else:  # one list or file (or no test split): a seeded partition of it, as for the other sets without one
            from ..downstream.splits import seeded_split

            whole = load_pairs(source, "train")
            parts = seeded_split(len(whole), validation_fraction=0.0, test_fraction=0.2, seed=split_seed)
            splits = {split: whole.select(parts[split]) for split in ("train", "test")}
    else:
        if ReportDataset(dataset) is ReportDataset.SYNTHETIC:
            _ensure_synthetic(root, synthetic_num_images, synthetic_image_size)
        splits = load_mimic_cxr(root, sections=tuple(sections))

    def prepare(split: str, limit: int | None) -> Dataset:
        table = splits[split]
        if limit is not None:
            table = table.select(range(min(limit, len(table))))
        named = "dicom_id" in table.column_names
        # input_columns: hand `map` the text only, or it decodes every image to pass it along; kept in memory, as
        # a source's own folder is no place for a cache file
        return table.select_columns(["image", "text", *(["dicom_id"] if named else [])]).map(
            lambda text, index: {"text": clean_report(text), **({} if named else {"dicom_id": f"{split}-{index}"})},
            input_columns="text", with_indices=True, keep_in_memory=True, desc=f"clean {split} reports")

    data_ = ReportData(train=prepare("train", max_train_samples), test=prepare("test", max_test_samples))
    if len(data_.train) == 0 or len(data_.test) == 0:
        raise ValueError(f"{root}: need image-report pairs in both the train and test splits, "
                         f"got {len(data_.train)} and {len(data_.test)}")
    return data_


def report_labels(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """(B, L) decoder targets: each report's tokens then eos, padded with -100 (ignored by the loss).

    No bos here: `VisionEncoderDecoderModel` shifts the labels right behind `decoder_start_token_id` (= bos) to make
    the decoder's inputs, so the decoder learns to predict the first word from bos and eos after the last word.
    """
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
    ids = [row + [tokenizer.eos_token_id] for row in ids]
    labels = torch.full((len(ids), max(len(row) for row in ids)), -100, dtype=torch.long)
    for i, row in enumerate(ids):
        labels[i, : len(row)] = torch.tensor(row)
    return labels


class ReportGenerationCollator:
    """Rows with ``image`` and ``text`` -> ``pixel_values`` (B, C, S, S) and ``labels`` (B, L). Every other column is
    dropped, which is why training sets ``remove_unused_columns=False`` (the Trainer would otherwise delete ``image``
    and ``text`` first: the model's forward names neither)."""

    def __init__(self, image_processor: PlanImageProcessor, tokenizer: PreTrainedTokenizerBase, max_length: int = 128):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values = self.image_processor([e["image"] for e in examples], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values,
                "labels": report_labels(self.tokenizer, [e["text"] for e in examples], self.max_length)}


@torch.no_grad()
def generate_reports(
    model: PreTrainedModel,
    image_processor: PlanImageProcessor,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[Any] | Dataset,
    batch_size: int = 16,
    **generate_kwargs: Any,
) -> list[str]:
    """Generated report text for each image (a `Dataset` with an ``image`` column, or images), in order.

    `generate_kwargs` override the model's generation config (e.g. ``num_beams=3``, ``max_new_tokens=100``).
    """
    assert not model.training, "call model.eval() first: dropout would make generation random"
    device = next(model.parameters()).device
    reports: list[str] = []
    for start in tqdm(range(0, len(images), batch_size), desc="generate", leave=False):
        chunk = images[start : start + batch_size]
        chunk = chunk["image"] if isinstance(images, Dataset) else chunk
        pixel_values = image_processor(list(chunk), return_tensors="pt")["pixel_values"].to(device)
        generated = model.generate(pixel_values=pixel_values, **generate_kwargs)
        reports += [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return reports


__all__ = [
    "ReportData",
    "ReportDataset",
    "ReportGenerationCollator",
    "clean_report",
    "generate_reports",
    "load_report_data",
    "report_labels",
]
