"""The evaluation protocols against cases whose answer is known: an oracle heat map through the whole grounding
pipeline (processor, grid, mapping back to original pixels, metrics), separable embeddings for zero-shot, identity
similarities for retrieval."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from plan_hf.metrics import aggregate_by_category, retrieval_metrics
from plan_hf.evaluation.grounding import (
    GroundingItem,
    HeatmapMethod,
    box_area_fraction,
    choose_examples,
    evaluate_grounding,
    macro_mean,
)
from plan_hf.evaluation.retrieval import class_retrieval_evaluation, first_positive_ranks, retrieval_evaluation
from plan_hf.evaluation.runner import to_json
from plan_hf.evaluation.zero_shot import (
    binary_probabilities,
    binary_set_evaluation,
    multiclass_evaluation,
    zero_shot_multiclass,
)
from plan_hf.prompts import POSITIVE_DESCRIPTIONS, class_prompts, prompt_sets


# --------------------------------------------------------------------------------------------------------------------
# Grounding: an oracle through the whole pipeline
# --------------------------------------------------------------------------------------------------------------------
class BrightnessOracle(nn.Module):
    """A 'model' whose grounding map is the input's brightness pooled to a grid: on images that are bright exactly
    inside the phrase's boxes, that is the ground truth seen through the processor (resize + pad) and a coarse grid.
    `flip=True` mirrors the map left-right: a wrong answer the metrics must catch."""

    def __init__(self, pool: int = 4, flip: bool = False):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.pool, self.flip = pool, flip

    def get_grounding_maps(self, input_ids, attention_mask, pixel_values, **kwargs):
        brightness = nn.functional.avg_pool2d(pixel_values[:, :1] + 1.0, self.pool)[:, 0]  # padding (-1) -> 0
        if self.flip:
            brightness = brightness.flip(-1)
        return type("Out", (), {"heatmaps": brightness / brightness.sum(dim=(1, 2), keepdim=True)})


def _bright_box_image(height: int, width: int, box: list[float]) -> np.ndarray:
    image = np.full((height, width), 50, dtype=np.uint8)
    x, y, w, h = (int(v) for v in box)
    image[y:y + h, x:x + w] = 230
    return image


@pytest.fixture
def oracle_items() -> list[GroundingItem]:
    # Tall and wide images (padding on different sides), boxes near the edges where a wrong un-padding would miss.
    cases = [((96, 64), [36, 8, 26, 30], "Pneumothorax"), ((64, 100), [4, 30, 30, 30], "Pleural Effusion"),
             ((120, 80), [10, 70, 30, 40], "Consolidation"), ((70, 70), [40, 36, 28, 30], "Consolidation")]
    return [GroundingItem(image=_bright_box_image(h, w, box), phrase="finding", boxes=[box], category=category,
                          image_id=str(i)) for i, ((h, w), box, category) in enumerate(cases)]


def _oracle_functions(model):
    from plan_hf.grounding import ground_phrases

    return {HeatmapMethod.LOCAL: lambda m, p, images, phrases, b: ground_phrases(m, p, images, phrases, b)}


def test_oracle_heatmap_scores_perfectly_through_the_pipeline(processor, oracle_items):
    oracle = BrightnessOracle()
    result = evaluate_grounding(oracle, processor, oracle_items, methods=["local"], n_boot=50, progress=False,
                                heatmap_functions=_oracle_functions(oracle))
    summary = result.metrics["local"]
    assert summary["macro"]["pointing"] == 1.0
    assert summary["macro"]["cnr"] > 2.0
    assert summary["macro"]["miou"] > 0.5
    assert summary["count"] == 4 and set(summary["per_category"]) == {"Pneumothorax", "Pleural Effusion",
                                                                         "Consolidation"}
    for item, record in zip(oracle_items, result.records["local"]):
        assert record["chance_pointing"] == pytest.approx(box_area_fraction(item.boxes, *item.image.shape))
    # the kept heat maps are over the original pixels
    for index, heatmap in result.heatmaps["local"].items():
        assert heatmap.shape == oracle_items[index].image.shape


def test_mirrored_heatmap_misses(processor, oracle_items):
    oracle = BrightnessOracle(flip=True)
    result = evaluate_grounding(oracle, processor, oracle_items, methods=["local"], n_boot=20, progress=False,
                                heatmap_functions=_oracle_functions(oracle))
    assert result.metrics["local"]["macro"]["pointing"] == 0.0


def test_macro_mean_matches_aggregate_by_category():
    rng = np.random.default_rng(0)
    categories = rng.choice(["a", "b", "c"], size=40)
    values = rng.normal(size=40)
    values[[3, 7]] = np.nan
    records = [{"category": c, "cnr": v} for c, v in zip(categories, values)]
    ids = np.array([sorted(set(categories)).index(c) for c in categories])
    expected = aggregate_by_category(records, keys=("cnr",))["macro"]["cnr"]
    assert macro_mean(values, ids) == pytest.approx(expected)


def test_examples_cover_every_category_first():
    items = [GroundingItem(None, "p", [], category) for category in ["a"] * 10 + ["b"] * 2 + ["c"]]
    chosen = choose_examples(items, count=5, seed=1)
    assert len(chosen) == len(set(chosen)) == 5
    assert {items[i].category for i in chosen[:3]} == {"a", "b", "c"}
    assert choose_examples(items, count=5, seed=1) == chosen


# --------------------------------------------------------------------------------------------------------------------
# Zero-shot
# --------------------------------------------------------------------------------------------------------------------
CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
KEYWORDS = ["atelectasis", "cardiomegaly", "consolidation", "edema", "effusion"]


class KeywordTextModel(nn.Module):
    """Text embedding = which class keywords a prompt contains (plus a small constant); images are given."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.keyword_ids = torch.tensor([tokenizer.convert_tokens_to_ids(k) for k in KEYWORDS])

    def get_text_features(self, input_ids, attention_mask=None, **kwargs):
        hits = (input_ids[:, :, None] == self.keyword_ids).any(dim=1).float()  # (B, C)
        return hits + 1e-3


def test_zero_shot_multiclass_with_separable_embeddings(tmp_path):
    from plan_hf.tiny import build_tokenizer

    prompts = prompt_sets(CLASSES)
    tokenizer = build_tokenizer([s for p in prompts.values() for s in p.positive + p.negative])
    processor = type("P", (), {"tokenizer": tokenizer, "max_length": 64})()
    labels = np.repeat(np.arange(5), 4)
    image_embeds = np.eye(5, dtype=np.float32)[labels]  # each image is exactly its class's direction
    result = zero_shot_multiclass(KeywordTextModel(tokenizer), processor, [None] * len(labels), labels, prompts,
                                  n_boot=50, image_embeds=image_embeds, progress=False)
    assert result.metrics["accuracy"] == 1.0
    assert result.metrics["macro_auc"] == 1.0
    assert result.metrics["ci"]["macro_auc"] == {"low": 1.0, "high": 1.0}
    assert result.metrics["class_counts"] == {name: 4 for name in CLASSES}
    np.testing.assert_allclose(result.scores.sum(axis=1), 1.0, rtol=1e-6)


def test_binary_probabilities_is_softmax_over_positive_and_negative():
    image = np.array([[1.0, 0.0], [0.0, 1.0]])
    positive, negative = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    p = binary_probabilities(image, positive, negative, scale=2.0)
    np.testing.assert_allclose(p[:, 0], [1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0))])


def test_binary_evaluation_separable_and_uncertain_left_out():
    labels = np.array([[1, 0], [1, 1], [0, np.nan], [0, 0], [1, 1], [0, 0]], dtype=float)
    scores = np.array([[0.9, 0.1], [0.8, 0.9], [0.2, 0.99], [0.1, 0.2], [0.7, 0.8], [0.3, 0.3]])
    result = binary_set_evaluation(labels, scores, ["a", "b"], n_boot=30)
    for name in ("a", "b"):
        finding = result["findings"][name]
        assert finding["auc"] == 1.0 and finding["f1_max"] == 1.0 and finding["accuracy"] == 1.0
    assert result["findings"]["b"]["num_positive"] + result["findings"]["b"]["num_negative"] == 5
    assert result["macro"]["auc"] == 1.0


def test_multiclass_auc_ranks_softmax_probabilities():
    # The raw logit of class 0 ranks image 1 above image 0; its softmax probability does not.
    logits = np.array([[2.0, 0.0, 0.0], [3.0, 3.5, 0.0], [0.0, 0.0, 1.0]])
    result = multiclass_evaluation(np.array([0, 1, 2]), logits, ["a", "b", "c"], n_boot=10)
    assert result["per_class"]["a"]["auc"] == 1.0


def test_prompt_sets_are_well_formed():
    for name in POSITIVE_DESCRIPTIONS:
        prompts = class_prompts(name)
        assert len(prompts.positive) >= 10 and len(prompts.negative) >= 4
        assert len(set(prompts.positive)) == len(prompts.positive)
        assert not set(prompts.positive) & set(prompts.negative)
        assert all(s[0].isupper() and s.endswith(".") for s in prompts.positive + prompts.negative)
    with pytest.raises(ValueError, match="no prompt descriptions"):
        class_prompts("Fracture")


# --------------------------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------------------------
def test_identity_similarity_is_perfect_retrieval():
    metrics = retrieval_evaluation(np.eye(12), n_boot=20)
    for direction in ("i2t", "t2i"):
        assert metrics[f"{direction}_recall@1"] == 1.0
        assert metrics[f"{direction}_median_rank"] == 1.0
        assert metrics["ci"][f"{direction}_recall@1"] == {"low": 1.0, "high": 1.0}


def test_ranks_agree_with_retrieval_metrics_under_ties():
    rng = np.random.default_rng(0)
    similarity = rng.integers(0, 4, size=(30, 30)).astype(float)  # many ties
    positives = np.eye(30, dtype=bool)
    expected = retrieval_metrics(similarity, positives)
    metrics = retrieval_evaluation(similarity, positives, n_boot=10)
    for key, value in expected.items():
        assert metrics[key] == value
    ranks = first_positive_ranks(similarity, positives)
    assert np.mean(ranks <= 5) == expected["i2t_recall@5"]


def test_class_retrieval_of_class_prototypes():
    image_labels = np.repeat(np.arange(3), 5)
    text_labels = np.repeat(np.arange(3), 4)
    similarity = (image_labels[:, None] == text_labels[None, :]).astype(float) + 0.01 * np.arange(12)
    metrics = class_retrieval_evaluation(similarity, image_labels, text_labels, n_boot=10)
    assert metrics["i2t_precision@1"] == 1.0 and metrics["t2i_precision@5"] == 1.0
    assert metrics["i2t_precision@10"] == pytest.approx(0.4)  # 4 same-class texts in the top 10


def test_to_json_writes_strict_json():
    value = to_json({"a": float("nan"), "b": float("inf"), "c": np.float32(0.5), "d": np.arange(2)})
    assert value == {"a": None, "b": "inf", "c": 0.5, "d": [0, 1]}
    json.dumps(value, allow_nan=False)


def test_same_image_correlation_flags_phrase_blind_maps():
    from plan_hf.evaluation.grounding import same_image_correlation

    rng = np.random.default_rng(0)
    saliency = rng.random((24, 24))
    blind = same_image_correlation([saliency, saliency * 2 + 1, rng.random((24, 24))], ["a", "a", "b"])
    assert blind == pytest.approx(1.0)
    specific = same_image_correlation([saliency, 1 - saliency], ["a", "a"])
    assert specific == pytest.approx(-1.0)
    assert math.isnan(same_image_correlation([saliency, saliency], ["a", ""]))


def test_grid_oracle_ceiling_grows_with_resolution(image_processor, oracle_items):
    from plan_hf.evaluation.grounding import grid_oracle_maps, score_heatmap

    images = [item.image for item in oracle_items]
    small = [dict(item.__dict__, boxes=[[b[0] + 4, b[1] + 4, 6, 6] for b in item.boxes]) for item in oracle_items]
    pointing = {}
    for grid in (2, 16):
        maps = grid_oracle_maps(image_processor, images, [item["boxes"] for item in small], grid)
        assert all(m.shape == image.shape for m, image in zip(maps, images))
        pointing[grid] = np.mean([score_heatmap(m, item["boxes"])["pointing"] for m, item in zip(maps, small)])
    assert pointing[16] == 1.0 and pointing[2] < 0.5


def test_padding_mass_of_a_map_that_avoids_padding(processor, oracle_items):
    from benchmarks.bench_quality import padding_mass

    on_padding, padding_area = padding_mass(BrightnessOracle(), processor, [i.image for i in oracle_items],
                                            [i.phrase for i in oracle_items])
    assert padding_area > 0.1  # the tall and wide images are padded
    assert on_padding < 0.05  # black padding has no brightness: (almost) none of the oracle's mass
