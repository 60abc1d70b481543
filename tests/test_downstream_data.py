"""The task adapters on tiny copies of the published layouts: CheXpert labels, RSNA boxes, SIIM masks."""

import numpy as np
import pytest

from plan_hf import PlanImageProcessor
from plan_hf.data.rle import rle_decode
from plan_hf.downstream.data import (
    DetectionCollator,
    SegmentationCollator,
    load_classification_data,
    load_detection_data,
    load_segmentation_data,
)
from tests.layouts import ChexpertRow, make_chexpert_layout, make_rsna_layout, make_siim_layout


def test_chexpert_classification_uses_valid_as_test_and_maps_uncertain(tmp_path):
    make_chexpert_layout(tmp_path, [
        ChexpertRow(1, labels={"Atelectasis": -1.0, "Cardiomegaly": -1.0, "Edema": 1.0}),
        ChexpertRow(2, labels={"Pleural Effusion": 0.0}),
        ChexpertRow(3, frontal=False, view=2, labels={"Edema": 1.0}),  # lateral: left out
    ])
    make_chexpert_layout(tmp_path, [ChexpertRow(9, labels={"Consolidation": 1.0})], split="valid")
    data = load_classification_data("chexpert", tmp_path)
    assert data.class_names == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert data.train.with_format(None)["labels"] == [[1, 0, 0, 1, 0], [0, 0, 0, 0, 0]]  # U-Ones / U-Zeros policy
    assert data.test.with_format(None)["labels"] == [[0, 0, 1, 0, 0]]
    assert all("valid/" in i for i in data.ids("test")) and set(data.ids("train")).isdisjoint(data.ids("test"))


def test_rsna_detection_and_classification_keep_boxes_per_patient(tmp_path):
    patients = {f"p{i}": ([[1, 2, 5, 6], [8, 9, 3, 5]] if i % 3 == 0 else []) for i in range(20)}
    make_rsna_layout(tmp_path, patients, shape=(24, 24))
    detection = load_detection_data("rsna", tmp_path)
    assert detection.class_names == ["pneumonia"]
    assert set(detection.ids("train")).isdisjoint(detection.ids("test"))
    assert len(detection.train) + len(detection.test) == 17  # 3 held out for validation (15%)
    rows = detection.train.with_format(None)
    for patient, boxes, labels in zip(rows["patient_id"], rows["boxes"], rows["box_labels"]):
        assert boxes == patients[patient] and labels == [0] * len(boxes)
    example = detection.train[0]  # decodes the DICOM lazily
    batch = DetectionCollator(PlanImageProcessor(size=48))([example])
    assert batch["pixel_values"].shape == (1, 3, 48, 48)
    classification = load_classification_data("rsna", tmp_path)
    rows = classification.train.with_format(None)
    assert [label[0] for label in rows["labels"]] == [float(bool(patients[p])) for p in rows["patient_id"]]


def test_siim_segmentation_masks_are_the_merged_rles(tmp_path):
    images = {f"1.2.{i}": (["-1"] if i % 2 else ["3 4", "20 2"]) for i in range(8)}
    make_siim_layout(tmp_path, images, shape=(8, 10))
    data = load_segmentation_data("siim", tmp_path)
    example = next(e for e in data.train if e["rles"])
    expected = rle_decode("3 4", 8, 10) | rle_decode("20 2", 8, 10)
    np.testing.assert_array_equal(example["mask"], expected)
    batch = SegmentationCollator(PlanImageProcessor(size=20))([example])
    assert batch["masks"].shape == (1, 20, 20) and batch["masks"].sum() == pytest.approx(expected.sum() * 4)


def test_unknown_dataset_for_a_task_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="detection takes rsna or synthetic"):
        load_detection_data("chexpert", tmp_path)
    with pytest.raises(ValueError, match="needs the label column names"):
        load_classification_data("csv", tmp_path / "x.csv")


def test_a_parquet_file_of_image_bytes_and_label_columns_is_a_multi_label_task(tmp_path):
    """Any `datasets` source with label columns: a parquet file of image bytes (one split: a seeded split of it), a
    row without an image skipped and counted (strict: named), blank labels 0, an unknown column listed."""
    import io

    import pandas as pd
    from PIL import Image as PILImage

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        PILImage.new("L", (8, 8), value).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = [{"picture": {"bytes": png(i), "path": None}, "effusion": float(i % 2), "edema": None if i == 3 else 1.0}
            for i in range(30)]
    rows[5]["picture"] = None  # no image
    pd.DataFrame(rows).to_parquet(tmp_path / "labelled.parquet")
    data = load_classification_data("parquet", tmp_path / "labelled.parquet", ["effusion", "edema"],
                                    image_column="picture")
    assert data.class_names == ["effusion", "edema"] and data.problem_type.value == "multi_label_classification"
    assert len(data.train) + len(data.test) < 29 and set(data.ids("train")).isdisjoint(data.ids("test"))
    both = [*data.train.with_format(None), *data.test.with_format(None)]
    by_pixel = {int(np.asarray(r["image"])[0, 0]): r["labels"] for r in both}  # (decoded as it is read)
    for value, labels in by_pixel.items():  # each image keeps its own row's labels
        assert labels == [float(value % 2), 0.0 if value == 3 else 1.0]
    assert 5 not in by_pixel
    with pytest.raises(ValueError, match=r"row 5: .*no image in field 'picture'"):
        load_classification_data("parquet", tmp_path / "labelled.parquet", ["effusion"], image_column="picture",
                                 strict=True)
    with pytest.raises(ValueError, match=r"no column.*'cardiomegaly'.*effusion"):
        load_classification_data("parquet", tmp_path / "labelled.parquet", ["cardiomegaly"], image_column="picture")
    with pytest.raises(ValueError, match="no class-label columns.*name the label columns"):
        load_classification_data("parquet", tmp_path / "labelled.parquet", image_column="picture")


def test_a_saved_dataset_dict_keeps_its_validation_split_as_the_test_set(tmp_path):
    """A `save_to_disk` DatasetDict with train and validation (no test) and a ClassLabel: validation is the test set,
    the classes are the ClassLabel's names, the labels its indices."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature
    from PIL import Image as PILImage

    for i in range(10):
        PILImage.new("L", (8, 8), i).save(tmp_path / f"{i}.png")
    features = Features({"image": ImageFeature(), "finding": ClassLabel(names=["normal", "effusion", "edema"])})
    part = lambda ids: Dataset.from_dict({"image": [str(tmp_path / f"{i}.png") for i in ids],  # noqa: E731
                                          "finding": [i % 3 for i in ids]}, features=features)
    DatasetDict({"train": part(range(7)), "validation": part(range(7, 10))}).save_to_disk(tmp_path / "saved")
    data = load_classification_data("disk", tmp_path / "saved", allow_outside_root=True)
    assert data.class_names == ["normal", "effusion", "edema"] and data.problem_type.value == \
        "single_label_classification"
    assert data.test.with_format(None)["labels"] == [7 % 3, 8 % 3, 9 % 3] and len(data.train) == 7
    assert [int(np.asarray(row["image"])[0, 0]) for row in data.test.with_format(None)] == [7, 8, 9]
    with pytest.raises(ValueError, match="single_label_classification task"):
        load_classification_data("disk", tmp_path / "saved", problem_type="multi_label_classification",
                                 allow_outside_root=True)
