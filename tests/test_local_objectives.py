"""The local objectives behind `config.local_objective` inside PlanModel: each model's loss and grounding maps are
the plain functions of `losses_plan` on the model's own features; PLAN's within-pair term with sentence groups
equals a per-pair reference."""

import pytest
import torch
import torch.nn.functional as F

from plan_hf import PlanModel
from plan_hf.losses_plan import (
    gloria_local_loss,
    gloria_word_attention,
    mgca_token_loss,
    mgca_word_attention,
    mgca_word_weights,
    word_region_infonce,
)
from plan_hf.presets import preset_kwargs
from plan_hf.tiny import tiny_plan_config


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "word_ids", "sentence_ids",
                                  "content_boxes")}


def build(tokenizer, preset, **overrides):
    torch.manual_seed(0)
    return PlanModel(tiny_plan_config(vocab_size=len(tokenizer), **preset_kwargs(preset, **overrides))).eval()


def test_gloria_model_loss_and_maps_are_the_gloria_functions(tokenizer, batch):
    model = build(tokenizer, "gloria")
    with torch.no_grad():
        out = model(**model_inputs(batch))
        features = model.encode(**model_inputs(batch))
        maps = model.get_grounding_maps(**{k: v for k, v in model_inputs(batch).items() if k != "sentence_ids"})
    expected = gloria_local_loss(features.words, features.word_mask, features.pixels, features.pixel_mask)
    torch.testing.assert_close(out.loss_local, expected)
    torch.testing.assert_close(out.loss, out.loss_global + out.loss_local)
    attention = gloria_word_attention(features.words, features.word_mask, features.pixels, features.pixel_mask)
    omega = features.word_mask / features.word_mask.sum(-1, keepdim=True)
    torch.testing.assert_close(maps.heatmaps.flatten(1), torch.einsum("bm,bmn->bn", omega, attention))
    assert not any(p.requires_grad for p in model.local_alignment.parameters())  # GLoRIA's term has none


def test_mgca_model_uses_the_cls_attention_word_weights(tokenizer, batch):
    model = build(tokenizer, "mgca")
    assert model.config.local_loss_weight == 0.5
    with torch.no_grad():
        out = model(**model_inputs(batch))
        features = model.encode(**model_inputs(batch))
        text = model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                output_attentions=True)
    weights = mgca_word_weights(text.attentions[-1], batch["word_ids"], features.word_mask)
    torch.testing.assert_close(features.word_weights, weights)
    assert not torch.allclose(weights[features.word_mask], features.word_mask.float()[features.word_mask]
                              / features.word_mask.sum(-1, keepdim=True).expand_as(weights)[features.word_mask])
    expected = mgca_token_loss(features.words, features.word_mask, features.pixels, features.pixel_mask,
                               word_weights=weights, temperature=model.config.local_temperature)
    torch.testing.assert_close(out.loss_local, expected)
    torch.testing.assert_close(out.loss, out.loss_global + 0.5 * out.loss_local)
    torch.testing.assert_close(out.regions_attention, mgca_word_attention(features.words, features.pixels,
                                                                          features.pixel_mask))


@pytest.mark.parametrize("preset", ["gloria", "mgca"])
def test_reference_presets_train_every_parameter_and_reload(tokenizer, batch, preset, tmp_path):
    model = build(tokenizer, preset).train()
    model(**model_inputs(batch)).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval().save_pretrained(tmp_path)
    reloaded = PlanModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**model_inputs(batch)).loss_local, model(**model_inputs(batch)).loss_local)


def reference_grouped_within_pair(words, regions, weights, word_mask, groups, temperature):
    """Per pair, per word: InfoNCE of word m against its own region, the negatives being only other groups' words'
    regions (both directions), weighted by omega; the mean over pairs with words."""
    total, counted = 0.0, 0
    for i in range(words.shape[0]):
        valid = word_mask[i].nonzero().flatten().tolist()
        if not valid:
            continue
        pair = 0.0
        for m in valid:
            candidates = [k for k in valid if k == m or groups[i, k] != groups[i, m]]
            own = candidates.index(m)
            to_region = torch.stack([words[i, m] @ regions[i, k] for k in candidates]) / temperature
            to_word = torch.stack([regions[i, m] @ words[i, k] for k in candidates]) / temperature
            pair = pair + weights[i, m] * -0.5 * (to_region.log_softmax(0)[own] + to_word.log_softmax(0)[own])
        total, counted = total + pair, counted + 1
    return total / counted


def test_within_pair_with_sentence_groups_equals_a_per_pair_reference(float64):
    g = torch.Generator().manual_seed(0)
    words = F.normalize(torch.randn(3, 6, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    regions = F.normalize(torch.randn(3, 6, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    word_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1] * 6], dtype=torch.bool)
    groups = torch.tensor([[0, 0, 1, 1, 2, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 2, 2]])
    weights = word_mask.double() / word_mask.sum(-1, keepdim=True)
    got = word_region_infonce(words, regions, weights, word_mask, 0.3, word_groups=groups)
    expected = reference_grouped_within_pair(words, regions, weights, word_mask, groups, 0.3)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, (words, regions)), torch.autograd.grad(expected, (words, regions))):
        torch.testing.assert_close(a, b)
    # pair 1 has one sentence: no negatives, so no loss from it
    only_pair_1 = word_region_infonce(words[1:2], regions[1:2], weights[1:2], word_mask[1:2], 0.3, groups[1:2])
    assert only_pair_1.item() == 0.0


def test_sentence_negatives_need_sentence_ids(tokenizer, batch):
    model = build(tokenizer, "plan", local_within_pair=True, local_within_pair_negatives="other_sentences")
    with torch.no_grad():
        out = model(**model_inputs(batch))
        plain = build(tokenizer, "plan", local_within_pair=True)(**model_inputs(batch))
        features = model.encode(**model_inputs(batch))
    assert features.word_sentences.shape == features.word_mask.shape
    assert not torch.allclose(out.loss_local, plain.loss_local)  # the negatives changed
    with pytest.raises(ValueError, match="sentence_ids"):
        model(**{k: v for k, v in model_inputs(batch).items() if k != "sentence_ids"})


def test_model_card_names_the_local_objective():
    from plan_hf.hub import render_model_card
    from plan_hf.presets import config_from_preset

    card = str(render_model_card(config_from_preset("gloria")))
    assert "GLoRIA local (reference objective)" in card and "PLAN local" not in card
    assert "PLAN local (word-pixel alignment)" in str(render_model_card(config_from_preset("plan")))
