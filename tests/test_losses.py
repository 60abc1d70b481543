"""PLAN's vectorised local loss against a plain per-sample reference, and the losses' building blocks."""

import math

import pytest
import torch
import torch.nn.functional as F

from plan_hf.losses_plan import (
    StageSchedule,
    global_contrastive_loss,
    plan_local_loss,
    pool_by_ids,
    soft_regions,
    sparsemax,
    word_weights,
)



pytestmark = pytest.mark.usefixtures("float64")  # exact comparisons with the reference


# ---------------------------------------------------------------------------------------------------------------------
# A readable reference: loops over pairs, stages and words, written from METHOD.md independently of the library.
# ---------------------------------------------------------------------------------------------------------------------
def ref_keep_top_mass(weights, keep_ratio):
    order = sorted(range(len(weights)), key=lambda n: -float(weights[n].detach()))
    mask = torch.zeros_like(weights).detach()
    mass = 0.0
    for n in order:
        if mass < keep_ratio:
            mask[n] = 1.0
            mass += float(weights[n].detach())
    kept = weights * mask
    return kept / kept.sum()


def ref_regions(words, pixels, scale, keep_ratios, method, prior_weight, eps):
    """words (M, d), pixels (N, d) of ONE (report, image) pair -> list over stages of (A' (M, N), r (M, d))."""
    out, prior = [], None
    for keep in keep_ratios:
        rows_a, rows_r = [], []
        for m in range(words.shape[0]):
            logits = scale * (pixels @ words[m])  # (N,)
            if prior is not None:
                logits = logits + prior_weight * torch.log(prior[m] + eps)
            if method == "sparsemax":
                a = sparsemax(logits)
            else:
                a = torch.softmax(logits, dim=0)
                if method == "top_mass" and keep < 1.0:
                    a = ref_keep_top_mass(a, keep)
            rows_a.append(a)
            rows_r.append(F.normalize(a @ pixels, dim=0))
        attention, regions = torch.stack(rows_a), torch.stack(rows_r)
        out.append((attention, regions))
        prior = attention
    return out


def ref_local_loss(words, mask, pixels, scale, schedule, omega, method, prior_weight, eps, cross, pixel_mask=None,
                   within_pair=True):
    """pixel_mask (B, N): image j's masked pixels are simply left out of its pixel set."""
    batch = words.shape[0]
    stage_losses = []
    image_pixels = [pixels[j] if pixel_mask is None else pixels[j][pixel_mask[j]] for j in range(batch)]
    per_pair = [[ref_regions(words[i][mask[i]], image_pixels[j], scale, schedule.keep_ratios, method, prior_weight,
                             eps)
                 for j in range(batch)] for i in range(batch)]
    for t, tau in enumerate(schedule.temperatures):
        within, counted = 0.0, 0
        for i in range(batch):
            w = words[i][mask[i]]
            if len(w) == 0:
                continue
            r = per_pair[i][i][t][1]
            weights = omega[i][mask[i]]
            sample = 0.0
            for m in range(len(w)):
                word_to_region = -torch.log_softmax((r @ w[m]) / tau, dim=0)[m]
                region_to_word = -torch.log_softmax((w @ r[m]) / tau, dim=0)[m]
                sample = sample + weights[m] * 0.5 * (word_to_region + region_to_word)
            within, counted = within + sample, counted + 1
        loss_t = within / counted if within_pair else 0.0
        if cross:
            scores = torch.zeros(batch, batch)
            for i in range(batch):
                for j in range(batch):
                    w, r = words[i][mask[i]], per_pair[i][j][t][1]
                    scores[i, j] = (omega[i][mask[i]] * (w * r).sum(-1)).sum()
            logits = scores / tau
            rows = sum(-torch.log_softmax(logits[i], 0)[i] for i in range(batch)) / batch
            cols = sum(-torch.log_softmax(logits[:, j], 0)[j] for j in range(batch)) / batch
            loss_t = loss_t + 0.5 * (rows + cols)
        stage_losses.append(loss_t)
    return sum(a * l for a, l in zip(schedule.loss_weights, stage_losses)), torch.stack(stage_losses)


def make_inputs(batch=3, words=5, pixels=6, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(batch, words, dim, generator=g), dim=-1).requires_grad_()
    p = F.normalize(torch.randn(batch, pixels, dim, generator=g), dim=-1).requires_grad_()
    mask = torch.ones(batch, words, dtype=torch.bool)
    mask[0, 3:] = False  # a short report
    mask[2, 4:] = False
    gate = torch.rand(batch, words, generator=g)
    scale = torch.tensor(4.0, requires_grad=True)
    return w, p, mask, gate, scale


SCHEDULE = StageSchedule(temperatures=[0.5, 0.4, 0.32], keep_ratios=[0.7, 0.56, 0.448], loss_weights=[1 / 6, 2 / 6, 3 / 6])


@pytest.mark.parametrize("method", ["top_mass", "sparsemax", "none"])
@pytest.mark.parametrize("cross", [False, True])
def test_vectorised_local_loss_equals_reference(method, cross):
    w, p, mask, gate, scale = make_inputs()
    omega = word_weights(mask, gate, floor=0.5)
    got = plan_local_loss(w, mask, p, scale, SCHEDULE, omega, method=method, prior_weight=0.7, prior_epsilon=1e-6,
                          cross_sample=cross, chunk_size=2)
    grads = torch.autograd.grad(got.loss, (w, p, scale))

    ref_total, ref_stages = ref_local_loss(w, mask, p, scale, SCHEDULE, omega, method, 0.7, 1e-6, cross)
    ref_grads = torch.autograd.grad(ref_total, (w, p, scale))
    torch.testing.assert_close(got.stage_losses, ref_stages)
    torch.testing.assert_close(got.loss, ref_total)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["top_mass", "sparsemax", "none"])
@pytest.mark.parametrize("cross", [False, True])
def test_masked_pixels_are_as_if_absent(method, cross):
    """A pixel mask (the padding around an image) = the reference run on each image's unmasked pixels only; images
    of the batch have different masks, and chunks (size 2 of 3 images) split them."""
    w, p, mask, gate, scale = make_inputs()
    pixel_mask = torch.ones(3, 6, dtype=torch.bool)
    pixel_mask[0, :2] = False
    pixel_mask[1, 5] = False
    omega = word_weights(mask, gate, floor=0.5)
    got = plan_local_loss(w, mask, p, scale, SCHEDULE, omega, method=method, prior_weight=0.7, prior_epsilon=1e-6,
                          cross_sample=cross, chunk_size=2, pixel_mask=pixel_mask)
    grads = torch.autograd.grad(got.loss, (w, p, scale))
    ref_total, ref_stages = ref_local_loss(w, mask, p, scale, SCHEDULE, omega, method, 0.7, 1e-6, cross, pixel_mask)
    ref_grads = torch.autograd.grad(ref_total, (w, p, scale))
    torch.testing.assert_close(got.stage_losses, ref_stages)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert torch.all(got.regions_attention.masked_select(~pixel_mask.unsqueeze(1)) == 0)
    assert torch.all(grads[1][~pixel_mask] == 0)  # a masked pixel has no say in the loss


@pytest.mark.parametrize("method", ["top_mass", "sparsemax"])
def test_cross_sample_term_alone_equals_reference(method):
    w, p, mask, gate, scale = make_inputs()
    omega = word_weights(mask, gate, floor=0.5)
    got = plan_local_loss(w, mask, p, scale, SCHEDULE, omega, method=method, prior_weight=0.7, prior_epsilon=1e-6,
                          cross_sample=True, within_pair=False, chunk_size=2)
    ref_total, ref_stages = ref_local_loss(w, mask, p, scale, SCHEDULE, omega, method, 0.7, 1e-6, True,
                                           within_pair=False)
    torch.testing.assert_close(got.stage_losses, ref_stages)
    for a, b in zip(torch.autograd.grad(got.loss, (w, p, scale)), torch.autograd.grad(ref_total, (w, p, scale))):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="within_pair or cross_sample"):
        plan_local_loss(w, mask, p, scale, SCHEDULE, omega, cross_sample=False, within_pair=False)


def test_chunk_size_does_not_change_the_loss():
    w, p, mask, gate, scale = make_inputs(batch=5)
    omega = word_weights(mask, gate, 0.5)
    losses = [plan_local_loss(w, mask, p, scale, SCHEDULE, omega, cross_sample=True, chunk_size=c).loss
              for c in (1, 2, 5, 16)]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0])


def test_keep_ratio_one_is_plain_softmax_and_top_mass_keeps_the_heaviest():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(soft_regions(logits, 1.0, "top_mass"), logits.softmax(-1))
    probs = logits.softmax(-1)[0]  # 0.644, 0.237, 0.087, 0.032
    kept = soft_regions(logits, 0.7, "top_mass")[0]  # 0.644 < 0.7 so the 2nd pixel is needed too
    expected = torch.tensor([probs[0], probs[1], 0, 0]) / (probs[0] + probs[1])
    torch.testing.assert_close(kept, expected)
    assert soft_regions(logits, 0.5, "top_mass")[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_sparsemax_by_hand():
    # z = (1, 0.5, -1): tau solves sum(max(z - tau, 0)) = 1 -> support {1, 0.5}: (1 + 0.5 - 1) / 2 = 0.25
    out = sparsemax(torch.tensor([1.0, 0.5, -1.0]))
    torch.testing.assert_close(out, torch.tensor([0.75, 0.25, 0.0]))
    z = torch.randn(7, 9)
    s = sparsemax(z)
    torch.testing.assert_close(s.sum(-1), torch.ones(7))
    assert (s >= 0).all()


def test_word_weights_gate_off_is_uniform_and_floor_bounds_collapse():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    torch.testing.assert_close(word_weights(mask, None, 0.5),
                               torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0], [1.0, 0, 0, 0]]), check_dtype=False)
    gate = torch.tensor([[1.0, 0.0, 0.0, 0.9], [0.3, 0.2, 0.1, 0.0]])  # the gate puts everything on word 0
    omega = word_weights(mask, gate, 0.5)
    torch.testing.assert_close(omega.sum(-1), torch.ones(2))
    assert omega[0, 1] == pytest.approx(0.5 / 3)  # the floor keeps every word in
    assert omega[0, 3] == 0


def test_pool_by_ids_averages_word_pieces():
    features = torch.arange(12.0).view(1, 6, 2)  # tokens 0..5
    ids = torch.tensor([[-1, 0, 0, 1, -1, -1]])
    pooled, mask = pool_by_ids(features, ids)
    torch.testing.assert_close(pooled, torch.tensor([[[3.0, 4.0], [6.0, 7.0]]]))
    assert mask.tolist() == [[True, True]]


def test_global_loss_equals_clip_formula():
    g = torch.Generator().manual_seed(1)
    v = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    scale = torch.tensor(math.exp(2.0))
    logits = scale * v @ t.T
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    torch.testing.assert_close(global_contrastive_loss(v, t, scale), expected)


