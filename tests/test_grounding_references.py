"""Reference rows of the grounding table (position priors, grid ceiling, supervised ceiling) and the benchmark-version
guard that keeps numbers of different synthetic-set versions apart."""

from __future__ import annotations

import json
import numpy as np
import pytest

from plan_hf.evaluation.grounding import GroundingItem, evaluate_grounding
from plan_hf.evaluation.references import PositionPrior, location_words
from plan_hf.evaluation.runner import metrics_benchmark, require_same_benchmark
from plan_hf.metrics import boxes_to_mask
# A 32-study synthetic set at 64 px and a tiny PlanModel export over it.
from tests.test_eval_run import model_dir, synthetic_dir  # noqa: F401


@pytest.mark.parametrize("phrase, expected", [
    ("Left lower lobe consolidation", ("left", "lower")),
    ("bibasilar atelectasis", ("bilateral", "lower")),
    ("hazy opacity in the lingula", ("left", "middle")),
    ("small right apical pneumothorax", ("right", "upper")),
    ("Moderate bilateral pleural effusions", ("bilateral", "")),
    ("mildly enlarged cardiac silhouette", ("", "")),
])
def test_location_words(phrase, expected):
    assert location_words(phrase) == expected


def _row(category: str, phrase: str, boxes: list[list[float]], width: int = 100, height: int = 200) -> dict:
    return {"category_name": category, "label_text": phrase, "boxes": boxes, "image_width": width,
            "image_height": height}


def test_position_prior_is_the_mean_box_mask_in_relative_coordinates():
    # On a 4 x 4 grid of a 100 x 200 image: the first box is the top-left quarter, the second the bottom-right one.
    prior = PositionPrior.fit([_row("A", "x", [[0, 0, 50, 100]]), _row("A", "y", [[50, 100, 50, 100]]),
                               _row("B", "z", [[0, 0, 100, 200]])], resolution=4)
    expected = np.zeros((4, 4))
    expected[:2, :2] = expected[2:, 2:] = 0.5
    np.testing.assert_allclose(prior.grid_map("A", "anything"), expected)
    np.testing.assert_allclose(prior.grid_map("B", "z"), np.ones((4, 4)))
    np.testing.assert_allclose(prior.grid_map("unseen", "z"), (2 * expected + 1) / 3)  # every phrase's mean
    # Stretched over an image of any size; phrases' own boxes and images are not used.
    item = GroundingItem(image=np.zeros((20, 10), dtype=np.uint8), phrase="q", boxes=[], category="B")
    (stretched,) = prior([item])
    assert stretched.shape == (20, 10) and np.allclose(stretched, 1.0)


def test_position_prior_with_location_words_backs_off_to_the_category():
    rows = [_row("A", "left thing", [[0, 0, 50, 200]]) for _ in range(5)] + [_row("A", "right thing",
                                                                                   [[50, 0, 50, 200]])]
    prior = PositionPrior.fit(rows, use_location_words=True, resolution=2)
    np.testing.assert_allclose(prior.grid_map("A", "left lower thing"), [[1, 0], [1, 0]])  # 5 phrases: own map
    np.testing.assert_allclose(prior.grid_map("A", "right thing"), [[5 / 6, 1 / 6], [5 / 6, 1 / 6]])  # 1: backs off
    category_only = PositionPrior.fit(rows, resolution=2)
    np.testing.assert_allclose(category_only.grid_map("A", "left thing"), [[5 / 6, 1 / 6], [5 / 6, 1 / 6]])


def test_reference_rows_are_scored_like_model_maps():
    rng = np.random.default_rng(0)
    items = [GroundingItem(image=np.zeros((40, 30), dtype=np.uint8), phrase=f"p{i}", category="AB"[i % 2],
                           boxes=[[float(rng.integers(0, 20)), float(rng.integers(0, 30)), 8.0, 6.0]], image_id=str(i))
             for i in range(12)]

    def oracle(batch):
        return [boxes_to_mask(item.boxes, 40, 30).astype(np.float64) for item in batch]

    def inverted(batch):
        return [1.0 - m for m in oracle(batch)]

    result = evaluate_grounding(None, None, items, methods=(), references={"oracle": oracle, "inverted": inverted},
                                n_boot=20, batch_size=5, progress=False)
    assert set(result.metrics) == {"oracle", "inverted"} and len(result.records["oracle"]) == len(items)
    assert result.metrics["oracle"]["macro"]["pointing"] == 1.0 and result.metrics["oracle"]["macro"]["miou"] == 1.0
    assert result.metrics["inverted"]["macro"]["pointing"] == 0.0
    assert result.metrics["oracle"]["chance_pointing"] == pytest.approx(48 / 1200)


def test_numbers_of_different_benchmark_versions_are_refused():
    assert require_same_benchmark({"a": "synthetic-cxr v2", "b": "synthetic-cxr v2"}) == "synthetic-cxr v2"
    with pytest.raises(ValueError, match="different benchmark versions.*run1: synthetic-cxr v1.*data: synthetic-cxr v2"):
        require_same_benchmark({"run1": "synthetic-cxr v1", "data": "synthetic-cxr v2"})
    # metrics.json written before versions were recorded: a synthetic suite was v1, other suites have none.
    assert metrics_benchmark({"suite": "synthetic"}) == "synthetic-cxr v1"
    assert metrics_benchmark({"suite": "ms-cxr"}) is None
    assert metrics_benchmark({"suite": "synthetic", "benchmark": "synthetic-cxr v2"}) == "synthetic-cxr v2"


# --------------------------------------------------------------------------------------------------------------------
# The supervised ceiling, trained for a few steps on a tiny set
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ceiling(tmp_path_factory, synthetic_dir):
    from plan_hf.evaluation.ceiling import score, train_ceiling

    out = tmp_path_factory.mktemp("ceiling")
    trained, training = train_ceiling(synthetic_dir, out, steps=60, image_size=64, batch_size=8, learning_rate=3e-3)
    return out, trained, training, score(trained, synthetic_dir, split="train", n_boot=20)


def test_trained_ceiling_points_at_its_categories_findings(ceiling, synthetic_dir):
    from plan_hf.evaluation.ceiling import score

    out, trained, training, grounding = ceiling
    assert training["steps"] == 60 and training["benchmark"] == "synthetic-cxr v2"
    assert trained.categories == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Lung Opacity",
                                  "Pleural Effusion", "Pneumonia", "Pneumothorax"]
    assert json.loads((out / "model" / "supervised_ceiling.json").read_text())["benchmark"] == "synthetic-cxr v2"
    pointing = grounding["supervised_ceiling"]["macro"]["pointing"]
    assert pointing > 3 * grounding["supervised_ceiling"]["chance_pointing"]
    # Each phrase is read from its own category's channel: the channels of other categories point elsewhere.
    categories = trained.categories
    trained.categories = categories[1:] + categories[:1]
    try:
        shuffled = score(trained, synthetic_dir, split="train", n_boot=20)["supervised_ceiling"]["macro"]["pointing"]
    finally:
        trained.categories = categories
    assert pointing > shuffled + 0.1


def test_eval_run_adds_the_ceiling_row_and_refuses_another_version(ceiling, synthetic_dir, model_dir, tmp_path):
    from eval.run import main

    out = ceiling[0]
    args = ["--model_name_or_path", str(model_dir), "--suite", "ms-cxr", "--data_dir", str(synthetic_dir), "--split",
            "train", "--n_boot", "20", "--no_progress", "--supervised_ceiling", str(out)]
    metrics = main(args + ["--output_dir", str(tmp_path / "eval")])
    assert metrics["benchmark"] == "synthetic-cxr v2"
    rows = metrics["grounding"]
    assert {"local", "global", "position_prior", "grid_ceiling", "supervised_ceiling"} <= set(rows)
    # The same maps and metrics as the ceiling script's own scoring.
    for name in ("supervised_ceiling", "position_prior", "position_prior_words"):
        assert rows[name]["macro"] == pytest.approx(ceiling[3][name]["macro"], nan_ok=True)
    assert "supervised_ceiling" in (tmp_path / "eval" / "report.md").read_text()

    info_path = out / "model" / "supervised_ceiling.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "benchmark": "synthetic-cxr v1"}))
    try:
        with pytest.raises(ValueError, match="different benchmark versions"):
            main(args + ["--output_dir", str(tmp_path / "refused")])
    finally:
        info_path.write_text(json.dumps(info))
