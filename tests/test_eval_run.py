"""`python -m eval.run` end to end on a tiny synthetic set with a tiny random model saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    from plan_hf.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, 32, seed=0, image_size=64, workers=1, contact_sheet=False)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, synthetic_dir) -> Path:
    from plan_hf import PlanImageProcessor, PlanModel, PlanProcessor
    from plan_hf.tiny import build_tokenizer, tiny_plan_config

    texts = [path.read_text() for path in synthetic_dir.glob("files/*/*/*.txt")]
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(0)
    model = PlanModel(tiny_plan_config(vocab_size=len(tokenizer), image_size=64, local_num_stages=2))
    processor = PlanProcessor(PlanImageProcessor(size=64), tokenizer)
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _run(model_dir: Path, data: Path, out: Path, *extra: str) -> dict:
    from eval.run import main

    return main(["--model_name_or_path", str(model_dir), "--suite", "synthetic", "--data_dir", str(data),
                 "--output_dir", str(out), "--split", "train", "--eval_batch_size", "16", "--n_boot", "30",
                 "--no_progress", *extra])


def test_synthetic_suite_writes_metrics_report_and_pictures(model_dir, synthetic_dir, tmp_path):
    out = tmp_path / "eval"
    returned = _run(model_dir, synthetic_dir, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == returned
    assert metrics["suite"] == "synthetic" and metrics["split"] == "train"
    assert set(metrics["grounding"]) == {"local", "global", "position_prior", "position_prior_words", "grid_ceiling"}
    assert metrics["benchmark"] == "synthetic-cxr v2"
    for summary in metrics["grounding"].values():
        assert set(summary["macro"]) == {"cnr", "signed_cnr", "miou", "pointing", "side"}
        assert set(summary["ci"]) == {"cnr", "signed_cnr", "miou", "pointing", "side"}
        assert 0.0 <= summary["chance_pointing"] <= 1.0 and summary["count"] > 0
        assert -1.0 <= summary["same_image_map_correlation"] <= 1.0
    multiclass = metrics["zero_shot"]["multiclass"]
    assert {"accuracy", "macro_auc", "macro_f1", "per_class", "class_counts", "ci"} <= set(multiclass)
    binary = metrics["zero_shot"]["binary"]
    assert set(binary["macro"]) == {"auc", "f1_max", "accuracy"} and "Pneumothorax" in binary["findings"]
    assert {"auc", "f1_max", "threshold", "accuracy", "ci"} <= set(binary["findings"]["Cardiomegaly"])
    retrieval = metrics["retrieval"]
    for key in ("i2t_recall@1", "i2t_recall@5", "i2t_recall@10", "i2t_median_rank", "t2i_recall@1",
                "t2i_median_rank"):
        assert key in retrieval and key in retrieval["ci"]
    assert "i2t_precision@1" in metrics["class_retrieval"]

    report = (out / "report.md").read_text()
    for name, picture in metrics["pictures"].items():
        assert (out / picture).stat().st_size > 1000, name
        assert f"]({picture})" in report
    assert set(metrics["pictures"]) == {"grounding_local", "grounding_global", "roc_multiclass", "roc_binary",
                                        "retrieval_strip"}
    assert "## Phrase grounding" in report and "## Zero-shot classification" in report and " [" in report


def test_ms_cxr_suite_is_deterministic(model_dir, synthetic_dir, tmp_path):
    from eval.run import main

    def run(out: Path) -> dict:
        metrics = main(["--model_name_or_path", str(model_dir), "--suite", "ms-cxr", "--data_dir", str(synthetic_dir),
                        "--output_dir", str(out), "--split", "train", "--max_samples", "12", "--n_boot", "30",
                        "--no_progress", "--grounding_methods", "local"])
        metrics.pop("seconds")
        return metrics

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first == second
    assert set(first["grounding"]) == {"local", "position_prior", "position_prior_words", "grid_ceiling"}
    assert first["grounding"]["local"]["count"] == 12
    assert "zero_shot" not in first and "retrieval" not in first


def test_real_dataset_layouts_run(model_dir, tmp_path):
    """chexpert5x200, rsna, siim and ms-cxr (CSV outside the image root) on tiny copies of the published layouts."""
    from eval.run import main
    from tests.layouts import (
        chexpert_5x200_rows,
        make_chexpert_layout,
        make_ms_cxr_layout,
        make_rsna_layout,
        make_siim_layout,
    )

    make_chexpert_layout(tmp_path / "chexpert", chexpert_5x200_rows(3))
    make_rsna_layout(tmp_path / "rsna")
    make_siim_layout(tmp_path / "siim")
    csv_path = make_ms_cxr_layout(tmp_path / "ms_cxr", with_split=True)
    common = ["--model_name_or_path", str(model_dir), "--n_boot", "20", "--no_progress"]

    five = main(common + ["--suite", "chexpert5x200", "--data_dir", str(tmp_path / "chexpert"), "--output_dir",
                          str(tmp_path / "out5")])
    assert five["zero_shot"]["multiclass"]["class_counts"] == {name: 3 for name in
                                                               ("Atelectasis", "Cardiomegaly", "Consolidation",
                                                                "Edema", "Pleural Effusion")}
    assert five["class_retrieval"]["num_images"] == 15 and "i2t_precision@10" in five["class_retrieval"]
    assert (tmp_path / "out5" / "chexpert_5x200_manifest.csv").is_file()
    for suite, finding, count in (("rsna", "Pneumonia", 3), ("siim", "Pneumothorax", 3)):
        metrics = main(common + ["--suite", suite, "--data_dir", str(tmp_path / suite),
                                 "--output_dir", str(tmp_path / suite / "out")])
        result = metrics["zero_shot"]["binary"]["findings"][finding]
        assert result["num_positive"] + result["num_negative"] == count
    grounding = main(common + ["--suite", "ms-cxr", "--data_dir", str(tmp_path / "ms_cxr" / "mimic"), "--ms_cxr_csv",
                               str(csv_path), "--split", "train", "--output_dir", str(tmp_path / "out_ms")])
    assert grounding["grounding"]["local"]["count"] == 2  # two train phrases, one of them with two boxes
