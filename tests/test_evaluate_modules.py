"""The `evaluate` modules under eval/metrics load offline by path and compute what `plan_hf.metrics` computes."""

import math
import os
from pathlib import Path

# Offline before evaluate/huggingface_hub read their configuration: a hub miss would wait instead of failing.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

evaluate = pytest.importorskip("evaluate")

from plan_hf.metrics import aggregate_by_category, cnr, grounding_iou, pointing_game  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def _fixture() -> tuple[list[np.ndarray], list[list[list[float]]], list[str]]:
    """Maps of different sizes, one NaN-padded, one with no box, and categories."""
    rng = np.random.default_rng(0)
    small = rng.random((4, 4))
    padded = np.full((6, 7), np.nan)
    padded[1:5, 2:6] = rng.random((4, 4))
    wide = rng.random((5, 9))
    wide[2, 6] = 5.0  # a clear peak inside the second box
    heatmaps = [small, padded, wide, rng.random((3, 3))]
    boxes = [[[1, 1, 2, 2]], [[3.5, 1.2, 2.0, 2.5]], [[0, 0, 2, 2], [5.5, 1, 2, 3]], []]
    categories = ["Pneumonia", "Pneumonia", "Effusion", "Effusion"]
    return heatmaps, boxes, categories


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cache = tmp_path_factory.mktemp("evaluate_cache")
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # the documented usage: relative paths from the repository root
    try:
        return {
            name: evaluate.load(f"eval/metrics/{name}", cache_dir=str(cache))
            for name in ("grounding_cnr", "grounding_miou", "pointing_game")
        }
    finally:
        os.chdir(cwd)


def test_modules_load_by_path(loaded):
    for name, module in loaded.items():
        assert isinstance(module, evaluate.Metric)
        assert module.name == name
        assert set(module.features) == {"predictions", "references"}


def test_module_loads_by_absolute_path_and_script_path():
    script = REPO_ROOT / "eval" / "metrics" / "pointing_game" / "pointing_game.py"
    assert evaluate.load(str(script.parent)).name == "pointing_game"
    assert evaluate.load(str(script)).name == "pointing_game"


def test_cnr_module_equals_the_function(loaded):
    heatmaps, boxes, categories = _fixture()
    expected = [cnr(h, b) for h, b in zip(heatmaps, boxes)]
    assert math.isnan(expected[3]) and not any(math.isnan(v) for v in expected[:3])
    out = loaded["grounding_cnr"].compute(predictions=heatmaps, references=boxes)
    # float64 features: the arrow round trip keeps values and NaN exactly.
    assert out == {"cnr": float(np.mean(expected[:3])), "num_undefined": 1}

    out = loaded["grounding_cnr"].compute(predictions=heatmaps, references=boxes, categories=categories)
    # Pneumonia: mean of the first two; Effusion: the third only (the fourth is undefined).
    assert out["per_category_cnr"] == {"Effusion": expected[2], "Pneumonia": (expected[0] + expected[1]) / 2}
    assert out["macro_cnr"] == pytest.approx((expected[2] + (expected[0] + expected[1]) / 2) / 2, abs=1e-15)


def test_miou_module_equals_the_function(loaded):
    heatmaps, boxes, categories = _fixture()
    thresholds = (0.2, 0.6)
    per_phrase = [grounding_iou(h, b, thresholds) for h, b in zip(heatmaps, boxes)]
    out = loaded["grounding_miou"].compute(
        predictions=heatmaps, references=boxes, thresholds=thresholds, categories=categories
    )
    records = [
        {"category": c, "miou": np.mean(list(ious.values())), "iou@0.2": ious[0.2], "iou@0.6": ious[0.6]}
        for c, ious in zip(categories, per_phrase)
    ]
    summary = aggregate_by_category(records, keys=("miou", "iou@0.2", "iou@0.6"))
    assert out["miou"] == pytest.approx(summary["micro"]["miou"], abs=1e-15)
    assert out["iou@0.2"] == pytest.approx(summary["micro"]["iou@0.2"], abs=1e-15)
    assert out["iou@0.6"] == pytest.approx(summary["micro"]["iou@0.6"], abs=1e-15)
    assert out["macro_miou"] == pytest.approx(summary["macro"]["miou"], abs=1e-15)
    assert out["num_undefined"] == 1


def test_pointing_module_equals_the_function(loaded):
    heatmaps, boxes, _ = _fixture()
    expected = [pointing_game(h, b) for h, b in zip(heatmaps, boxes)]
    assert expected[2] == 1.0  # the planted peak
    out = loaded["pointing_game"].compute(predictions=heatmaps, references=boxes)
    assert out == {"pointing_game": float(np.mean(expected[:3])), "num_undefined": 1}


def test_module_accumulates_batches(loaded):
    heatmaps, boxes, _ = _fixture()
    metric = loaded["pointing_game"]
    metric.add_batch(predictions=heatmaps[:2], references=boxes[:2])
    metric.add_batch(predictions=heatmaps[2:], references=boxes[2:])
    assert metric.compute() == loaded["pointing_game"].compute(predictions=heatmaps, references=boxes)
