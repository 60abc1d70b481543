"""A pre-training run survives an unreadable image and names it, stops clearly when it diverges, and exports no
local paths; the tokenizers it builds truncate where the text tower's positions end."""

import json
import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset, Image
from PIL import Image as PILImage

from plan_hf.data.loaders import load_mimic_cxr
from plan_hf.data.unreadable import BAD_FILES, BAD_SAMPLES, CountUnreadable, SkipUnreadable
from plan_hf.training.checkpointing import STATE_FILE, TrainingProgress, latest_checkpoint
from plan_hf.training.loop import BadDataError, NonFiniteLossError

from .conftest import synthetic_xray
from .layouts import write_corrupt_image, write_image
from .test_training import fresh_accelerate_state, smoke_args  # noqa: F401

NUM_BAD = 3


@pytest.fixture(scope="module")
def damaged_data(tmp_path_factory):
    """The smoke set with NUM_BAD training JPEGs truncated (they open, and fail half-way through decoding)."""
    from plan_hf.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("damaged")
    generate_synthetic(root, 24, seed=0, image_size=64, workers=1, contact_sheet=False)
    train = load_mimic_cxr(root, split="train").cast_column("image", Image(decode=False))
    bad = sorted(item["path"] for item in train["image"])[:NUM_BAD]
    for path in bad:
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
    return root, bad


def test_skip_unreadable_names_counts_and_fills_from_the_next(tmp_path):
    paths = [str(write_image(tmp_path / "a.png")), str(write_corrupt_image(tmp_path / "b.jpg")),
             str(write_image(tmp_path / "c.png", seed=2))]
    dataset = Dataset.from_dict({"image": paths, "text": ["A.", "B.", "C."]}).cast_column("image", Image())
    rows = SkipUnreadable(dataset)
    assert rows[1]["text"] == "C." and rows[1]["_unreadable"] == [paths[1]]
    assert rows[0]["text"] == "A." and rows[0]["_unreadable"] == []
    batch = CountUnreadable(lambda items: {"texts": [item["text"] for item in items]})([rows[0], rows[1]])
    assert batch == {"texts": ["A.", "C."], BAD_SAMPLES: torch.tensor(1), BAD_FILES: [paths[1]]}


def test_pretraining_runs_past_truncated_jpegs_and_names_them(damaged_data, tmp_path, caplog):
    from training.pretrain import main

    root, bad = damaged_data
    with caplog.at_level(logging.WARNING, logger="plan_hf.data"):
        main(smoke_args(root, tmp_path / "run", max_bad_sample_fraction=0.5))
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    warned = [record.getMessage() for record in caplog.records if "unreadable image" in record.getMessage()]
    named = {path for path in bad if any(path in message for message in warned)}
    assert named and len(warned) >= len(named)
    events = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    logged = [name for event in events if event.get("event") == "bad_samples" for name in event["files"]]
    assert sorted(logged) == sorted(path for message in warned for path in bad if path in message)
    progress = TrainingProgress.from_file(latest_checkpoint(tmp_path / "run" / "checkpoints") / STATE_FILE)
    assert progress.bad_samples == len(logged) == len(warned)


def test_too_many_unreadable_images_stop_the_run_naming_one(damaged_data, tmp_path):
    from training.pretrain import main

    root, bad = damaged_data
    with pytest.raises(BadDataError, match=r"unreadable images in epoch 0 .*max_bad_sample_fraction=0\.0 .*\.jpg"):
        main(smoke_args(root, tmp_path / "run", max_bad_sample_fraction=0.0))


def test_verify_images_drops_the_bad_ones_before_training(damaged_data, tmp_path, caplog):
    from training.pretrain import main

    root, bad = damaged_data
    with caplog.at_level(logging.WARNING, logger="plan_hf.data"):
        main(smoke_args(root, tmp_path / "run", verify_images=True, max_bad_sample_fraction=0.0, max_steps=2))
    assert f"skipped {NUM_BAD} (unreadable_image: {NUM_BAD})" in caplog.text
    assert not [r for r in caplog.records if "using the next sample" in r.getMessage()]


def test_a_diverging_run_stops_with_a_clear_message(damaged_data, tmp_path):
    from training.pretrain import main

    root, _ = damaged_data
    with pytest.raises(NonFiniteLossError, match=r"diverged by step \d+: the logit scale is .*learning_rate=30"):
        main(smoke_args(root, tmp_path / "run", learning_rate=30, max_steps=12, verify_images=True))


def test_tokenizers_truncate_where_the_text_tower_ends(tmp_path, make_model, image_processor):
    from transformers import AutoTokenizer

    from plan_hf.tiny import build_tokenizer
    from plan_hf.training.build import build_processor
    from plan_hf.training.config import load_config
    from tests.conftest import REPORTS

    config = load_config("smoke",
                         ["--text_config", json.dumps({"model_type": "bert", "max_position_embeddings": 96})])
    build_processor(config, ["No effusion.", "Small left effusion."]).save_pretrained(tmp_path / "processor")
    assert AutoTokenizer.from_pretrained(tmp_path / "processor").model_max_length == 96  # saved, and read back

    tokenizer = build_tokenizer(REPORTS)  # for the tiny tower
    model = make_model()
    assert tokenizer.model_max_length == model.config.text_config.max_position_embeddings == 128
    # a 600-word zero-shot label, truncated as a pipeline's tokenizer_kwargs={"truncation": True} asks
    labels = [" ".join(["effusion"] * 600), "pneumothorax"]
    text = tokenizer(labels, padding=True, truncation=True, return_tensors="pt")
    assert text["input_ids"].shape[1] == 128
    image = PILImage.fromarray(synthetic_xray(3))
    pixels = image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = model(**text, pixel_values=pixels).logits_per_image.softmax(-1)[0]
    assert probs.shape == (2,) and torch.isfinite(probs).all()
    # the stock pipeline tokenizes without truncation (it drops tokenizer_kwargs): the model cuts at its limit
    from transformers import pipeline

    classifier = pipeline("zero-shot-image-classification", model=model, tokenizer=tokenizer,
                          image_processor=image_processor)
    scores = {r["label"]: r["score"] for r in classifier(image, candidate_labels=labels, hypothesis_template="{}")}
    untruncated = tokenizer(labels, padding=True, return_tensors="pt")
    assert untruncated["input_ids"].shape[1] > 128
    with torch.no_grad():
        cut = {k: v[:, :128] for k, v in untruncated.items()}
        expected = model(**cut, pixel_values=pixels).logits_per_image.softmax(-1)[0]
    assert scores[labels[0]] == pytest.approx(float(expected[0]), abs=1e-5)


def test_export_writes_no_local_paths(make_model, processor, tmp_path):
    from plan_hf.hub import TRAINING_CONFIG_FILE, export_pretrained

    output_dir = tmp_path / "home" / "alice" / "runs" / "r1"
    settings = {"data_dir": str(tmp_path / "data" / "mimic-cxr-jpg"), "output_dir": str(output_dir),
                "text_model": str(tmp_path / "models" / "minilm"), "eval_json": str(output_dir / "eval" / "m.json"),
                "base_models": [str(tmp_path / "models" / "minilm"), "org/vision-tower"], "preset": "plan",
                "push_to_hub": "org/plan-model", "learning_rate": 1e-4}
    folder = export_pretrained(make_model(), processor, output_dir / "model", training=settings)
    written = json.loads((folder / TRAINING_CONFIG_FILE).read_text())
    assert written["output_dir"] == "." and written["eval_json"] == "eval/m.json"
    assert written["data_dir"] == "mimic-cxr-jpg" and written["text_model"] == "minilm"
    assert written["base_models"] == ["minilm", "org/vision-tower"] and written["push_to_hub"] == "org/plan-model"
    for name in (TRAINING_CONFIG_FILE, "README.md"):
        assert str(tmp_path) not in (folder / name).read_text(), name
