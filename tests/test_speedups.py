"""The speed-ups of benchmarks/PERFORMANCE.md keep the results: the local loss computed from the soft regions alone
equals the readable reference and the materialised path; per-chunk checkpointing changes neither values nor
gradients and keeps only O(B) tensors for the backward; SDPA matches eager attention in the text tower."""

import pytest
import torch
import torch.nn.functional as F

from plan_hf.losses_plan import (
    StageSchedule,
    local_match_scores,
    plan_local_loss,
    progressive_regions,
    region_match_scores,
    word_weights,
)
from tests.test_losses import SCHEDULE, make_inputs, ref_local_loss


def unchanged_pixels(pixels, attention, words):
    """Sends plan_local_loss down the path that materialises every region r^(i->j) (the path before)."""
    return pixels


@pytest.mark.parametrize("method", ["top_mass", "sparsemax", "none"])
def test_regions_from_attention_alone_equal_the_reference(method, float64):
    """N <= d takes region_match_scores (the regions are never built); float64, values and gradients."""
    w, p, mask, gate, scale = make_inputs(batch=5, words=5, pixels=6, dim=8, seed=1)
    omega = word_weights(mask, gate, floor=0.5)
    got = plan_local_loss(w, mask, p, scale, SCHEDULE, omega, method=method, prior_weight=0.7, prior_epsilon=1e-6,
                          cross_sample=True, chunk_size=2)
    grads = torch.autograd.grad(got.loss, (w, p, scale))
    ref_total, ref_stages = ref_local_loss(w, mask, p, scale, SCHEDULE, omega, method, 0.7, 1e-6, True)
    ref_grads = torch.autograd.grad(ref_total, (w, p, scale))
    torch.testing.assert_close(got.stage_losses, ref_stages)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_region_match_scores_equal_local_match_scores():
    g = torch.Generator().manual_seed(0)
    words = F.normalize(torch.randn(4, 6, 32, generator=g, dtype=torch.float64), dim=-1)  # (B, M, d)
    pixels = F.normalize(torch.randn(3, 10, 32, generator=g, dtype=torch.float64), dim=-1)  # (J, N, d)
    omega = torch.rand(4, 6, generator=g, dtype=torch.float64)
    schedule = StageSchedule(temperatures=[0.1, 0.08], keep_ratios=[0.5, 0.4], loss_weights=[0.5, 0.5])
    stages = progressive_regions(words.unsqueeze(1), pixels.unsqueeze(0), torch.tensor(8.0, dtype=torch.float64),
                                 schedule, "top_mass", 1.0, 1e-6)
    cosine = torch.einsum("imd,jnd->ijmn", words, pixels)
    gram = pixels @ pixels.transpose(-1, -2)
    for attention, regions in stages:
        torch.testing.assert_close(region_match_scores(attention, cosine, gram, omega),
                                   local_match_scores(words.unsqueeze(1), regions, omega))


def test_regions_from_attention_alone_match_the_materialised_path_in_float32():
    w, p, mask, gate, scale = make_inputs(batch=9, words=7, pixels=12, dim=24, seed=2)
    omega = word_weights(mask, gate, floor=0.5)
    schedule = StageSchedule(temperatures=[0.1, 0.08, 0.064], keep_ratios=[0.5, 0.4, 0.32],
                             loss_weights=[1 / 6, 2 / 6, 3 / 6])
    now = plan_local_loss(w, mask, p, scale, schedule, omega, chunk_size=4)
    before = plan_local_loss(w, mask, p, scale, schedule, omega, chunk_size=4, pixel_update=unchanged_pixels)
    torch.testing.assert_close(now.stage_losses, before.stage_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(now.regions_attention, before.regions_attention)
    grads_now = torch.autograd.grad(now.loss, (w, p, scale))
    grads_before = torch.autograd.grad(before.loss, (w, p, scale))
    for a, b in zip(grads_now, grads_before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class ScaledPixelUpdate(torch.nn.Module):
    """A text-aware pixel update with a parameter, so checkpointing must also give the module its gradient."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, pixels, attention, words):
        return F.normalize(pixels + self.gate * (attention.transpose(-1, -2).to(words.dtype) @ words), dim=-1)


@pytest.mark.parametrize("pixel_update", [None, "module"])
def test_checkpointed_chunks_give_identical_values_and_gradients(pixel_update):
    update = ScaledPixelUpdate() if pixel_update else None
    w, p, mask, gate, scale = make_inputs(batch=7, words=5, pixels=6, dim=8, seed=3)
    omega = word_weights(mask, gate, floor=0.5)
    parameters = (w, p, scale) + ((update.gate,) if update else ())
    outputs, grads = [], []
    for checkpoint in (False, True):
        out = plan_local_loss(w, mask, p, scale, SCHEDULE, omega, chunk_size=3, pixel_update=update,
                              checkpoint_chunks=checkpoint)
        outputs.append(out)
        grads.append(torch.autograd.grad(out.loss, parameters))
    assert torch.equal(outputs[0].stage_losses, outputs[1].stage_losses)
    assert torch.equal(outputs[0].regions_attention, outputs[1].regions_attention)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def _saved_bytes(fn) -> int:
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def test_checkpointed_chunks_keep_memory_linear_in_the_batch():
    """Without checkpointing autograd keeps every chunk's (B, J, M, N) tensors: O(B^2) whatever the chunk size.
    With it only the (B, J) scores and the own pairs are kept: doubling B roughly doubles what is saved."""
    schedule = StageSchedule(temperatures=[0.1, 0.08, 0.064], keep_ratios=[0.5, 0.4, 0.32],
                             loss_weights=[1 / 6, 2 / 6, 3 / 6])

    def saved(batch, checkpoint):
        w, p, mask, gate, scale = make_inputs(batch=batch, words=6, pixels=12, dim=16)
        omega = word_weights(mask, gate, floor=0.5)
        return _saved_bytes(lambda: plan_local_loss(w, mask, p, scale, schedule, omega, chunk_size=4,
                                                    checkpoint_chunks=checkpoint))

    plain = [saved(b, False) for b in (8, 16)]
    checkpointed = [saved(b, True) for b in (8, 16)]
    assert plain[1] > 3.5 * plain[0]  # quadratic
    assert checkpointed[1] < 2.5 * checkpointed[0]  # linear
    assert checkpointed[1] < plain[1] / 3


def test_sdpa_is_the_text_tower_default_and_matches_eager(make_model, batch):
    sdpa = make_model(seed=0)
    assert sdpa.text_model.config._attn_implementation == "sdpa"
    eager = make_model(seed=0)
    eager.text_model.set_attn_implementation("eager")
    assert eager.text_model.config._attn_implementation == "eager"
    with torch.no_grad():
        a = sdpa.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        b = eager.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_channels_last_input_keeps_the_resnet_tower_output():
    """The CNN tower fed NHWC (what a channels_last pipeline does) gives the NCHW result within float32 rounding."""
    from transformers import AutoConfig, AutoModel

    from plan_hf.tiny import tiny_vision_config

    torch.manual_seed(0)
    tower = AutoModel.from_config(AutoConfig.for_model(**tiny_vision_config("resnet"))).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = tower(pixel_values=pixels).last_hidden_state
        last = tower(pixel_values=pixels.contiguous(memory_format=torch.channels_last)).last_hidden_state
    torch.testing.assert_close(last, reference, rtol=1e-5, atol=1e-5)
