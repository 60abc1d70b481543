"""PLACE: pathology-level alignment (VPOE, T-PORs, PCMA), correlation exploration, the presets; against readable
references, across 2 processes, through gradient accumulation and save / reload."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from plan_hf import PlanConfig, PlanModel
from plan_hf.losses_plan import (
    correlation_prediction_loss,
    correlation_target,
    pcma_contrastive_loss,
    pcma_match_scores,
    sample_patch_mask,
)
from plan_hf.modeling_plan import PlanFeatures
from plan_hf.presets import PRESETS, config_from_preset, objective_keys, objectives_of
from plan_hf.tiny import tiny_plan_config, tiny_text_config, tiny_vision_config

from tests.conftest import REPORTS, synthetic_xray

PLACE_ONLY = dict(local_loss_weight=0.0, pcma_loss_weight=1.0, correlation_loss_weight=1.0)


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "word_ids", "sentence_ids")}


def unit(*shape, generator, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# PCMA: a plain loop reference written from METHOD.md §4
# ---------------------------------------------------------------------------------------------------------------------
def ref_pcma_scores(sentences, sentence_mask, observations, temperature):
    """score[i][j] = mean over report i's valid sentences of cos(T_s, o_s^(i->j)), one (i, j, s) at a time."""
    scores = torch.zeros(sentences.shape[0], observations.shape[0], dtype=sentences.dtype)
    for i in range(sentences.shape[0]):
        for j in range(observations.shape[0]):
            cosines = []
            for s in range(sentences.shape[1]):
                if not sentence_mask[i, s]:
                    continue
                attention = torch.softmax(observations[j] @ sentences[i, s] / temperature, dim=0)  # (K,)
                matched = attention @ observations[j]  # o_s^(i->j), (d,)
                cosines.append(F.cosine_similarity(sentences[i, s], matched, dim=0))
            if cosines:
                scores[i, j] = torch.stack(cosines).mean()
    return scores


def ref_pcma_loss(sentences, sentence_mask, observations, temperature):
    logits = ref_pcma_scores(sentences, sentence_mask, observations, temperature) / temperature  # (reports, images)
    labels = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def random_pcma_problem(batch=4, sentences=3, queries=5, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    t_pors = unit(batch, sentences, dim, generator=g)
    v_pors = unit(batch, queries, dim, generator=g)
    mask = torch.ones(batch, sentences, dtype=torch.bool)
    mask[0, 1:] = False  # one sentence
    mask[2, 2] = False  # two
    mask[3] = False  # an empty report: scores 0 everywhere
    return t_pors, mask, v_pors


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_pcma_vectorised_equals_loop_reference(chunk_size):
    t_pors, mask, v_pors = random_pcma_problem()
    scores = pcma_match_scores(t_pors, mask, v_pors, temperature=0.2, chunk_size=chunk_size)
    expected = ref_pcma_scores(t_pors, mask, v_pors, temperature=0.2)
    torch.testing.assert_close(scores, expected)
    assert (scores[3] == 0).all()
    loss = pcma_contrastive_loss(v_pors, t_pors, mask, temperature=0.2, chunk_size=chunk_size)
    torch.testing.assert_close(loss, ref_pcma_loss(t_pors, mask, v_pors, temperature=0.2))


def test_padded_sentence_slots_do_not_change_pcma():
    t_pors, mask, v_pors = random_pcma_problem()
    garbage = unit(4, 2, 6, generator=torch.Generator().manual_seed(5))
    padded = torch.cat([t_pors, garbage], dim=1)  # two extra slots with arbitrary content
    padded_mask = torch.cat([mask, torch.zeros(4, 2, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(pcma_contrastive_loss(v_pors, padded, padded_mask, 0.1),
                               pcma_contrastive_loss(v_pors, t_pors, mask, 0.1))


def test_padded_sentence_slot_in_features_does_not_change_model_loss(make_model, batch):
    model = make_model(local_loss_weight=0.0, pcma_loss_weight=1.0)
    with torch.no_grad():
        features = model.encode(**model_inputs(batch))
        before = model.loss_from_features(features).loss_pcma
        features.sentences = torch.cat([features.sentences, torch.randn(4, 1, 16)], dim=1)
        features.sentence_mask = F.pad(features.sentence_mask, (0, 1), value=False)
        after = model.loss_from_features(features).loss_pcma
    torch.testing.assert_close(after, before)


def test_pcma_gradients_reach_queries_and_both_towers(make_model, batch):
    model = make_model(local_loss_weight=0.0, pcma_loss_weight=1.0).train()
    assert model.correlation_predictor is None
    out = model(**model_inputs(batch))
    assert out.pathology_observations.shape == (4, model.config.pcma_num_queries, 16)
    torch.testing.assert_close(out.pathology_observations.norm(dim=-1), torch.ones(4, 16))
    torch.testing.assert_close(out.loss, out.loss_global + out.loss_pcma)
    out.loss_pcma.backward()
    assert model.pathology_extractor.queries.grad.abs().sum() > 0
    for tower in (model.text_model, model.vision_model):
        grads = [p.grad for p in tower.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0
    assert model.text_projection.weight.grad is None  # PCMA alone uses the local projections, not the global ones


def test_reports_without_sentence_ids_are_one_sentence(make_model, batch):
    model = make_model(local_loss_weight=0.0, pcma_loss_weight=1.0)
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "sentence_ids"}
    features = model.encode(**inputs)
    assert features.sentences.shape[1] == 1 and features.sentence_mask.all()
    assert torch.isfinite(model.loss_from_features(features).loss_pcma)


# ---------------------------------------------------------------------------------------------------------------------
# PCMA across 2 processes (gloo) = one process on the concatenated batch; ranks hold different sentence counts
# ---------------------------------------------------------------------------------------------------------------------
WORLD, BATCH, MAX_SENTENCES, QUERIES = 2, 3, 3, 4


def make_pcma_problem():
    g = torch.Generator().manual_seed(0)
    image_encoder, text_encoder = torch.nn.Linear(6, 5), torch.nn.Linear(7, 5)
    with torch.no_grad():
        for p in list(image_encoder.parameters()) + list(text_encoder.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    images = torch.randn(WORLD * BATCH, QUERIES, 6, generator=g)
    texts = torch.randn(WORLD * BATCH, MAX_SENTENCES, 7, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0],  # rank 0: at most 2 sentences
                         [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)  # rank 1: up to 3
    return image_encoder, text_encoder, images, texts, mask


def pcma_loss_and_grads(image_encoder, text_encoder, images, texts, mask):
    observations = F.normalize(image_encoder(images), dim=-1)  # (B, K, 5)
    sentences = F.normalize(text_encoder(texts), dim=-1)  # (B, S, 5)
    loss = pcma_contrastive_loss(observations, sentences, mask, temperature=0.3, chunk_size=2)
    params = list(image_encoder.parameters()) + list(text_encoder.parameters())
    return loss, torch.autograd.grad(loss, params)


def _pcma_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    image_encoder, text_encoder, images, texts, mask = make_pcma_problem()
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    width = int(mask[rows].sum(dim=1).max())  # this rank's own sentence axis: 2 on rank 0, 3 on rank 1
    loss, grads = pcma_loss_and_grads(image_encoder, text_encoder, images[rows], texts[rows, :width],
                                      mask[rows, :width])
    for grad in grads:  # DDP's gradient averaging
        dist.all_reduce(grad)
        grad /= WORLD
    dist.all_reduce(loss := loss.detach().clone())
    if rank == 0:
        torch.save({"loss": loss / WORLD, "grads": grads}, os.path.join(out_dir, "pcma.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_pcma_equals_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_pcma_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        distributed = torch.load(os.path.join(tmp, "pcma.pt"))
    loss, grads = pcma_loss_and_grads(*make_pcma_problem())
    torch.testing.assert_close(distributed["loss"], loss.detach())
    for expected, got in zip(grads, distributed["grads"], strict=True):
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Correlation exploration
# ---------------------------------------------------------------------------------------------------------------------
def test_correlation_loss_zero_iff_prediction_equals_target_and_golden_kl():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 5, generator=g) * 2 - 1
    for loss_type in ("kl", "mse"):
        assert correlation_prediction_loss(target, target, loss_type, 0.1).abs() < 1e-6
        assert correlation_prediction_loss(target + 0.3 * torch.randn(2, 3, 5, generator=g), target, loss_type) > 1e-3
    # By hand, tau = 1: target row (1, 0) -> q = (e, 1) / (e + 1); prediction (0, 0) -> p = (1/2, 1/2).
    q = torch.tensor([math.e, 1.0]) / (math.e + 1)
    expected = float((q * (q / 0.5).log()).sum())  # KL(q || p): the target is the teacher
    got = correlation_prediction_loss(torch.zeros(1, 1, 2), torch.tensor([[[1.0, 0.0]]]), "kl", temperature=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert correlation_prediction_loss(torch.zeros(1, 1, 2), torch.tensor([[[1.0, 0.0]]]), "mse").item() == 0.5


def test_patch_mask_fraction_disjointness_and_seeding():
    torch.manual_seed(3)
    masked, visible = sample_patch_mask(5, 64, 0.25)
    assert masked.shape == (5, 16) and visible.shape == (5, 48)
    everything = torch.cat([masked, visible], dim=1).sort(dim=1).values
    assert (everything == torch.arange(64)).all()  # disjoint and complete
    assert not (masked == masked[0]).all()  # a fresh mask per image
    torch.manual_seed(3)
    again, _ = sample_patch_mask(5, 64, 0.25)
    assert torch.equal(again, masked)
    assert sample_patch_mask(2, 4, 0.99)[0].shape == (2, 3)  # at least one patch stays visible
    with pytest.raises(ValueError, match="at least 2 patches"):
        sample_patch_mask(2, 1, 0.5)


def test_correlation_gradient_flows_through_visible_patches_only(tokenizer, batch):
    torch.manual_seed(0)
    config = tiny_plan_config(vocab_size=len(tokenizer), vision="vit", local_loss_weight=0.0,
                              correlation_loss_weight=1.0, correlation_mask_ratio=0.25)
    model = PlanModel(config).eval()
    model.correlation_predictor.train()  # the training-time mask: from the global RNG
    assert model.pathology_extractor is None and model.local_alignment.word_gate is None
    features = model.encode(**model_inputs(batch))
    features.pixels.retain_grad()
    rng = torch.get_rng_state()
    out = model.loss_from_features(features)
    torch.set_rng_state(rng)  # the same draw as the loss's: which patches it masked
    masked_index, _ = sample_patch_mask(4, 64, 0.25)
    masked = torch.zeros(4, 64, dtype=torch.bool).scatter_(1, masked_index, True)
    assert (masked.sum(dim=1) == 16).all()  # 25% of the 8x8 grid
    out.loss_corr.backward()
    grad = features.pixels.grad  # (B, N, d)
    assert (grad[masked] == 0).all()  # masked patches enter only through the (stopped) target
    assert (grad[~masked].norm(dim=-1) > 0).all()  # every visible patch is trained
    assert sum(p.grad.abs().sum() for p in model.vision_model.parameters() if p.grad is not None) > 0
    assert model.correlation_predictor.mask_token.grad.abs().sum() > 0
    assert model.correlation_predictor.null_word.grad.abs().sum() > 0
    target = correlation_target(features.pixels, torch.tensor([[0, 1]] * 4), torch.tensor([[2]] * 4))
    assert not target.requires_grad and target.grad_fn is None


def test_correlation_prediction_is_conditioned_on_the_report(make_model):
    model = make_model(correlation_loss_weight=1.0)
    g = torch.Generator().manual_seed(0)
    pixels = F.normalize(torch.randn(2, 9, 16, generator=g), dim=-1)
    masked, visible = torch.tensor([[0, 4, 8]] * 2), torch.tensor([[1, 2, 3, 5, 6, 7]] * 2)
    word_mask = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        a = model.correlation_predictor(pixels, (3, 3), F.normalize(torch.randn(2, 3, 16, generator=g), dim=-1),
                                        word_mask, masked, visible)
        b = model.correlation_predictor(pixels, (3, 3), F.normalize(torch.randn(2, 3, 16, generator=g), dim=-1),
                                        word_mask, masked, visible)
        no_words = model.correlation_predictor(pixels, (3, 3), torch.zeros(2, 3, 16), ~word_mask, masked, visible)
    assert a.shape == (2, 3, 6) and not torch.allclose(a, b)
    assert torch.isfinite(no_words).all()  # the null word keeps empty reports defined


def test_correlation_loss_is_seeded_by_the_global_rng_in_training_and_fixed_in_eval(make_model, batch):
    model = make_model(local_loss_weight=0.0, correlation_loss_weight=1.0, correlation_loss_type="mse")
    with torch.no_grad():
        features = model.encode(**model_inputs(batch))

        def losses(seeds):
            out = []
            for seed in seeds:
                torch.manual_seed(seed)
                out.append(model.loss_from_features(features).loss_corr)
            return out

        model.correlation_predictor.train()
        training = losses((1, 1, 2))
        model.correlation_predictor.eval()
        evaluation = losses((1, 2))
    torch.testing.assert_close(training[0], training[1], rtol=0, atol=0)
    assert not torch.equal(training[0], training[2])  # another seed, another mask
    torch.testing.assert_close(evaluation[0], evaluation[1], rtol=0, atol=0)  # eval: one mask whatever the RNG


# ---------------------------------------------------------------------------------------------------------------------
# The model: total loss, accumulation from cached features, unused parameters, save / reload
# ---------------------------------------------------------------------------------------------------------------------
def test_total_loss_is_the_weighted_sum(make_model, batch):
    model = make_model(pcma_loss_weight=0.7, correlation_loss_weight=0.4, local_cross_sample=False, local_within_pair=True)
    out = model(**model_inputs(batch))
    torch.testing.assert_close(out.loss, out.loss_global + out.loss_local + 0.7 * out.loss_pcma + 0.4 * out.loss_corr)


def test_losses_from_concatenated_micro_batches_equal_the_full_batch(make_model, processor):
    """Micro-batches tokenised apart have different word and sentence counts: concatenate must pad and mask them."""
    model = make_model(**PLACE_ONLY)
    images = [synthetic_xray(i) for i in range(4)]
    reports = [REPORTS[1], "Lungs are clear. Heart size is normal. No effusion.", REPORTS[2], REPORTS[5]]
    full = processor(text=reports, images=images, return_tensors="pt")
    parts = [processor(text=reports[a:b], images=images[a:b], return_tensors="pt") for a, b in ((0, 2), (2, 4))]
    with torch.no_grad():
        part_features = [model.encode(**model_inputs(p)) for p in parts]
        assert part_features[0].sentences.shape[1] != part_features[1].sentences.shape[1]
        merged = PlanFeatures.concatenate(part_features)
        torch.manual_seed(0)
        accumulated = model.loss_from_features(merged)
        torch.manual_seed(0)
        direct = model(**model_inputs(full))
    for field in ("loss", "loss_pcma", "loss_corr"):
        torch.testing.assert_close(getattr(accumulated, field), getattr(direct, field), msg=field)


@pytest.mark.parametrize("preset", ["plan", "plan_within_pair", "place", "plan+place"])
def test_presets_train_every_parameter_they_build(tokenizer, batch, preset):
    """DDP without find_unused_parameters needs every trainable parameter to get a gradient."""
    torch.manual_seed(0)
    config = config_from_preset(preset, text_config=tiny_text_config(len(tokenizer)),
                                vision_config=tiny_vision_config("resnet"), projection_dim=16)
    model = PlanModel(config).train()
    assert (model.pathology_extractor is not None) == (PRESETS[preset]["pcma_loss_weight"] > 0)
    assert (model.correlation_predictor is not None) == (PRESETS[preset]["correlation_loss_weight"] > 0)
    model(**model_inputs(batch)).loss.backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_save_and_reload_reproduces_place_outputs(make_model, batch, tmp_path):
    model = make_model(pcma_loss_weight=1.0, correlation_loss_weight=0.5)
    model.save_pretrained(tmp_path)
    reloaded = PlanModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.pcma_num_queries == model.config.pcma_num_queries
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(**model_inputs(batch))
        torch.manual_seed(0)
        b = reloaded(**model_inputs(batch))
    for field in ("loss", "loss_pcma", "loss_corr", "pathology_observations"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=0, atol=0, msg=field)


@pytest.mark.parametrize("field,value,extra", [
    ("pcma_decoder_heads", 3, {"pcma_loss_weight": 1.0, "projection_dim": 16}),
    ("correlation_predictor_heads", 5, {"correlation_loss_weight": 1.0, "projection_dim": 16}),
    ("correlation_predictor_layers", 0, {}),
])
def test_bad_place_config_values_name_the_field(field, value, extra):
    with pytest.raises(ValueError, match=field):
        PlanConfig(**{field: value, **extra})
    if extra:  # heads only have to divide the local dimension when their module is built
        PlanConfig(**{field: value, "projection_dim": 16})


# ---------------------------------------------------------------------------------------------------------------------
# Presets and objectives_of
# ---------------------------------------------------------------------------------------------------------------------
def test_presets_build_valid_configs_and_name_their_objectives():
    expected = {"global": ["global"], "plan": ["global", "plan_local"], "place": ["global", "pcma", "correlation"],
                "plan+place": ["global", "plan_local", "pcma", "correlation"], "gloria": ["global", "plan_local"],
                "mgca": ["global", "plan_local"], "plan_within_pair": ["global", "plan_local"]}
    assert set(PRESETS) == set(expected)
    for name, keys in expected.items():
        config = config_from_preset(name)
        assert isinstance(config, PlanConfig)
        assert objective_keys(config) == keys
        assert PlanConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert config_from_preset("plan", local_loss_weight=2.0).local_loss_weight == 2.0
    with pytest.raises(ValueError, match="unknown preset"):
        config_from_preset("clip")


def test_objectives_of_describes_the_local_switches():
    plan = objectives_of(PlanConfig(local_num_stages=2, local_region_sparsify="sparsemax", local_word_gate=False,
                                    local_cross_sample=False, local_within_pair=True, local_pixel_update=True))
    assert plan[0] == "global: image-report InfoNCE, weight 1"
    local = plan[1]
    for phrase in ("2 progressive stages", "sparsemax", "uniform word weights", "no cross-sample term",
                   "text-aware pixel update"):
        assert phrase in local
    default = objectives_of(config_from_preset("plan+place"))[1:]
    assert "top-mass pixel sparsification (keep 0.5, x0.8 per stage)" in default[0]
    assert "diagnostic word gate" in default[0] and "cross-sample term" in default[0]
    assert default[1] == "pcma: PLACE pathology-level alignment, 16 pathology queries, 2-layer extractor, weight 1"
    assert default[2] == "correlation: PLACE correlation exploration, 50% of patches masked, KL loss, weight 0.5"
    assert objective_keys(PlanConfig(global_loss_weight=0.0, local_loss_weight=0.0, pcma_loss_weight=1.0)) == ["pcma"]


def test_plan_has_no_within_pair_term_and_its_ablation_preset_only_adds_it():
    within, plan = config_from_preset("plan_within_pair"), config_from_preset("plan")
    assert within.local_within_pair and not plan.local_within_pair and plan.local_cross_sample
    assert "no within-pair term" in objectives_of(plan)[1]
    assert "no within-pair term" not in objectives_of(within)[1]
    differing = {k for k, v in within.to_dict().items() if plan.to_dict()[k] != v}
    assert differing == {"local_within_pair"}
