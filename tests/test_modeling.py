"""PlanModel: outputs, each loss switch, saving and loading (also as remote code), Auto classes and the pipeline."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plan_hf import PlanConfig, PlanForImageClassification, PlanModel
from plan_hf.tiny import tiny_plan_config


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "word_ids", "sentence_ids")}


def clip_loss(out, model):
    scale = model.logit_scale.clamp(max=model.config.logit_scale_max).exp()
    logits = scale * out.image_embeds @ out.text_embeds.T
    labels = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


@pytest.mark.parametrize("vision", ["resnet", "vit"])
def test_forward_and_every_parameter_learns(tokenizer, batch, vision):
    torch.manual_seed(0)
    model = PlanModel(tiny_plan_config(vocab_size=len(tokenizer), vision=vision, local_pixel_update=True))
    model.train()
    out = model(**model_inputs(batch))
    assert out.logits_per_image.shape == (4, 4) and out.image_embeds.shape == (4, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    assert len(out.loss_local_stages) == 3
    torch.testing.assert_close(out.loss, out.loss_global + out.loss_local)
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_local_weight_zero_is_the_plain_clip_loss(make_model, batch):
    model = make_model(local_loss_weight=0.0)
    out = model(**model_inputs(batch))
    assert out.loss_local is None
    torch.testing.assert_close(out.loss, clip_loss(out, model))


def test_one_and_three_stages_differ(make_model, batch):
    one = make_model(local_num_stages=1)(**model_inputs(batch))
    three = make_model(local_num_stages=3)(**model_inputs(batch))
    torch.testing.assert_close(one.loss_global, three.loss_global)  # same towers
    assert len(one.loss_local_stages) == 1 and len(three.loss_local_stages) == 3
    torch.testing.assert_close(one.loss_local, one.loss_local_stages[0])
    assert not torch.allclose(one.loss_local, three.loss_local)


def test_keep_ratio_one_keeps_every_pixel(make_model, batch):
    full = make_model(local_region_keep_ratio=1.0, local_keep_ratio_decay=1.0)(**model_inputs(batch))
    assert (full.regions_attention > 0).all()
    sparse = make_model(local_region_keep_ratio=0.3)(**model_inputs(batch))
    assert (sparse.regions_attention == 0).any()
    torch.testing.assert_close(sparse.regions_attention.sum(-1)[batch["word_ids"].max(-1).values >= 0][:, 0],
                               torch.ones(4))


def test_word_gate_off_gives_uniform_weights(make_model, batch):
    out = make_model(local_word_gate=False)(**model_inputs(batch))
    counts = torch.stack([torch.unique(ids[ids >= 0]).numel() * torch.ones(()) for ids in batch["word_ids"]])
    assert out.word_weights.shape[1] == int(batch["word_ids"].max()) + 1
    for i, n in enumerate(counts.long().tolist()):
        torch.testing.assert_close(out.word_weights[i, :n], torch.full((n,), 1.0 / n))
        assert (out.word_weights[i, n:] == 0).all()
    gated = make_model(local_word_gate=True)(**model_inputs(batch))
    assert not torch.allclose(gated.word_weights, out.word_weights)


def test_local_loss_scale_weighs_the_local_term(make_model, batch):
    model = make_model(local_loss_weight=2.0)
    start = model(**model_inputs(batch), local_loss_scale=0.0)
    torch.testing.assert_close(start.loss, start.loss_global)
    mid = model(**model_inputs(batch), local_loss_scale=0.5)
    torch.testing.assert_close(mid.loss, mid.loss_global + 1.0 * mid.loss_local)


def test_pixel_update_starts_as_identity_and_learns(make_model, batch):
    plain = make_model()
    updated = make_model(local_pixel_update=True)
    missing, _ = updated.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith("local_alignment.pixel_update") for k in missing)
    a, b = plain(**model_inputs(batch)), updated(**model_inputs(batch))
    torch.testing.assert_close(a.loss, b.loss)  # gate = 0 at initialisation
    b.loss.backward()
    assert updated.local_alignment.pixel_update.gate.grad.abs().item() > 0


def test_within_pair_term_switch(make_model, batch):
    both = make_model(local_within_pair=True)(**model_inputs(batch))
    cross_only = make_model(local_within_pair=False)(**model_inputs(batch))
    within_only = make_model(local_cross_sample=False, local_within_pair=True)(**model_inputs(batch))
    torch.testing.assert_close(cross_only.loss_local + within_only.loss_local, both.loss_local)
    with pytest.raises(ValueError, match="local_within_pair"):
        make_model(local_within_pair=False, local_cross_sample=False)


def test_cross_sample_term_switch(make_model, batch):
    with_cross = make_model(local_cross_sample=True, local_within_pair=True)(**model_inputs(batch))
    without = make_model(local_cross_sample=False, local_within_pair=True)(**model_inputs(batch))
    assert with_cross.loss_local > without.loss_local  # the cross term is an extra non-negative InfoNCE


def test_grounding_maps_match_training_regions(make_model, batch):
    model = make_model(local_cross_sample=False, local_within_pair=True)
    out = model(**model_inputs(batch))
    maps = model.get_grounding_maps(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                    word_ids=batch["word_ids"], regions=True)
    h, w = maps.heatmaps.shape[1:]
    assert (h, w) == (2, 2) and maps.word_heatmaps.shape[2:] == (h, w)  # a 64 px input, a stride-32 tower
    torch.testing.assert_close(maps.word_heatmaps.flatten(2), out.regions_attention)
    torch.testing.assert_close(maps.heatmaps.sum(dim=(1, 2)), torch.ones(4))


def test_default_grounding_map_is_the_dense_soft_region(make_model, batch):
    """softmax over the image's cells of w.p / tau_s per word, combined by omega: computed here by hand."""
    model = make_model(local_num_stages=3, local_region_sparsify="top_mass")
    with torch.no_grad():
        maps = model.get_grounding_maps(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                        word_ids=batch["word_ids"])
        regions = model.get_grounding_maps(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                           word_ids=batch["word_ids"], regions=True)
        features = model.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                batch["word_ids"], with_local=True, with_place=False)
        scale = model.local_alignment.similarity_log_scale.exp()
        by_hand = torch.softmax(scale * features.words @ features.pixels.transpose(1, 2), dim=-1)  # (B, M, N)
        omega = model.local_alignment.word_weights(features.words, features.word_mask)
    torch.testing.assert_close(maps.word_heatmaps.flatten(2), by_hand)
    torch.testing.assert_close(maps.heatmaps.flatten(1), torch.einsum("bm,bmn->bn", omega, by_hand))
    torch.testing.assert_close(maps.word_weights, regions.word_weights)
    assert not torch.allclose(maps.heatmaps, regions.heatmaps)  # top-mass sparsification zeroes cells of A'
    assert (regions.word_heatmaps == 0).any() and (maps.word_heatmaps > 0).all()


@pytest.mark.parametrize("vision", ["resnet", "vit"])
def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, batch, vision):
    def grads(checkpointing):
        torch.manual_seed(0)
        model = PlanModel(tiny_plan_config(vocab_size=len(tokenizer), vision=vision)).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(**model_inputs(batch)).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_save_and_reload_reproduces_outputs(make_model, batch, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert {"configuration_plan.py", "modeling_plan.py", "losses_plan.py"} <= set(files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_plan.PlanModel"
    reloaded = PlanModel.from_pretrained(tmp_path).eval()
    a, b = model(**model_inputs(batch)), reloaded(**model_inputs(batch))
    for field in ("loss", "logits_per_image", "regions_attention"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(b.loss_local_stages), torch.stack(a.loss_local_stages), rtol=0, atol=0)


def test_auto_classes_resolve_plan(make_model, processor, tmp_path):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, AutoProcessor

    make_model().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PlanConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), PlanModel)
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=3)
    assert isinstance(classifier, PlanForImageClassification)
    assert type(AutoProcessor.from_pretrained(tmp_path)).__name__ == "PlanProcessor"
    assert type(AutoImageProcessor.from_pretrained(tmp_path)).__name__ == "PlanImageProcessor"


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "plan_hf" or name.startswith("plan_hf."):
                raise ImportError("plan_hf is blocked in this process")
    sys.meta_path.insert(0, Block())
    import numpy as np, torch
    from transformers import AutoModel, AutoProcessor
    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert "plan_hf" not in sys.modules and type(model).__module__.startswith("transformers_modules"), type(model)
    data = np.load(folder + "/inputs.npz")
    inputs = {k: torch.from_numpy(data[k]) for k in data.files}
    with torch.no_grad():
        out = model(**inputs)
    again = processor(text=["Right lower lobe consolidation."], return_tensors="pt")
    np.savez(folder + "/remote.npz", loss=out.loss.numpy(), logits=out.logits_per_image.numpy(),
             word_ids=again["word_ids"].numpy())
    """
)


def test_remote_code_load_without_plan_hf(make_model, batch, processor, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    inputs = {k: v.numpy() for k, v in model_inputs(batch).items()}
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = np.load(tmp_path / "remote.npz")
    with torch.no_grad():
        local = model(**model_inputs(batch))
    np.testing.assert_allclose(remote["loss"], local.loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(remote["logits"], local.logits_per_image.numpy(), rtol=1e-6)
    expected_ids = processor(text=["Right lower lobe consolidation."])["word_ids"].numpy()
    np.testing.assert_array_equal(remote["word_ids"], expected_ids)


def test_zero_shot_pipeline_scores_candidate_labels(make_model, tokenizer, image_processor):
    from PIL import Image
    from transformers import pipeline

    from tests.conftest import synthetic_xray

    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    model = make_model()
    with CaptureLogger(hf_logging.get_logger("transformers.pipelines.base")) as captured:
        classifier = pipeline("zero-shot-image-classification", model=model, tokenizer=tokenizer,
                              image_processor=image_processor)
    assert "is not supported" not in captured.out  # PlanModel is registered with the task's Auto class
    image = Image.fromarray(synthetic_xray(3))
    labels = ["pneumothorax", "pleural effusion", "cardiomegaly"]
    results = classifier(image, candidate_labels=labels, hypothesis_template="{}")
    assert sorted(r["label"] for r in results) == sorted(labels)
    assert sum(r["score"] for r in results) == pytest.approx(1.0, abs=1e-5)
    text = tokenizer(labels, padding=True, return_tensors="pt")
    pixels = image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = model(**text, pixel_values=pixels).logits_per_image.softmax(-1)[0]
    expected = {label: float(p) for label, p in zip(labels, probs)}
    for r in results:
        assert r["score"] == pytest.approx(expected[r["label"]], abs=1e-5)


@pytest.mark.parametrize("field,value", [("local_region_keep_ratio", 1.5), ("local_num_stages", 0),
                                         ("local_loss_weight", -1.0), ("local_region_sparsify", "topk"),
                                         ("local_temperature_decay", 0.0), ("local_stage_loss_weights", [1.0]),
                                         ("mask_padding", "yes"), ("local_within_pair", None)])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PlanConfig(**{field: value})


def test_classifier_keeps_pretrained_vision_tower_and_losses(make_model, batch, tmp_path):
    plan = make_model()
    plan.save_pretrained(tmp_path)
    clf = PlanForImageClassification.from_pretrained(tmp_path, num_labels=3).eval()
    for name, tensor in plan.vision_model.state_dict().items():
        torch.testing.assert_close(clf.vision_model.state_dict()[name], tensor)
    pixels = batch["pixel_values"]
    multi = torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    out = clf(pixel_values=pixels, labels=multi)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, multi))
    clf.config.problem_type = None
    classes = torch.tensor([0, 2, 1, 2])
    out = clf(pixel_values=pixels, labels=classes)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, classes))
    clf.freeze_vision_tower()
    assert not any(p.requires_grad for p in clf.vision_model.parameters())
    assert all(p.requires_grad for p in clf.classifier.parameters())
    assert math.isfinite(out.loss.item())


def test_text_pooling_mean_is_the_masked_mean_of_token_states(make_model, batch):
    cls_model, mean_model = make_model(text_pooling="cls"), make_model(text_pooling="mean")
    inputs = model_inputs(batch)
    with torch.no_grad():
        hidden = mean_model.text_model(input_ids=inputs["input_ids"],
                                       attention_mask=inputs["attention_mask"]).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        expected = F.normalize(mean_model.text_projection((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
        got = mean_model(**inputs).text_embeds
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, cls_model(**inputs).text_embeds)
    with pytest.raises(ValueError, match="text_pooling"):
        PlanConfig(text_pooling="max")


def test_content_grid_mask_by_hand():
    from plan_hf.modeling_plan import content_grid_mask

    # 64 x 64 input, 4 x 4 grid: cell centres at 8, 24, 40, 56. Box rows [10, 54) hold centres 24 and 40.
    boxes = torch.tensor([[10, 0, 44, 64], [0, 20, 64, 30], [30, 30, 2, 2]])
    mask = content_grid_mask(boxes, (64, 64), (4, 4)).view(3, 4, 4)
    expected = torch.zeros(3, 4, 4, dtype=torch.bool)
    expected[0, 1:3, :] = True
    expected[1, :, 1:3] = True  # columns [20, 50): centres 24 and 40
    expected[2] = True  # no centre inside: every cell stays
    assert torch.equal(mask, expected)


@pytest.fixture
def padded_batch(tokenizer):
    """128 px inputs (a 4 x 4 ResNet grid) of tall, narrow images: the two outer grid columns are padding."""
    from plan_hf import PlanImageProcessor, PlanProcessor

    processor = PlanProcessor(image_processor=PlanImageProcessor(size=128), tokenizer=tokenizer)
    from tests.conftest import REPORTS, synthetic_xray

    return processor(text=REPORTS[:4], images=[synthetic_xray(i, height=128, width=48) for i in range(4)],
                     return_tensors="pt")


def test_padding_gets_no_attention_in_training_and_grounding(make_model, padded_batch):
    inputs = {**model_inputs(padded_batch), "content_boxes": padded_batch["content_boxes"]}
    model = make_model(local_cross_sample=False, local_within_pair=True, pcma_loss_weight=0.5)
    out = model(**inputs)
    h, w = 4, 4  # a 128 px input, a stride-32 tower
    assert out.regions_attention.shape[-1] == h * w
    padding = torch.zeros(h, w, dtype=torch.bool)
    padding[:, [0, 3]] = True
    attention = out.regions_attention.view(4, -1, h, w)
    assert torch.all(attention[..., padding] == 0) and torch.all(attention[..., ~padding].sum(-1) > 0)
    maps = model.get_grounding_maps(**inputs)
    assert torch.all(maps.heatmaps[:, padding] == 0) and torch.all(maps.heatmaps[:, ~padding] > 0)
    maps = model.get_grounding_maps(**inputs, regions=True)
    assert torch.all(maps.heatmaps[:, padding] == 0)
    torch.testing.assert_close(maps.word_heatmaps.flatten(2), out.regions_attention)
    # The pathology queries ignore the padding cells: changing their features leaves the V-PORs as they were.
    features = model.encode(**{k: v for k, v in inputs.items()})
    flat_padding = padding.flatten().expand(4, -1)
    assert torch.equal(features.pixel_mask, ~flat_padding)
    noisy = features.pixels.clone()
    noisy[flat_padding] = F.normalize(torch.randn_like(noisy[flat_padding]), dim=-1)
    torch.testing.assert_close(model.pathology_extractor(noisy, features.pixel_mask),
                               model.pathology_extractor(features.pixels, features.pixel_mask))
    assert not torch.allclose(model.pathology_extractor(noisy), model.pathology_extractor(features.pixels))
    # Switched off (or without content_boxes), the padding takes part again.
    off = make_model(local_cross_sample=False, local_within_pair=True, pcma_loss_weight=0.5, mask_padding=False)(**inputs)
    plain = model(**model_inputs(padded_batch))
    torch.testing.assert_close(off.loss, plain.loss)
    assert torch.any(off.regions_attention.view(4, -1, h, w)[..., padding] > 0)
    assert not torch.allclose(off.loss_local, out.loss_local)


def test_pixel_update_model_saves_and_reloads(make_model, batch, tmp_path):
    model = make_model(local_pixel_update=True).eval()
    with torch.no_grad():
        model.local_alignment.pixel_update.gate.fill_(0.3)  # not the initial 0: the update changes the regions
    model.save_pretrained(tmp_path)
    reloaded = PlanModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded.local_alignment.pixel_update.gate, torch.tensor([0.3]))
    with torch.no_grad():
        a, b = model(**model_inputs(batch)), reloaded(**model_inputs(batch))
    torch.testing.assert_close(b.loss_local, a.loss_local, rtol=0, atol=0)


def test_copies_of_a_checkpointed_resnet_run_their_own_weights(make_model, batch):
    import copy
    import pickle

    model = make_model()
    # the stages are checkpointing layers from construction on: a plain model pickles (a per-instance closure could
    # not), and the enabled model copies with its own weights
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        torch.testing.assert_close(restored(**model_inputs(batch)).image_embeds, model(**model_inputs(batch)).image_embeds)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in twin.vision_model.parameters():
            parameter.mul_(1.5)
        assert not torch.allclose(twin(**model_inputs(batch)).image_embeds, model(**model_inputs(batch)).image_embeds)


def test_return_dict_false_and_tower_outputs(make_model, batch):
    model = make_model().eval()
    with torch.no_grad():
        out = model(**model_inputs(batch), output_hidden_states=True)
        as_tuple = model(**model_inputs(batch), return_dict=False)
        text = model.get_text_features(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.loss)
    layers = model.config.text_config.num_hidden_layers
    assert len(out.text_model_output.hidden_states) == layers + 1 == len(text.hidden_states)
    assert out.vision_model_output.hidden_states is not None
    assert model.get_input_embeddings() is model.text_model.embeddings.word_embeddings


@pytest.mark.parametrize("phrase", ["", "   ", "no the of .", "..."])
def test_grounding_a_phrase_without_words_is_a_clear_error(make_model, processor, phrase):
    from plan_hf.grounding import ground_phrase
    from tests.conftest import synthetic_xray

    with pytest.raises(ValueError, match="nothing to ground in phrase"):
        ground_phrase(make_model(), processor, synthetic_xray(0), phrase)
