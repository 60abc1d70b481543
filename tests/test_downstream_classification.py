"""Classification fine-tuning: seeded subsets, linear probe, Trainer + compute_metrics, the recipe end to end."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from plan_hf import PlanForImageClassification, PlanImageProcessor, PlanModel
from plan_hf.downstream.data import ClassificationCollator, ProblemType, TaskData, chexpert_targets
from plan_hf.downstream.finetune import (
    FinetuneConfig,
    Task,
    build_model,
    classification_compute_metrics,
    take_training_subset,
    train,
)
from plan_hf.downstream.splits import SubsetManifest, check_disjoint, seeded_split, seeded_subset

CLASSES = ["blob", "stripes"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory):
    """An easy, separable multi-label set: a bright disc ('blob') and/or horizontal bars ('stripes') on noise."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    rows = []
    for i in range(96):
        blob, stripes = i % 2, (i // 2) % 2
        image = 0.3 + 0.05 * rng.standard_normal((64, 64))
        if blob:
            cy, cx = rng.uniform(16, 48, 2)
            image += 0.6 * ((yy - cy) ** 2 + (xx - cx) ** 2 < 64)
        if stripes:
            image += 0.3 * ((yy // 4) % 2)
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(root / f"{i}.png")
        rows.append([f"{i}.png", blob, stripes, blob + 2 * stripes])
    with open(root / "toy.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", *CLASSES, "kind"], *rows])
    return root / "toy.csv"


# --------------------------------------------------------------------------------------------------------------------
def test_seeded_subsets_are_reproducible_nested_and_sized():
    assert np.array_equal(seeded_subset(1000, 0.1, seed=3), seeded_subset(1000, 0.1, seed=3))
    assert not np.array_equal(seeded_subset(1000, 0.1, seed=3), seeded_subset(1000, 0.1, seed=4))
    one, ten, full = (seeded_subset(1000, f, seed=3) for f in (0.01, 0.1, 1.0))
    assert (len(one), len(ten), len(full)) == (10, 100, 1000)
    assert set(one) <= set(ten) <= set(full)  # a larger fraction only adds images
    assert len(seeded_subset(20, 0.01)) == 1  # never empty
    with pytest.raises(ValueError, match="fraction"):
        seeded_subset(10, 0.0)
    split = seeded_split(200, seed=1)
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(200))
    assert np.array_equal(split["test"], seeded_split(200, seed=1)["test"])


def test_training_subset_manifest_is_disjoint_from_test_and_written(tmp_path):
    from datasets import Dataset

    train_rows = Dataset.from_dict({"dicom_id": [f"t{i}" for i in range(50)], "labels": [[0.0]] * 50})
    test_rows = Dataset.from_dict({"dicom_id": [f"x{i}" for i in range(5)], "labels": [[0.0]] * 5})
    data = TaskData(train_rows, test_rows, ["A"], "dicom_id")
    cfg = FinetuneConfig(task=Task.CLASSIFICATION, model="random", config="tiny-resnet", dataset="synthetic",
                         data="", out=str(tmp_path), fraction=0.1, seed=7)
    subset, manifest = take_training_subset(data, cfg)
    assert len(subset) == 5 and manifest.train_ids == [f"t{i}" for i in manifest.train_indices]
    again = SubsetManifest.read(manifest.write(tmp_path / "subset.json"))
    assert again == take_training_subset(data, cfg)[1]
    leaky = TaskData(train_rows, train_rows.select([0]), ["A"], "dicom_id")
    with pytest.raises(ValueError, match="both the training and the test"):
        take_training_subset(leaky, FinetuneConfig(**{**cfg.__dict__, "fraction": 1.0}))
    check_disjoint(["a"], ["b"])


def test_chexpert_targets_map_blank_and_uncertain():
    values = np.array([[1.0, np.nan, -1.0, -1.0], [0.0, -1.0, np.nan, 1.0]])
    names = ["Atelectasis", "Cardiomegaly", "Edema", "Fracture"]  # U-Ones, U-Zeros, U-Ones, default zero
    np.testing.assert_array_equal(chexpert_targets(values, names), [[1, 0, 1, 0], [0, 0, 0, 1]])


def test_compute_metrics_golden_values():
    from transformers import EvalPrediction

    logits = np.array([[2.0, -1.0], [1.0, 1.0], [-1.0, 2.0], [-2.0, -2.0]])
    labels = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    out = classification_compute_metrics(ProblemType.MULTI_LABEL, CLASSES)(EvalPrediction(logits, labels))
    assert out["macro_auc"] == pytest.approx(1.0) and out["accuracy"] == pytest.approx(1.0)
    assert set(out) == {"macro_auc", "accuracy", "auc/blob", "auc/stripes", "accuracy/blob", "accuracy/stripes"}
    wrong = classification_compute_metrics(ProblemType.SINGLE_LABEL, ["a", "b"])(
        EvalPrediction(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), np.array([0, 1, 1]))
    )
    assert wrong["accuracy"] == pytest.approx(2 / 3) and wrong["macro_auc"] == pytest.approx(0.75)


def test_loads_the_pretrained_tower_and_random_differs(export_dir, tmp_path):
    base = PlanModel.from_pretrained(export_dir)
    cfg = FinetuneConfig(task=Task.CLASSIFICATION, model=str(export_dir), dataset="csv", data="", out=str(tmp_path))
    model = build_model(cfg, 2, CLASSES, ProblemType.MULTI_LABEL)
    assert isinstance(model, PlanForImageClassification) and model.config.problem_type == "multi_label_classification"
    assert model.config.id2label == {0: "blob", 1: "stripes"}
    reference = base.vision_model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.vision_model.state_dict().items())
    random_cfg = FinetuneConfig(**{**cfg.__dict__, "model": "random", "config": str(export_dir)})
    random_model = build_model(random_cfg, 2, CLASSES, ProblemType.MULTI_LABEL)
    same = ("model_type", "hidden_sizes", "depths", "embedding_size", "layer_type")
    vision, random_vision = model.config.vision_config, random_model.config.vision_config
    assert [getattr(random_vision, k) for k in same] == [getattr(vision, k) for k in same]
    assert not torch.equal(random_model.vision_model.embedder.embedder.convolution.weight,
                           model.vision_model.embedder.embedder.convolution.weight)


def test_linear_probe_with_trainer_leaves_the_tower_unchanged(export_dir, toy_csv, tmp_path):
    from plan_hf.downstream.data import load_classification_data

    data = load_classification_data("csv", toy_csv, CLASSES)
    cfg = FinetuneConfig(task=Task.CLASSIFICATION, model=str(export_dir), dataset="csv", data=str(toy_csv),
                         out=str(tmp_path), linear_probe=True, max_steps=3, batch_size=8, learning_rate=1e-2)
    model = build_model(cfg, 2, CLASSES, ProblemType.MULTI_LABEL)
    tower_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}  # BatchNorm statistics too
    head_before = model.classifier.weight.detach().clone()
    trainer, _ = train(model, data.train, ClassificationCollator(PlanImageProcessor(size=64)), cfg)
    assert trainer.model_accepts_loss_kwargs is False  # gradient accumulation divides the mean loss
    assert all(torch.equal(v, tower_before[k]) for k, v in model.vision_model.state_dict().items())
    assert not torch.equal(model.classifier.weight, head_before)
    model.freeze_vision_tower(False)
    model.train()
    assert model.vision_model.training and all(p.requires_grad for p in model.vision_model.parameters())


def test_recipe_reaches_high_auc_on_a_separable_set_and_writes_its_report(export_dir, toy_csv, tmp_path):
    from training.finetune_classification import main  # the recipe as a user runs it

    out = tmp_path / "run"
    payload = main([
        "--model_name_or_path", str(export_dir), "--dataset", "csv", "--data_dir", str(toy_csv), "--label_columns",
        *CLASSES, "--fraction", "1.0", "--epochs", "5", "--micro_batch_size", "16", "--learning_rate", "3e-3",
        "--output_dir", str(out), "--no_save_model",
    ])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["macro_auc"] > 0.9, metrics["metrics"]
    assert set(metrics["metrics"]["per_class_auc"]) == set(CLASSES)
    assert {"macro_auc", "accuracy", "per_class_auc", "per_class_accuracy", "test_loss"} <= set(metrics["metrics"])
    assert metrics["num_train"] + metrics["num_test"] < 96 and payload["fraction"] == 1.0
    manifest = json.loads((out / "subset.json").read_text())
    assert not set(manifest["train_ids"]) & set(manifest["test_ids"])
    assert (out / "roc.png").stat().st_size > 0 and "macro_auc" in (out / "summary.md").read_text()


def test_multi_class_cross_entropy_through_the_recipe(toy_csv, tmp_path):
    from plan_hf.downstream.finetune import run_finetune

    cfg = FinetuneConfig(task=Task.CLASSIFICATION, model="random", config="tiny-resnet", image_size=64, dataset="csv",
                         data=str(toy_csv), class_names=["kind"], problem_type="single_label_classification",
                         out=str(tmp_path), max_steps=2, batch_size=8, save_model=True)
    payload = run_finetune(cfg)
    assert payload["classes"] == ["0", "1", "2", "3"]
    assert {"macro_auc", "accuracy"} <= set(payload["metrics"])
    assert set(payload["metrics"]["per_class_auc"]) == {"0", "1", "2", "3"}
    reloaded = PlanForImageClassification.from_pretrained(tmp_path / "model")
    assert reloaded.config.problem_type == "single_label_classification" and reloaded.config.num_labels == 4


@pytest.fixture(scope="module")
def toy_imagefolder(toy_csv, tmp_path_factory):
    """The toy set as `datasets`' imagefolder convention: train/ and test/, a sub-folder per class (blob, both,
    none, stripes: the kind of each image), no metadata file."""
    import shutil

    root = tmp_path_factory.mktemp("toy_folder")
    names = {0: "none", 1: "blob", 2: "stripes", 3: "both"}
    with open(toy_csv) as handle:
        for row in csv.DictReader(handle):
            split = "test" if int(row["image"].split(".")[0]) >= 80 else "train"  # 4 of each kind
            folder = root / split / names[int(row["kind"])]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(toy_csv.parent / row["image"], folder / row["image"])
    return root


def test_an_imagefolder_of_class_folders_is_a_single_label_task_named_by_its_folders(export_dir, toy_imagefolder,
                                                                                     tmp_path):
    """`--dataset imagefolder` reads the class sub-folders as `datasets` does (a ClassLabel): its classes are the
    folders' names, its test split the test/ folder, and the recipe learns it (labels follow the images)."""
    from training.finetune_classification import main

    out = tmp_path / "run"
    payload = main([
        "--model_name_or_path", str(export_dir), "--dataset", "imagefolder", "--data_dir", str(toy_imagefolder),
        "--epochs", "5", "--micro_batch_size", "16", "--learning_rate", "3e-3", "--output_dir", str(out),
    ])
    assert payload["classes"] == ["blob", "both", "none", "stripes"]  # datasets sorts the folder names
    assert payload["num_test"] == 16 and payload["num_train"] == 80  # the test/ folder, the whole train/ folder
    assert payload["metrics"]["macro_auc"] > 0.8, payload["metrics"]
    manifest = json.loads((out / "subset.json").read_text())
    assert all("/test/" in i for i in manifest["test_ids"]) and all("/train/" in i for i in manifest["train_ids"])
    reloaded = PlanForImageClassification.from_pretrained(out / "model")
    assert reloaded.config.problem_type == "single_label_classification"
    assert reloaded.config.id2label == {0: "blob", 1: "both", 2: "none", 3: "stripes"}


def test_a_load_dataset_name_needs_no_data_dir_and_the_others_do(toy_imagefolder):
    """A name for `datasets.load_dataset` (here a local folder's path, as a Hub id would be) is read with no
    --data_dir, as the same folder is by `--dataset imagefolder`; every other data set names its folder."""
    from plan_hf.cli.arguments import ConfigError, parse
    from plan_hf.cli.finetune import ClassificationArguments, ReportGenerationArguments
    from plan_hf.downstream.data import load_classification_data

    by_name = load_classification_data(str(toy_imagefolder), None)
    as_folder = load_classification_data("imagefolder", toy_imagefolder)
    assert by_name.class_names == as_folder.class_names == ["blob", "both", "none", "stripes"]
    assert by_name.train["labels"] == as_folder.train["labels"] and len(by_name.test) == 16
    base = ["--model_name_or_path", "m", "--output_dir", "o"]
    assert parse(ClassificationArguments, [*base, "--dataset", "someone/cxr-labels"], prog="p").data_dir is None
    assert parse(ReportGenerationArguments, [*base, "--dataset", "someone/cxr-reports"], prog="p").data_dir is None
    for arguments, dataset in [(ClassificationArguments, "chexpert"), (ClassificationArguments, "imagefolder"),
                               (ReportGenerationArguments, "mimic"), (ReportGenerationArguments, "parquet")]:
        with pytest.raises(ConfigError, match=f"--dataset {dataset} needs --data_dir"):
            parse(arguments, [*base, "--dataset", dataset], prog="p")
