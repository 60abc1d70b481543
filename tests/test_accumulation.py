"""Gradient accumulation with cached features equals one step over the whole batch (all negatives kept)."""

import pytest
import torch
from accelerate import Accelerator

from plan_hf import PlanModel
from plan_hf.modeling_plan import PlanFeatures
from plan_hf.tiny import tiny_plan_config
from plan_hf.training.accumulation import cached_feature_step, contrastive_step, split_batch

from .conftest import REPORTS, synthetic_xray

K = 3  # micro-batches
MICRO = 2  # samples per micro-batch


@pytest.fixture(scope="module")
def accelerator():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions on two busy cores: one thread is much faster than two
    yield Accelerator(cpu=True)
    torch.set_num_threads(threads)


@pytest.fixture
def full_batch(processor):
    texts = [REPORTS[i % len(REPORTS)] for i in range(K * MICRO)]
    # every other image tall and narrow: its padding covers grid cells, so micro-batches carry different pixel masks
    images = [synthetic_xray(10 + i, height=160 if i % 2 else 80) for i in range(K * MICRO)]
    batch = processor(text=texts, images=images, return_tensors="pt")
    return {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "word_ids",
                                  "content_boxes")}


def build(tokenizer, seed=0, dropout=0.1, **kwargs) -> PlanModel:
    torch.manual_seed(seed)
    config = tiny_plan_config(vocab_size=len(tokenizer), image_size=64, **kwargs)
    config.text_config.hidden_dropout_prob = dropout
    config.text_config.attention_probs_dropout_prob = dropout
    if config.vision_config.model_type == "vit":
        config.vision_config.hidden_dropout_prob = dropout
    return PlanModel(config).train()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(expected, got):
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_accumulation_equals_one_big_batch_without_dropout(tokenizer, full_batch, accelerator):
    """ViT (no BatchNorm) and no dropout: the towers' outputs do not depend on how the batch is split."""
    reference = build(tokenizer, dropout=0.0, vision="vit")
    assert not reference.encode(**full_batch).pixel_mask.all()  # the padding is masked in this test
    loss = reference(**full_batch, return_loss=True).loss
    loss.backward()

    model = build(tokenizer, dropout=0.0, vision="vit")
    result = contrastive_step(accelerator, model, full_batch, accumulation_steps=K)
    assert result.finite
    torch.testing.assert_close(result.output.loss, loss.detach(), rtol=1e-5, atol=1e-6)
    assert_same_grads(grads(reference), grads(model))
    # the loss-side parameters got their gradient too
    assert model.logit_scale.grad is not None and model.local_alignment.word_gate.weight.grad is not None


def reference_step(model, micro_batches, seed):
    """Each micro-batch encoded with a graph, in order, from `seed`; one loss over the concatenation."""
    torch.manual_seed(seed)
    parts = [model(**micro, return_features=True) for micro in micro_batches]
    output = model.loss_from_features(PlanFeatures.concatenate(parts))
    output.loss.backward()
    return output.loss.detach()


def test_accumulation_with_dropout_replays_the_same_masks(tokenizer, full_batch, accelerator):
    """ResNet (BatchNorm per micro-batch) with dropout on: the re-encoding pass must draw the same dropout masks."""
    micro_batches = split_batch(full_batch, K)
    reference = build(tokenizer)
    loss = reference_step(reference, micro_batches, seed=123)

    model = build(tokenizer)
    torch.manual_seed(123)
    result = cached_feature_step(accelerator, model, micro_batches)
    torch.testing.assert_close(result.output.loss, loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(grads(reference), grads(model))

    # Dropout really is on: another seed gives other gradients (so the equality above is not vacuous).
    other = build(tokenizer)
    reference_step(other, micro_batches, seed=7)
    name = "text_model.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(grads(other)[name], grads(reference)[name])


def test_batchnorm_statistics_count_each_sample_once(tokenizer, full_batch, accelerator):
    micro_batches = split_batch(full_batch, K)
    reference = build(tokenizer, dropout=0.0)
    with torch.no_grad():
        for micro in micro_batches:
            reference(**micro, return_features=True)
    model = build(tokenizer, dropout=0.0)
    cached_feature_step(accelerator, model, micro_batches)
    for (name, expected), got in zip(reference.named_buffers(), model.buffers()):
        torch.testing.assert_close(got, expected, msg=name)


def test_nonfinite_loss_leaves_no_gradient(tokenizer, full_batch, accelerator):
    model = build(tokenizer)
    bad = dict(full_batch, pixel_values=full_batch["pixel_values"].clone())
    bad["pixel_values"][0] = float("nan")
    buffers = [b.clone() for b in model.buffers()]
    result = contrastive_step(accelerator, model, bad, accumulation_steps=K)
    assert not result.finite
    assert all(p.grad is None for p in model.parameters())
    for before, after in zip(buffers, model.buffers()):  # NaN never reached the BatchNorm running statistics
        torch.testing.assert_close(after, before)


def test_split_batch_needs_equal_parts(full_batch):
    assert [m["input_ids"].shape[0] for m in split_batch(full_batch, 2)] == [3, 3]
    with pytest.raises(ValueError, match="equal micro-batches"):
        split_batch(full_batch, 4)
