"""Report generation: the PLAN tower as a VisionEncoderDecoderModel encoder, labels, a learnable toy, save/load,
hand-computed metrics and the command line end to end."""

import json
import math

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from transformers import VisionEncoderDecoderModel

from plan_hf import PlanImageProcessor, PlanModel, PlanProcessor
from plan_hf.generation import (
    PlanVisionEncoder,
    build_report_generator,
    configure_tokenizer,
    load_report_generator,
    meteor_unavailable_reason,
    normalize_report,
    report_generation_metrics,
)
from plan_hf.generation.data import ReportGenerationCollator, generate_reports, report_labels
from plan_hf.generation.finetune import GenerationFinetuneConfig, build_generator, train_generator
from plan_hf.generation.metrics import METRIC_KEYS, pycocoevalcap_available, warm_up_meteor
from plan_hf.tiny import build_tokenizer, tiny_plan_config

needs_pycocoevalcap = pytest.mark.skipif(
    not pycocoevalcap_available(), reason="pycocoevalcap is not installed (pip install 'pycocoevalcap>=1.2')")
needs_meteor = pytest.mark.skipif(meteor_unavailable_reason() is not None, reason=str(meteor_unavailable_reason()))

TOY_REPORTS = ["No acute cardiopulmonary process.", "Large left pleural effusion and atelectasis."]
SMALL_DECODER = dict(decoder_layers=1, decoder_hidden_size=32, decoder_heads=2, max_length=24)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module", autouse=True)
def meteor_loading():
    """METEOR's jar takes ~15 s of CPU to load its paraphrase table: start it first, so that it loads while the
    tests before the two that use it (the command line, then the METEOR test, last in this file) run."""
    warm_up_meteor()


@pytest.fixture()
def toy_tokenizer():
    return configure_tokenizer(build_tokenizer(TOY_REPORTS))


def tiny_plan(tokenizer, vision: str = "resnet", seed: int = 0) -> PlanModel:
    torch.manual_seed(seed)
    return PlanModel(tiny_plan_config(vocab_size=len(tokenizer), vision=vision, image_size=64)).eval()


def toy_images() -> list[PILImage.Image]:
    """Two images a tiny CNN cannot confuse: a dark, flat one and one with bright horizontal bars."""
    dark = np.full((64, 64), 30, dtype=np.uint8)
    bars = np.where((np.arange(64)[:, None] // 8) % 2 == 0, 230, 60).repeat(64, axis=1).astype(np.uint8)
    return [PILImage.fromarray(dark), PILImage.fromarray(bars)]


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------
def test_normalize_report():
    assert normalize_report("Heart size is NORMAL.\n\nNo effusion, 2 lines.") == "heart size is normal no effusion 2 lines"


@needs_pycocoevalcap
def test_metrics_hand_computed():
    identical = report_generation_metrics(["The heart is normal in size."], ["the heart is normal in size"],
                                          meteor=False)
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert identical[key] == pytest.approx(1.0, abs=1e-6), key
    assert identical["METEOR"] is None

    # 4 hypothesis words, all in the 6-word reference: every n-gram precision is 1 and the brevity penalty is
    # exp(1 - 6/4); ROUGE-L: LCS 4, P = 1, R = 4/6, F_beta = (1 + b^2) P R / (R + b^2 P) with b = 1.2.
    short = report_generation_metrics(["The heart is normal."], ["the heart is normal in size"], meteor=False)
    penalty = math.exp(1 - 6 / 4)
    for n in range(1, 5):
        assert short[f"BLEU-{n}"] == pytest.approx(penalty, abs=1e-6)
    recall, beta2 = 4 / 6, 1.2**2
    assert short["ROUGE-L"] == pytest.approx((1 + beta2) * recall / (recall + beta2), abs=1e-9)

    # BLEU-1 without the penalty: 3 of 4 unigrams match ("small" is wrong), same length -> 3/4; BLEU-2: 2 of 3 bigrams.
    one_off = report_generation_metrics(["small left pleural effusion"], ["large left pleural effusion"], meteor=False)
    assert one_off["BLEU-1"] == pytest.approx(3 / 4, abs=1e-6)
    assert one_off["BLEU-2"] == pytest.approx(math.sqrt(3 / 4 * 2 / 3), abs=1e-6)

    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        report_generation_metrics(["a", "b"], ["a"], meteor=False)


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------
def test_build_takes_the_pretrained_tower(toy_tokenizer):
    plan = tiny_plan(toy_tokenizer, seed=0)
    model = build_report_generator(plan, toy_tokenizer, **SMALL_DECODER)
    assert isinstance(model, VisionEncoderDecoderModel) and isinstance(model.encoder, PlanVisionEncoder)
    pretrained = plan.vision_model.state_dict()
    copied = model.encoder.vision_model.state_dict()
    assert copied.keys() == pretrained.keys()
    assert all(torch.equal(copied[k], pretrained[k]) for k in pretrained)

    baseline = build_report_generator(plan, toy_tokenizer, random_tower=True, **SMALL_DECODER)
    weights = [k for k in pretrained if k.endswith("convolution.weight")]
    assert weights and not any(torch.equal(baseline.encoder.vision_model.state_dict()[k], pretrained[k])
                               for k in weights)
    assert model.config.decoder_start_token_id == toy_tokenizer.cls_token_id
    assert model.generation_config.eos_token_id == toy_tokenizer.sep_token_id


def test_random_tower_has_its_architectures_own_init():
    """The baseline's tower starts as `AutoModel.from_config` starts it (ResNet's Kaiming init), not re-initialised
    by the wrapper's generic init."""
    from transformers import AutoConfig, AutoModel

    from plan_hf.generation import PlanVisionEncoderConfig
    from plan_hf.tiny import tiny_vision_config

    vision_config = tiny_vision_config("resnet")
    torch.manual_seed(0)
    reference = AutoModel.from_config(AutoConfig.for_model(**vision_config)).state_dict()
    torch.manual_seed(0)
    wrapped = PlanVisionEncoder(PlanVisionEncoderConfig(vision_config=vision_config)).vision_model.state_dict()
    assert all(torch.equal(wrapped[k], reference[k]) for k in reference)


@pytest.mark.parametrize("vision", ["resnet", "vit"])
def test_encoder_gives_grid_tokens(toy_tokenizer, vision):
    model = build_report_generator(tiny_plan(toy_tokenizer, vision), toy_tokenizer, **SMALL_DECODER).eval()
    tokens = model.encoder(pixel_values=torch.randn(2, 3, 64, 64)).last_hidden_state
    # ResNet: a 2x2 map at stride 32; ViT/8: 8x8 patches, the class token dropped.
    assert tokens.shape == ((2, 4, 64) if vision == "resnet" else (2, 64, 32))
    assert tokens.shape[-1] == model.config.encoder.hidden_size


def test_labels_end_with_eos_and_pad_with_ignore_index(toy_tokenizer):
    labels = report_labels(toy_tokenizer, TOY_REPORTS, max_length=24)
    lengths = (labels != -100).sum(1)
    assert lengths[0] != lengths[1] and (labels[:, 0] != toy_tokenizer.cls_token_id).all()
    for row, length in zip(labels, lengths):
        assert row[length - 1] == toy_tokenizer.sep_token_id and (row[length:] == -100).all()
    assert report_labels(toy_tokenizer, ["no " * 50], max_length=8).shape == (1, 8)  # truncated, eos kept
    model = build_report_generator(tiny_plan(toy_tokenizer), toy_tokenizer, **SMALL_DECODER)
    decoder_inputs = model.prepare_decoder_input_ids_from_labels(labels)
    assert (decoder_inputs[:, 0] == toy_tokenizer.cls_token_id).all()
    assert torch.equal(decoder_inputs[0, 1:lengths[0]], labels[0, : lengths[0] - 1])


def test_save_load_round_trip_reproduces_generate(toy_tokenizer, tmp_path):
    model = build_report_generator(tiny_plan(toy_tokenizer), toy_tokenizer, **{**SMALL_DECODER, "max_length": 12})
    model.eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    greedy, beam = model.generate(pixel_values), model.generate(pixel_values, num_beams=3)
    model.save_pretrained(tmp_path)
    PlanProcessor(PlanImageProcessor(size=64), toy_tokenizer).save_pretrained(tmp_path)

    loaded, processor = load_report_generator(tmp_path)
    assert isinstance(loaded.encoder, PlanVisionEncoder)
    assert torch.equal(loaded.generate(pixel_values), greedy)
    assert torch.equal(loaded.generate(pixel_values, num_beams=3), beam)
    assert processor.tokenizer.eos_token == "[SEP]" and processor.tokenizer.bos_token == "[CLS]"


def test_toy_is_learned_and_generate_returns_each_report(toy_tokenizer, tmp_path):
    """Two images, two reports: a few Seq2SeqTrainer steps make generate() give each image its own report back."""
    images = toy_images()
    train_set = Dataset.from_dict({"image": images * 4, "text": TOY_REPORTS * 4},
                                  features=Features({"image": Image(), "text": Value("string")}))
    # One batch = the whole set: every batch holds both images 4 times, so the BatchNorm statistics of training are
    # those its running averages keep for generation (in eval mode).
    cfg = GenerationFinetuneConfig(model="random", config="tiny-resnet", dataset="synthetic", data=str(tmp_path),
                                   out=str(tmp_path / "run"), image_size=64, max_steps=50, batch_size=8,
                                   learning_rate=1e-2, warmup_ratio=0.0, **SMALL_DECODER)
    model = build_generator(cfg, toy_tokenizer)
    processor = PlanImageProcessor(size=64)
    training = train_generator(model, train_set, ReportGenerationCollator(processor, toy_tokenizer, 24), cfg)
    assert training["steps"] == 50
    assert training["last_logged_loss"] < 0.2 * training["first_logged_loss"]

    model.eval()
    for decoding in ({"num_beams": 1}, {"num_beams": 2}):
        generated = generate_reports(model, processor, toy_tokenizer, images, **decoding)
        assert [normalize_report(g) for g in generated] == [normalize_report(r) for r in TOY_REPORTS], decoding


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    from plan_hf.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, 24, image_size=64, workers=1, contact_sheet=False)
    return root


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A PlanModel export with its PlanProcessor, as `training.pretrain` writes to <output_dir>/model."""
    path = tmp_path_factory.mktemp("plan_export")
    tokenizer = build_tokenizer(TOY_REPORTS + ["heart lungs pleural effusion pneumothorax consolidation"])
    torch.manual_seed(0)
    PlanModel(tiny_plan_config(vocab_size=len(tokenizer), image_size=64)).save_pretrained(path)
    PlanProcessor(PlanImageProcessor(size=64), tokenizer, max_length=64).save_pretrained(path)
    return path


def test_random_arm_keeps_the_architecture_not_the_weights(export_dir, tmp_path):
    processor = PlanProcessor.from_pretrained(export_dir)
    configure_tokenizer(processor.tokenizer)
    common = dict(dataset="synthetic", data=str(tmp_path), out=str(tmp_path), **SMALL_DECODER)
    pretrained = build_generator(GenerationFinetuneConfig(model=str(export_dir), **common), processor.tokenizer)
    random = build_generator(GenerationFinetuneConfig(model="random", config=str(export_dir), **common),
                             processor.tokenizer)
    plan = PlanModel.from_pretrained(export_dir)
    key = next(k for k in plan.vision_model.state_dict() if k.endswith("convolution.weight"))
    assert torch.equal(pretrained.encoder.vision_model.state_dict()[key], plan.vision_model.state_dict()[key])
    assert not torch.equal(random.encoder.vision_model.state_dict()[key], plan.vision_model.state_dict()[key])
    # Same seed, read after the checkpoint: both arms' decoders start from the same weights.
    assert all(torch.equal(a, b) for a, b in zip(pretrained.decoder.state_dict().values(),
                                                  random.decoder.state_dict().values()))


@needs_pycocoevalcap
def test_cli_writes_metrics_report_and_model(synthetic_dir, export_dir, tmp_path):
    from training.finetune_report_generation import main

    out = tmp_path / "run"
    payload = main(["--model_name_or_path", str(export_dir), "--dataset", "synthetic", "--data_dir", str(synthetic_dir),
                    "--output_dir", str(out), "--max_steps", "2", "--micro_batch_size", "4", "--decoder_layers", "1",
                    "--decoder_hidden_size", "32", "--decoder_heads", "2", "--max_length", "16", "--num_beams", "2",
                    "--num_examples", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["metrics"]) == set(METRIC_KEYS) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"}
    assert metrics["num_train"] > 0 and metrics["num_test"] > 0 and metrics["training"]["steps"] == 2
    assert all(0.0 <= metrics["metrics"][k] <= 1.0 for k in METRIC_KEYS if metrics["metrics"][k] is not None)
    assert (metrics["metrics"]["METEOR"] is None) == (meteor_unavailable_reason() is not None)
    assert payload["metrics"] == metrics["metrics"]

    report = (out / "report.md").read_text()
    assert "| image | reference | generated |" in report and report.count(".jpg` |") == 2
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["num_test"] and rows[0]["image"].endswith(".jpg")

    model, processor = load_report_generator(out / "model")
    regenerated = generate_reports(model, processor.image_processor, processor.tokenizer, [rows[0]["image"]],
                                   num_beams=2)
    assert regenerated == [rows[0]["generated"]]


@needs_meteor
def test_meteor_runs_offline():
    scores = report_generation_metrics(["the heart is normal in size", "small effusion"],
                                       ["the heart is normal in size", "no pneumothorax"])
    assert set(scores) == set(METRIC_KEYS)
    assert 0.3 < scores["METEOR"] < 1.0  # one perfect report (fragmentation penalty aside), one with nothing shared
    same = report_generation_metrics(["the heart is normal in size"], ["the heart is normal in size"])
    assert same["METEOR"] > 0.99


def test_mimic_cxr_layout_gives_frontal_image_report_pairs(tmp_path):
    """`--dataset mimic` reads the published MIMIC-CXR-JPG layout (split/metadata CSVs, reports under files/)."""
    from plan_hf.data.loaders import load_mimic_cxr
    from plan_hf.generation import load_report_data
    from plan_hf.generation.data import clean_report
    from tests.layouts import make_mimic_layout

    make_mimic_layout(tmp_path)
    data = load_report_data("mimic", tmp_path)
    reference = load_mimic_cxr(tmp_path, sections=("findings", "impression"))
    for split, table in (("train", data.train), ("test", data.test)):
        assert list(table["dicom_id"]) == list(reference[split]["dicom_id"])
        assert list(table["text"]) == [clean_report(text) for text in reference[split]["text"]]
    assert list(data.test["dicom_id"]) == ["d5"] and "d2" not in list(data.train["dicom_id"])  # frontal views only
    assert sorted(data.train["dicom_id"]) == ["d1", "d3", "d7"]
    assert all(text.strip() for text in list(data.train["text"]) + list(data.test["text"]))
    findings_only = load_report_data("mimic", tmp_path, sections=("findings",))
    assert len(findings_only.train) <= len(data.train)
