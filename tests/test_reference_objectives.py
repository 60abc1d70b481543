"""The reference local objectives (GLoRIA, MGCA's token level) against plain per-sample references written from their
descriptions, values and gradients; hand-checked small cases; GLoRIA over 2 processes equals 1 process."""

import math

import pytest
import torch
import torch.nn.functional as F

from plan_hf.losses_plan import (
    gloria_local_loss,
    gloria_word_attention,
    mgca_token_loss,
    mgca_word_attention,
    mgca_word_weights,
)
from tests.multiprocess import averaged_over_processes, seeded_linears

EXACT = dict(rtol=1e-6, atol=1e-10)
pytestmark = pytest.mark.usefixtures("float64")


def make_batch(seed, batch=5, words=4, pixels=6, dim=8, normalise=True, empty_report=None):
    """Words and pixels with per-report word counts and per-image pixel masks; the padded entries hold random
    values, so any leak of padding into a result shows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, words, dim, generator=g)
    p = torch.randn(batch, pixels, dim, generator=g)
    if normalise:
        w, p = F.normalize(w, dim=-1), F.normalize(p, dim=-1)
    counts = torch.tensor([words - (i % words) for i in range(batch)])  # words, words-1, ..., 1, words, ...
    word_mask = torch.arange(words).unsqueeze(0) < counts.unsqueeze(1)
    if empty_report is not None:
        word_mask[empty_report] = False
    pixel_mask = torch.rand(batch, pixels, generator=g) < 0.7
    pixel_mask[:, 0] = True  # every image keeps at least one cell
    return w.requires_grad_(), word_mask, p.requires_grad_(), pixel_mask


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def assert_same(loss, expected, inputs):
    torch.testing.assert_close(loss, expected, **EXACT)
    for got, want in zip(grads(loss, *inputs), grads(expected, *inputs)):
        torch.testing.assert_close(got, want, **EXACT)


# ---------------------------------------------------------------------------------------------------------------------
# GLoRIA, written per (report, image) pair as its paper and code describe it
# ---------------------------------------------------------------------------------------------------------------------
def ref_gloria_attention(w, p, temp1=4.0):
    """w (M, d): one report's valid words; p (N, d): one image's valid regions -> (M, N)."""
    similarity = w @ p.t()
    over_words = torch.softmax(similarity, dim=0)  # for each region, over the words
    return torch.softmax(temp1 * over_words, dim=1)  # for each word, over the regions


def ref_gloria_score(w, p, temp1=4.0, temp2=5.0):
    if w.shape[0] == 0:
        return torch.zeros(())
    attention = ref_gloria_attention(w, p, temp1)
    total = 0.0
    for m in range(w.shape[0]):
        context = attention[m] @ p
        cosine = (w[m] @ context) / (w[m].norm() * context.norm()).clamp(min=1e-8)
        total = total + torch.exp(temp2 * cosine)
    return torch.log(total)


def ref_gloria_loss(words, word_mask, pixels, pixel_mask, temp1=4.0, temp2=5.0, temp3=10.0):
    batch = words.shape[0]
    scores = torch.stack([
        torch.stack([ref_gloria_score(words[i][word_mask[i]], pixels[j][pixel_mask[j]], temp1, temp2)
                     for j in range(batch)])
        for i in range(batch)
    ])  # (reports, images)
    logits = temp3 * scores
    labels = torch.arange(batch)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


@pytest.mark.parametrize("chunk_size, checkpoint, normalise, empty_report", [
    (None, False, True, None),
    (2, False, True, 3),  # chunks of 2 of 5 images; a report without words scores 0 against every image
    (3, True, False, None),  # checkpointed chunks; raw (unnormalised) features, as GLoRIA feeds them
])
def test_gloria_loss_matches_reference(chunk_size, checkpoint, normalise, empty_report):
    words, word_mask, pixels, pixel_mask = make_batch(0, normalise=normalise, empty_report=empty_report)
    loss = gloria_local_loss(words, word_mask, pixels, pixel_mask, chunk_size=chunk_size, checkpoint_chunks=checkpoint)
    expected = ref_gloria_loss(words, word_mask, pixels, pixel_mask)
    assert_same(loss, expected, (words, pixels))


def test_gloria_without_pixel_mask_and_other_temperatures():
    words, word_mask, pixels, _ = make_batch(1)
    loss = gloria_local_loss(words, word_mask, pixels, None, temp_attention=2.0, temp_word=3.0, temp_logits=7.0)
    everything = torch.ones(pixels.shape[:2], dtype=torch.bool)
    expected = ref_gloria_loss(words, word_mask, pixels, everything, temp1=2.0, temp2=3.0, temp3=7.0)
    assert_same(loss, expected, (words, pixels))


def test_gloria_chunking_changes_nothing():
    words, word_mask, pixels, pixel_mask = make_batch(2, batch=7)
    whole = gloria_local_loss(words, word_mask, pixels, pixel_mask)
    assert_same(gloria_local_loss(words, word_mask, pixels, pixel_mask, chunk_size=2), whole, (words, pixels))


def test_gloria_word_attention_matches_reference():
    words, word_mask, pixels, pixel_mask = make_batch(3)
    attention = gloria_word_attention(words, word_mask, pixels, pixel_mask)  # (B, M, N)
    for b in range(words.shape[0]):
        expected = torch.zeros(word_mask.shape[1], pixels.shape[1])
        rows, cols = word_mask[b].nonzero()[:, 0], pixel_mask[b].nonzero()[:, 0]
        expected[rows.unsqueeze(1), cols] = ref_gloria_attention(words[b][word_mask[b]], pixels[b][pixel_mask[b]])
        torch.testing.assert_close(attention[b][word_mask[b]], expected[word_mask[b]], **EXACT)
    assert torch.all(attention.masked_select(~pixel_mask.unsqueeze(1)) == 0)


def test_gloria_one_word_one_region_by_hand():
    """One word per report, one region per image: attention 1, context = p, score = 5 cos, logits = 50 cos."""
    e1, e2 = torch.eye(2)
    words = torch.stack([e1, e2]).unsqueeze(1)  # (2, 1, 2)
    pixels = torch.stack([e1, (e1 + e2) / math.sqrt(2)]).unsqueeze(1)  # (2, 1, 2)
    loss = gloria_local_loss(words, torch.ones(2, 1, dtype=torch.bool), pixels)
    c = 50 / math.sqrt(2)  # 50 cos(w_0, p_1) = 50 cos(w_1, p_1)

    def softplus(x):
        return math.log1p(math.exp(x))

    per_report = 0.5 * (softplus(c - 50) + softplus(-c))  # logits rows [50, c] and [0, c]
    per_image = 0.5 * (softplus(-50) + math.log(2))  # columns [50, 0] and [c, c]
    assert loss.item() == pytest.approx(0.5 * (per_report + per_image), rel=1e-12)


def aligned_toy_batch(seed, batch=4, words=3, extra_pixels=0, dim=16):
    """Report i's words are random unit vectors; image i's cells are exactly those vectors (in another order), then
    `extra_pixels` random cells that no word names."""
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(batch, words, dim, generator=g), dim=-1)
    p = torch.cat([w[:, torch.randperm(words, generator=g)],
                   F.normalize(torch.randn(batch, extra_pixels, dim, generator=g), dim=-1)], dim=1)
    return w, torch.ones(batch, words, dtype=torch.bool), p


def test_aligned_batch_scores_better_than_shuffled():
    words, word_mask, pixels = aligned_toy_batch(4)
    shuffled = pixels[torch.tensor([1, 2, 3, 0])]  # every report paired with another report's image
    assert gloria_local_loss(words, word_mask, pixels) < 1e-6 < 1.0 < gloria_local_loss(words, word_mask, shuffled)
    assert mgca_token_loss(words, word_mask, pixels) < 1e-3 < 1.0 < mgca_token_loss(words, word_mask, shuffled)
    # With cells that no word names, MGCA's word term still prefers the aligned pairs (its patch term need not: the
    # unnamed cells' attended outputs resemble the named ones', uniform patch weights count them all).
    words, word_mask, pixels = aligned_toy_batch(4, extra_pixels=5)
    shuffled = pixels[torch.tensor([1, 2, 3, 0])]
    no_patches = torch.zeros(pixels.shape[:2])
    assert (mgca_token_loss(words, word_mask, pixels, patch_weights=no_patches)
            < mgca_token_loss(words, word_mask, shuffled, patch_weights=no_patches))
    assert gloria_local_loss(words, word_mask, pixels) < gloria_local_loss(words, word_mask, shuffled)


def test_extra_padding_slots_change_nothing():
    """Padded words and padding cells take no part (MGCA's own code lets padded words in as negatives)."""
    words, word_mask, pixels, pixel_mask = make_batch(5)
    padded_words = torch.cat([words, F.normalize(torch.randn(words.shape[0], 2, words.shape[2]), dim=-1)], dim=1)
    padded_mask = torch.cat([word_mask, torch.zeros(words.shape[0], 2, dtype=torch.bool)], dim=1)
    for loss in (gloria_local_loss, mgca_token_loss):
        torch.testing.assert_close(loss(padded_words, padded_mask, pixels, pixel_mask),
                                   loss(words, word_mask, pixels, pixel_mask), **EXACT)


# ---------------------------------------------------------------------------------------------------------------------
# MGCA's token level, written per sample as its paper and code describe it
# ---------------------------------------------------------------------------------------------------------------------
def ref_attended(queries, keys, temperature):
    """Each query's attended output over the keys: normalise(softmax(q.k / tau) k), (Q, d)."""
    return F.normalize(torch.softmax(queries @ keys.t() / temperature, dim=1) @ keys, dim=1)


def ref_within_sample_infonce(anchors, outputs, weights, temperature):
    """Anchor k against the outputs of the sample's anchors (positive: its own), both directions averaged."""
    logits = anchors @ outputs.t() / temperature
    labels = torch.arange(anchors.shape[0])
    per_anchor = 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                        + F.cross_entropy(logits.t(), labels, reduction="none"))
    return (weights * per_anchor).sum()


def ref_mgca_loss(words, word_mask, pixels, pixel_mask, weights=None, temperature=0.1):
    total, counted = 0.0, 0
    for b in range(words.shape[0]):
        w, p = words[b][word_mask[b]], pixels[b][pixel_mask[b]]
        if w.shape[0] == 0:
            continue
        word_weights = torch.full((w.shape[0],), 1.0 / w.shape[0]) if weights is None else weights[b][word_mask[b]]
        patch_weights = torch.full((p.shape[0],), 1.0 / p.shape[0])
        loss_words = ref_within_sample_infonce(w, ref_attended(w, p, temperature), word_weights, temperature)
        loss_patches = ref_within_sample_infonce(p, ref_attended(p, w, temperature), patch_weights, temperature)
        total, counted = total + loss_words + loss_patches, counted + 1
    return total / counted


def random_cls_attentions(seed, batch, heads, length):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(batch, heads, length, length, generator=g), dim=-1)


def word_ids_for(word_mask, length=12):
    """Token -> word ids: [CLS] -1, then each valid word as 1 or 2 pieces, a -1 (stop word) between, padding -1."""
    rows = []
    for mask in word_mask:
        ids = [-1]
        for m in range(int(mask.sum())):
            ids += [m] * (1 + m % 2) + ([-1] if m == 1 else [])
        rows.append(ids + [-1] * (length - len(ids)))
    return torch.tensor(rows)


@pytest.mark.parametrize("with_weights, with_pixel_mask, empty_report", [
    (False, True, None),
    (True, True, 2),  # a report without words drops out of the mean
    (True, False, None),
])
def test_mgca_loss_matches_reference(with_weights, with_pixel_mask, empty_report):
    words, word_mask, pixels, pixel_mask = make_batch(6, empty_report=empty_report)
    weights = None
    if with_weights:
        word_ids = word_ids_for(word_mask)
        weights = mgca_word_weights(random_cls_attentions(7, words.shape[0], 2, word_ids.shape[1]), word_ids,
                                    word_mask)
    loss = mgca_token_loss(words, word_mask, pixels, pixel_mask if with_pixel_mask else None, word_weights=weights)
    expected = ref_mgca_loss(words, word_mask, pixels,
                             pixel_mask if with_pixel_mask else torch.ones(pixels.shape[:2], dtype=torch.bool),
                             weights)
    assert_same(loss, expected, (words, pixels))


def test_mgca_word_attention_matches_reference():
    words, word_mask, pixels, pixel_mask = make_batch(8)
    attention = mgca_word_attention(words, pixels, pixel_mask)  # (B, M, N)
    for b in range(words.shape[0]):
        expected = torch.softmax(words[b] @ pixels[b][pixel_mask[b]].t() / 0.1, dim=1)
        torch.testing.assert_close(attention[b][:, pixel_mask[b]], expected, **EXACT)
    assert torch.all(attention.masked_select(~pixel_mask.unsqueeze(1)) == 0)


def test_mgca_word_weights_clip_a_known_vector():
    """Word weights 1..10: torch.quantile's 10th / 90th percentiles are 1.9 and 9.1; the clipped sum is 55."""
    word_ids = torch.tensor([[-1] + list(range(10)) + [-1, -1]])  # [CLS], ten one-piece words, [SEP], padding
    cls_row = torch.tensor([[0.0] + [float(k) for k in range(1, 11)] + [7.0, 9.0]])  # [SEP] and padding ignored
    attentions = torch.zeros(1, 2, 13, 13)
    attentions[:, :, 0] = cls_row  # both heads: their mean is the row itself
    weights = mgca_word_weights(attentions, word_ids, torch.ones(1, 10, dtype=torch.bool))
    expected = torch.tensor([[1.9] + [float(k) for k in range(2, 10)] + [9.1]]) / 55.0
    torch.testing.assert_close(weights, expected, **EXACT)


def test_mgca_word_weights_match_reference():
    words, word_mask, _, _ = make_batch(9, batch=4, words=5)
    word_mask[3] = False  # a report without words gets no weights
    word_ids = word_ids_for(word_mask)
    attentions = random_cls_attentions(10, 4, 3, word_ids.shape[1])
    weights = mgca_word_weights(attentions, word_ids, word_mask)
    for b in range(4):
        row = attentions[b].mean(dim=0)[0]  # the [CLS] query, averaged over heads
        count = int(word_mask[b].sum())
        expected = torch.zeros(word_mask.shape[1])
        if count:
            summed = torch.stack([row[word_ids[b] == m].sum() for m in range(count)])
            low, high = torch.quantile(summed, torch.tensor([0.1, 0.9]))
            clipped = summed.clamp(low, high)
            expected[:count] = clipped / clipped.sum()
        torch.testing.assert_close(weights[b], expected, **EXACT)
    assert not weights.requires_grad


# ---------------------------------------------------------------------------------------------------------------------
# GLoRIA over 2 processes (gloo) = 1 process on the concatenated batch, values and parameter gradients
# ---------------------------------------------------------------------------------------------------------------------
WORLD, BATCH, WORDS, PIXELS = 2, 3, 4, 5


def make_encoders_and_batch():
    """Two small encoders and WORLD * BATCH pairs, identical in every process. Rank 0's reports have at most 2
    words and rank 1's up to 4: the gathered words are padded differently on each rank."""
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    word_encoder, pixel_encoder = seeded_linears(g, (7, 6), (5, 6))
    tokens = torch.randn(WORLD * BATCH, WORDS, 7, generator=g)
    cells = torch.randn(WORLD * BATCH, PIXELS, 5, generator=g)
    counts = torch.tensor([2, 1, 2, 4, 3, 1])
    word_mask = torch.arange(WORDS).unsqueeze(0) < counts.unsqueeze(1)
    pixel_mask = torch.rand(WORLD * BATCH, PIXELS, generator=g) < 0.7
    pixel_mask[:, 0] = True
    return word_encoder, pixel_encoder, tokens, word_mask, cells, pixel_mask


def gloria_loss_and_grads(word_encoder, pixel_encoder, tokens, word_mask, cells, pixel_mask):
    words = F.normalize(word_encoder(tokens), dim=-1)
    pixels = F.normalize(pixel_encoder(cells), dim=-1)
    loss = gloria_local_loss(words, word_mask, pixels, pixel_mask, chunk_size=2)
    return loss, torch.autograd.grad(loss, list(word_encoder.parameters()) + list(pixel_encoder.parameters()))


def rank_gloria_loss_and_grads(rank, world):
    word_encoder, pixel_encoder, tokens, word_mask, cells, pixel_mask = make_encoders_and_batch()
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    longest = int(word_mask[rows].sum(dim=1).max())  # each rank pads its words only to its own longest report
    return gloria_loss_and_grads(word_encoder, pixel_encoder, tokens[rows, :longest], word_mask[rows, :longest],
                                 cells[rows], pixel_mask[rows])


def test_two_process_gloria_loss_equals_single_process():
    distributed_loss, distributed_grads = averaged_over_processes(rank_gloria_loss_and_grads, WORLD)
    loss, param_grads = gloria_loss_and_grads(*make_encoders_and_batch())
    torch.testing.assert_close(distributed_loss, loss.detach(), **EXACT)
    assert len(param_grads) == len(distributed_grads)
    for expected, got in zip(param_grads, distributed_grads):
        torch.testing.assert_close(got, expected, **EXACT)
