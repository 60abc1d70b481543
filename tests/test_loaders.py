"""Loaders on tiny on-the-fly copies of each published layout, the bad-row policy, and the SIIM run-length code."""

from __future__ import annotations

import gzip
import importlib.util
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Image, IterableDataset, IterableDatasetDict

from plan_hf.data.bad_rows import BadRowReason, LoadReport
from plan_hf.data.loaders import (
    CHEXPERT_5X200_CLASSES,
    CHEXPERT_LABELS,
    build_chexpert_5x200,
    load_chexpert,
    load_image_text,
    load_mimic_cxr,
    load_ms_cxr,
    load_rsna,
    load_siim,
    rle_decode,
    rle_encode,
    validate_images,
)
from tests.layouts import (
    DEFAULT_MIMIC_IMAGES,
    MIMIC_REPORT_NO_TEXT,
    ChexpertRow,
    MimicImage,
    chexpert_5x200_rows,
    make_chexpert_layout,
    make_mimic_layout,
    make_ms_cxr_layout,
    make_rsna_layout,
    make_siim_layout,
    write_corrupt_image,
    write_dicom,
    write_image,
)

# ---------------------------------------------------------------------------------------------------------------
# Run-length encoding


def test_rle_hand_computed_example() -> None:
    mask = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 1]], dtype=bool)
    # column-major pixels: 1 0 0 | 0 0 1 | 0 1 1 → runs (0, 1), (5, 1), (7, 2) → relative starts 0, 5-1=4, 7-6=1
    assert rle_encode(mask) == "0 1 4 1 1 2"
    np.testing.assert_array_equal(rle_decode("0 1 4 1 1 2", 3, 3), mask)
    tall = rle_decode("1 4", 3, 2)  # pixels 1..4 of a 3x2 image: (1,0) (2,0) (0,1) (1,1)
    np.testing.assert_array_equal(tall, [[False, True], [True, True], [True, False]])


def test_rle_round_trip_and_errors() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (5, 7), (32, 16)]:
        for density in (0.0, 0.3, 1.0):
            mask = rng.random(shape) < density
            encoded = rle_encode(mask)
            np.testing.assert_array_equal(rle_decode(encoded, *shape), mask)
            assert (encoded == "-1") == (not mask.any())
    assert not rle_decode(" -1 ", 4, 4).any()
    with pytest.raises(ValueError, match="past the end"):
        rle_decode("10 7", 4, 4)
    with pytest.raises(ValueError, match="pairs"):
        rle_decode("1 2 3", 4, 4)


def _xrv_file(name: str) -> Path | None:
    spec = importlib.util.find_spec("torchxrayvision")  # no import: the package needs torchvision
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    return path if path.is_file() else None


@pytest.mark.skipif(_xrv_file("siim-pneumothorax-train-rle.csv.gz") is None, reason="torchxrayvision not installed")
def test_rle_round_trips_real_siim_masks() -> None:
    path = _xrv_file("siim-pneumothorax-train-rle.csv.gz")
    frame = pd.read_csv(path, skipinitialspace=True)
    frame.columns = [column.strip() for column in frame.columns]
    positives = frame[frame["EncodedPixels"].str.strip() != "-1"].head(100)
    assert len(positives) == 100
    for rle in positives["EncodedPixels"]:
        mask = rle_decode(rle, 1024, 1024)
        assert mask.any()
        assert rle_encode(mask) == " ".join(rle.split())


# ---------------------------------------------------------------------------------------------------------------
# MIMIC-CXR


def test_mimic_splits_views_text_and_labels(tmp_path: Path) -> None:
    layout = make_mimic_layout(tmp_path)
    data = load_mimic_cxr(tmp_path)
    assert isinstance(data, DatasetDict) and list(data) == ["train", "validate", "test"]
    assert data["train"]["dicom_id"][:] == ["d1", "d3", "d7"]  # d2 is lateral
    assert data["validate"]["dicom_id"][:] == ["d4"]
    assert data["test"]["dicom_id"][:] == ["d5"]  # d6 has a blank ViewPosition: not frontal
    train = data["train"]
    assert isinstance(train.features["image"], Image)
    for column in ("text", "dicom_id", "study_id", "subject_id", "split", "view_position", *CHEXPERT_LABELS):
        assert column in train.column_names
    first = train[0]
    assert first["study_id"] == 50000001 and first["subject_id"] == 10000032 and first["view_position"] == "PA"
    assert first["image"].size == (24, 20)  # decoded on access
    assert first["text"].endswith("right upper lobe.\n\nSmall left effusion.")
    assert first["Pleural Effusion"] == 1.0 and first["Cardiomegaly"] == 0.0 and first["Lung Lesion"] == -1.0
    assert math.isnan(first["Edema"])
    assert train[1]["text"] == "Right IJ line ends in the SVC. No pneumothorax."  # impression only
    assert data["test"][0]["Support Devices"] != data["test"][0]["Support Devices"]  # study without labels: NaN
    assert layout.images[1].view == "LATERAL"

    everything = load_mimic_cxr(tmp_path, split="test", views=None)
    assert isinstance(everything, Dataset) and everything["dicom_id"][:] == ["d5", "d6"]
    assert load_mimic_cxr(tmp_path, split="train", sections=("findings",))["dicom_id"][:] == ["d1", "d7"]


def test_mimic_plain_csvs_separate_reports_and_streaming(tmp_path: Path) -> None:
    make_mimic_layout(tmp_path / "jpg", compress=False, reports_root=tmp_path / "reports")
    assert (tmp_path / "jpg" / "mimic-cxr-2.0.0-split.csv").is_file()
    data = load_mimic_cxr(tmp_path / "jpg", split="train", reports_root=tmp_path / "reports")
    assert len(data) == 3
    streamed = load_mimic_cxr(tmp_path / "jpg", split="train", reports_root=tmp_path / "reports", streaming=True)
    assert isinstance(streamed, IterableDataset)
    rows = list(streamed)
    assert [row["dicom_id"] for row in rows] == data["dicom_id"][:]
    assert [row["text"] for row in rows] == data["text"][:]
    assert rows[0]["image"].size == (24, 20)
    all_splits = load_mimic_cxr(tmp_path / "jpg", reports_root=tmp_path / "reports", streaming=True)
    assert isinstance(all_splits, IterableDatasetDict) and [r["dicom_id"] for r in all_splits["validate"]] == ["d4"]


def test_mimic_index_never_opens_an_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_mimic_layout(tmp_path)
    import PIL.Image

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the index build opened an image")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    assert len(load_mimic_cxr(tmp_path, split="train")) == 3


# ---------------------------------------------------------------------------------------------------------------
# Bad rows: missing image, unreadable image, empty report, missing column


def test_missing_image_lenient_counts_and_logs_strict_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_mimic_layout(tmp_path, skip_images=["d3"])
    with caplog.at_level(logging.WARNING, logger="plan_hf.data"):
        data, report = load_mimic_cxr(tmp_path, split="train", return_report=True)
    assert data["dicom_id"][:] == ["d1", "d7"]
    assert isinstance(report, LoadReport)
    assert report.kept == 2 and report.skipped == {BadRowReason.MISSING_IMAGE: 1}
    assert "dicom_id=d3" in report.examples[BadRowReason.MISSING_IMAGE][0]
    assert "missing_image: 1" in caplog.text and "kept 2" in caplog.text
    with pytest.raises(ValueError, match=r"mimic-cxr-2.0.0-split.csv.gz line 4 \(dicom_id=d3\): missing image file"):
        load_mimic_cxr(tmp_path, split="train", strict=True)


def test_empty_and_missing_reports(tmp_path: Path) -> None:
    images = [*DEFAULT_MIMIC_IMAGES, MimicImage("d8", 14000044, 54000001, "train", "PA"),
              MimicImage("d9", 15000055, 55000001, "train", "PA")]
    reports = {50000001: "FINDINGS: Clear.", 50000002: "IMPRESSION: Normal.", 51000001: "FINDINGS: Clear.",
               52000001: "FINDINGS: Clear.", 53000001: "FINDINGS: Clear.", 54000001: MIMIC_REPORT_NO_TEXT,
               55000001: None}
    make_mimic_layout(tmp_path, images=images, reports=reports)
    data, report = load_mimic_cxr(tmp_path, return_report=True)
    assert "d8" not in data["train"]["dicom_id"][:] and "d9" not in data["train"]["dicom_id"][:]
    assert report.skipped == {BadRowReason.EMPTY_REPORT: 1, BadRowReason.MISSING_REPORT: 1}
    assert report.kept == sum(len(split) for split in data.values()) == 5
    assert report.examples[BadRowReason.EMPTY_REPORT][0].endswith(
        f"line 9 (dicom_id=d8): report {tmp_path}/files/p14/p14000044/s54000001.txt"
        " has no findings or impression text"
    )
    with pytest.raises(ValueError, match=r"line 10 \(dicom_id=d9\): missing report file .*s55000001.txt"):
        load_mimic_cxr(tmp_path, split="train", strict=True)
    # with the fallback, the exam-only report still has no usable text; an impression-only one does
    assert "d8" not in load_mimic_cxr(tmp_path, split="train", fallback="last")["dicom_id"][:]


def test_unreadable_image_needs_verify(tmp_path: Path) -> None:
    make_mimic_layout(tmp_path, corrupt_images=["d7"])
    assert len(load_mimic_cxr(tmp_path, split="train")) == 3  # existence only: the corrupt file is not opened
    data, report = load_mimic_cxr(tmp_path, split="train", verify=True, return_report=True, num_workers=2)
    assert data["dicom_id"][:] == ["d1", "d3"]
    assert report.skipped == {BadRowReason.UNREADABLE_IMAGE: 1} and report.kept == 2
    with pytest.raises(ValueError, match=r"dicom_id=d7\): unreadable image .*d7.jpg"):
        load_mimic_cxr(tmp_path, split="train", verify=True, strict=True)
    # the same check on any dataset, after loading
    checked, own_report = validate_images(load_mimic_cxr(tmp_path), return_report=True)
    assert isinstance(checked, DatasetDict) and len(checked["train"]) == 2 and own_report.num_skipped == 1


def test_missing_column_is_always_an_error(tmp_path: Path) -> None:
    make_mimic_layout(tmp_path, metadata_columns=("dicom_id", "subject_id", "study_id", "Rows", "Columns"))
    with pytest.raises(ValueError, match=r"mimic-cxr-2.0.0-metadata.csv.gz has no column 'ViewPosition'"):
        load_mimic_cxr(tmp_path, strict=False)
    make_rsna_layout(tmp_path / "rsna")
    labels = tmp_path / "rsna" / "stage_2_train_labels.csv"
    labels.write_text(labels.read_text().replace("Target", "Label"))
    with pytest.raises(ValueError, match=r"stage_2_train_labels.csv has no column 'Target'"):
        load_rsna(tmp_path / "rsna")


def test_unparsable_value_is_a_bad_row(tmp_path: Path) -> None:
    make_mimic_layout(tmp_path)
    labels = tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz"
    text = gzip.decompress(labels.read_bytes()).decode().replace("53000001,,", "53000001,maybe,")
    labels.write_bytes(gzip.compress(text.encode()))
    data, report = load_mimic_cxr(tmp_path, split="train", return_report=True)
    assert report.skipped == {BadRowReason.INVALID_VALUE: 1}
    assert "'Atelectasis' needs a number, got 'maybe'" in report.examples[BadRowReason.INVALID_VALUE][0]
    assert math.isnan(data[2]["Atelectasis"])  # the study's labels are dropped, its image kept: labels are optional


# ---------------------------------------------------------------------------------------------------------------
# CheXpert and CheXpert 5x200


def test_chexpert_roots_views_and_uncertainty(tmp_path: Path) -> None:
    rows = [
        ChexpertRow(1, labels={"Edema": -1.0, "Cardiomegaly": 1.0, "No Finding": 0.0}),
        ChexpertRow(1, view=2, frontal=False, labels={"Edema": 1.0}),
        ChexpertRow(2, ap_pa="PA", age=0, sex="Male"),
    ]
    make_chexpert_layout(tmp_path, rows, folder="chexpert-renamed")
    for root in (tmp_path, tmp_path / "chexpert-renamed"):
        ds = load_chexpert(root)
        assert ds["path"][:] == [rows[0].path("train"), rows[2].path("train")]
        assert ds[0]["image"].size == (12, 10)
    ds = load_chexpert(tmp_path)
    assert ds[0]["Edema"] == -1.0 and ds[0]["Cardiomegaly"] == 1.0 and math.isnan(ds[0]["Atelectasis"])
    assert ds[1]["view_position"] == "PA" and ds[1]["sex"] == "Male" and ds[1]["age"] == 0
    assert load_chexpert(tmp_path, uncertain="zeros")[0]["Edema"] == 0.0
    assert load_chexpert(tmp_path, uncertain="ones")[0]["Edema"] == 1.0
    both = load_chexpert(tmp_path, frontal_only=False)
    assert both["frontal_lateral"][:] == ["Frontal", "Lateral", "Frontal"]
    with pytest.raises(FileNotFoundError, match="valid.csv"):
        load_chexpert(tmp_path, split="valid")


def test_chexpert_missing_image(tmp_path: Path) -> None:
    make_chexpert_layout(tmp_path, [ChexpertRow(1), ChexpertRow(2)], skip_images=[1])
    ds, report = load_chexpert(tmp_path, return_report=True)
    assert len(ds) == 1 and report.skipped == {BadRowReason.MISSING_IMAGE: 1}
    with pytest.raises(ValueError, match=r"train.csv line 3 \(Path=CheXpert-v1.0-small/train/patient00002"):
        load_chexpert(tmp_path, strict=True)


def test_chexpert_5x200_is_seeded_exclusive_and_written(tmp_path: Path) -> None:
    make_chexpert_layout(tmp_path, chexpert_5x200_rows(4))
    ds = load_chexpert(tmp_path, frontal_only=False)
    five = build_chexpert_5x200(ds, tmp_path / "out" / "manifest.csv", n_per_class=3, seed=1)
    assert isinstance(five.features["label"], ClassLabel)
    assert five.features["label"].names == list(CHEXPERT_5X200_CLASSES)
    assert five["label"][:] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
    for row in five:
        positives = [name for name in CHEXPERT_5X200_CLASSES if row[name] == 1.0]
        assert positives == [CHEXPERT_5X200_CLASSES[row["label"]]] and row["frontal_lateral"] == "Frontal"
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert list(manifest.columns) == ["path", "class"]
    assert manifest["path"].tolist() == five["path"][:]
    assert manifest["class"].tolist() == [CHEXPERT_5X200_CLASSES[label] for label in five["label"]]
    again = build_chexpert_5x200(tmp_path, tmp_path / "again.csv", n_per_class=3, seed=1)  # from the root
    assert again["path"][:] == five["path"][:]
    draws = {
        tuple(build_chexpert_5x200(ds, tmp_path / "s.csv", n_per_class=3, seed=seed)["path"][:]) for seed in range(6)
    }
    assert len(draws) > 1  # the seed matters


def test_chexpert_5x200_too_few_candidates(tmp_path: Path) -> None:
    make_chexpert_layout(tmp_path, chexpert_5x200_rows(2))
    with pytest.raises(ValueError, match=r"Atelectasis: 2 candidates < 3"):
        build_chexpert_5x200(tmp_path, tmp_path / "m.csv", n_per_class=3)
    assert len(build_chexpert_5x200(tmp_path, tmp_path / "m.csv", n_per_class=3, allow_fewer=True)) == 10


# ---------------------------------------------------------------------------------------------------------------
# MS-CXR


def test_ms_cxr_groups_boxes_per_phrase(tmp_path: Path) -> None:
    csv_path = make_ms_cxr_layout(tmp_path, with_split=True)
    ds = load_ms_cxr(csv_path, tmp_path / "mimic")
    assert ds["label_text"][:] == ["bilateral effusions", "enlarged heart", "left apical pneumothorax"]
    assert ds[0]["boxes"] == [[2.0, 10.0, 5.0, 6.0], [14.0, 11.0, 6.0, 5.0]]
    assert ds[0]["category_name"] == "Pleural Effusion" and ds[0]["dicom_id"] == "m1"
    assert (ds[0]["image_width"], ds[0]["image_height"]) == ds[0]["image"].size == (24, 20)
    test = load_ms_cxr(csv_path, tmp_path / "mimic", split="test")
    assert test["dicom_id"][:] == ["m2"] and test[0]["split"] == "test"

    no_split = make_ms_cxr_layout(tmp_path / "v1")
    assert "split" not in load_ms_cxr(no_split, tmp_path / "v1" / "mimic").column_names
    with pytest.raises(ValueError, match="no column 'split'"):
        load_ms_cxr(no_split, tmp_path / "v1" / "mimic", split="test")


def test_ms_cxr_bad_box_drops_its_phrase(tmp_path: Path) -> None:
    csv_path = make_ms_cxr_layout(tmp_path)
    lines = csv_path.read_text().splitlines()
    lines[2] = lines[2].replace(",14,11,", ",,11,")  # second box of "bilateral effusions"
    csv_path.write_text("\n".join(lines) + "\n")
    ds, report = load_ms_cxr(csv_path, tmp_path / "mimic", return_report=True)
    assert ds["label_text"][:] == ["enlarged heart", "left apical pneumothorax"]
    assert report.skipped == {BadRowReason.INVALID_VALUE: 1}


# ---------------------------------------------------------------------------------------------------------------
# RSNA, SIIM (DICOM, decoded lazily with plan_hf.image_processing_plan.read_dicom)


def test_rsna_boxes_labels_and_lazy_dicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_rsna_layout(tmp_path)
    ds = load_rsna(tmp_path)
    plain = ds.with_format(None)
    assert plain["patient_id"][:] == ["p-neg", "p-one", "p-two"]
    assert plain["label"][:] == [0, 1, 1] and ds.features["label"].names == ["no pneumonia", "pneumonia"]
    assert plain["boxes"][:] == [[], [[1.0, 2.0, 5.0, 6.0]], [[0.0, 0.0, 4.0, 4.0], [8.0, 9.0, 3.0, 5.0]]]

    import plan_hf.image_processing_plan as image_processing

    calls: list[str] = []
    real_read_dicom = image_processing.read_dicom

    def spy(path: str) -> np.ndarray:
        calls.append(str(path))
        return real_read_dicom(path)

    monkeypatch.setattr(image_processing, "read_dicom", spy)
    image = ds[1]["image"]
    assert calls == [str(tmp_path / "stage_2_train_images" / "p-one.dcm")]  # only the row that was read
    assert image.dtype == np.float32 and image.shape == (16, 16) and image.min() == 0.0 and image.max() == 1.0
    expected = np.random.default_rng(1).integers(0, 4096, (16, 16), dtype=np.uint16).astype(np.float64)
    np.testing.assert_allclose(image, (expected - expected.min()) / (expected.max() - expected.min()), atol=1e-6)

    streamed = list(load_rsna(tmp_path, streaming=True))
    assert [row["image"].shape for row in streamed] == [(16, 16)] * 3


def test_rsna_missing_dicom(tmp_path: Path) -> None:
    make_rsna_layout(tmp_path, skip_images=["p-two"])
    ds, report = load_rsna(tmp_path, return_report=True)
    assert ds.with_format(None)["patient_id"][:] == ["p-neg", "p-one"]
    assert report.skipped == {BadRowReason.MISSING_IMAGE: 1}  # one patient, although it has two box rows
    with pytest.raises(ValueError, match=r"line 4 \(patientId=p-two\): missing image file .*p-two.dcm"):
        load_rsna(tmp_path, strict=True)


def test_siim_merges_masks_at_the_dicom_size(tmp_path: Path) -> None:
    make_siim_layout(tmp_path, shape=(8, 10))
    ds = load_siim(tmp_path)
    plain = ds.with_format(None)
    assert plain["image_id"][:] == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert plain["label"][:] == [0, 1, 1] and plain["rles"][:] == [[], ["0 3 5 2"], ["1 2", "30 4"]]
    empty, single, merged = ds[0], ds[1], ds[2]
    assert empty["image"].shape == empty["mask"].shape == (8, 10) and not empty["mask"].any()
    np.testing.assert_array_equal(single["mask"], rle_decode("0 3 5 2", 8, 10))
    assert single["mask"][:3, 0].all() and single["mask"][:2, 1].all() and single["mask"].sum() == 5
    np.testing.assert_array_equal(merged["mask"], rle_decode("1 2", 8, 10) | rle_decode("30 4", 8, 10))


def test_siim_bad_rows(tmp_path: Path) -> None:
    make_siim_layout(tmp_path, images={"a": ["-1"], "b": ["3 x"], "c": ["0 2"]}, skip_images=["c"])
    ds, report = load_siim(tmp_path, return_report=True)
    assert ds.with_format(None)["image_id"][:] == ["a"]
    assert report.skipped == {BadRowReason.INVALID_VALUE: 1, BadRowReason.MISSING_IMAGE: 1}
    with pytest.raises(ValueError, match=r"ImageId=b\): malformed RLE"):
        load_siim(tmp_path, strict=True)


def test_verify_finds_unreadable_dicom(tmp_path: Path) -> None:
    make_rsna_layout(tmp_path)
    (tmp_path / "stage_2_train_images" / "p-one.dcm").write_bytes(b"not a dicom at all")
    ds, report = load_rsna(tmp_path, verify=True, return_report=True, num_workers=1)
    assert ds.with_format(None)["patient_id"][:] == ["p-neg", "p-two"]
    assert report.skipped == {BadRowReason.UNREADABLE_IMAGE: 1}
    assert ds[1]["image"].shape == (16, 16)  # the lazy decoder survives the filtering


# ---------------------------------------------------------------------------------------------------------------
# A user's own list


def test_image_text_csv_and_jsonl(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "a.png", mode="I;16")
    write_image(tmp_path / "imgs" / "b.jpg")
    pd.DataFrame(
        {"file": ["a.png", "b.jpg", "missing.png", "b.jpg"], "report": ["Clear.", "Effusion.", "X.", "  "],
         "effusion": [0, 1, 0, 1]}
    ).to_csv(tmp_path / "imgs" / "list.csv", index=False)
    ds, report = load_image_text(tmp_path / "imgs" / "list.csv", image_column="file", text_column="report",
                                 label_columns=["effusion"], return_report=True)
    assert ds.column_names == ["image", "text", "effusion"]
    assert ds["text"][:] == ["Clear.", "Effusion."] and ds["effusion"][:] == [0.0, 1.0]
    assert ds[0]["image"].mode.startswith("I")  # 16-bit PNG kept at full depth by datasets' Image()
    assert report.skipped == {BadRowReason.MISSING_IMAGE: 1, BadRowReason.EMPTY_REPORT: 1}

    lines = pd.DataFrame({"image": [str(tmp_path / "imgs" / "b.jpg")], "text": ["No pneumothorax."]})
    lines.to_json(tmp_path / "list.jsonl", orient="records", lines=True)
    with pytest.raises(ValueError, match="list.jsonl line 1 .*image leads outside the dataset folder /elsewhere"):
        load_image_text(tmp_path / "list.jsonl", images_root="/elsewhere", strict=True)
    # one's own list may name absolute paths, when it says so (images_root then only serves relative ones)
    ds = load_image_text(tmp_path / "list.jsonl", images_root="/elsewhere", allow_outside_root=True)
    assert ds[0]["text"] == "No pneumothorax." and ds[0]["image"].size == (24, 20)


def test_image_text_dicom_list_and_corrupt_file(tmp_path: Path) -> None:
    write_dicom(tmp_path / "x.dcm", pixels=np.arange(12, dtype=np.uint8).reshape(3, 4), photometric="MONOCHROME1")
    write_corrupt_image(tmp_path / "broken.jpg")
    pd.DataFrame({"image": ["x.dcm"], "text": ["Clear."]}).to_csv(tmp_path / "d.csv", index=False)
    ds = load_image_text(tmp_path / "d.csv", images_root=tmp_path)
    image = ds[0]["image"]
    assert ds.with_format(None).column_names == ["image_path", "text"]
    assert image.shape == (3, 4) and image[0, 0] == 1.0 and image[-1, -1] == 0.0  # MONOCHROME1 inverted
    pd.DataFrame({"image": ["broken.jpg"], "text": ["Clear."]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(ValueError, match="unreadable image"):
        load_image_text(tmp_path / "b.csv", verify=True, strict=True)
