"""PlanCollator: dataset rows -> model batches, the same in DataLoader worker processes; optional augmentation."""

import pickle

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from plan_hf.data.collator import MODEL_INPUT_NAMES, PlanCollator

from .conftest import REPORTS, synthetic_xray


@pytest.fixture
def rows():
    return [{"image": Image.fromarray(synthetic_xray(i, height=70 + i, width=60)), "text": REPORTS[i % len(REPORTS)],
             "study_id": i} for i in range(8)]


def test_rows_become_the_processor_batch(processor, rows):
    batch = PlanCollator(processor)(rows[:3])
    expected = processor(text=[r["text"] for r in rows[:3]], images=[r["image"] for r in rows[:3]], return_tensors="pt")
    assert set(batch) == {name for name in MODEL_INPUT_NAMES if name in expected}
    assert {"pixel_values", "input_ids", "attention_mask", "word_ids", "sentence_ids"} <= set(batch)
    for name, value in batch.items():
        torch.testing.assert_close(value, expected[name])
    assert batch["pixel_values"].shape == (3, 3, 64, 64)


def test_worker_processes_give_the_same_batches(processor, rows):
    collator = pickle.loads(pickle.dumps(PlanCollator(processor)))
    in_process = list(DataLoader(rows, batch_size=4, collate_fn=collator))
    in_workers = list(DataLoader(rows, batch_size=4, collate_fn=collator, num_workers=2))
    assert len(in_workers) == 2
    for a, b in zip(in_process, in_workers):
        for name in a:
            torch.testing.assert_close(a[name], b[name])


def test_augmentation_is_off_by_default_and_seeded_when_on(processor, rows):
    plain = PlanCollator(processor)(rows[:4])["pixel_values"]
    first = PlanCollator(processor, augment=True, seed=3)(rows[:4])
    again = PlanCollator(processor, augment=True, seed=3)(rows[:4])
    other = PlanCollator(processor, augment=True, seed=4)(rows[:4])
    torch.testing.assert_close(first["pixel_values"], again["pixel_values"])
    assert not torch.allclose(first["pixel_values"], plain)
    assert not torch.allclose(first["pixel_values"], other["pixel_values"])
    assert first["pixel_values"].shape == plain.shape
    torch.testing.assert_close(first["input_ids"], PlanCollator(processor)(rows[:4])["input_ids"])  # text untouched


def test_empty_batch_is_an_error(processor):
    with pytest.raises(ValueError, match="empty batch"):
        PlanCollator(processor)([])
