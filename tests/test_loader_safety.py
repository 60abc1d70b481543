"""Loaders read only inside the dataset folder, read lists and CSVs as written, and name the file and line of
whatever they refuse: paths that leave the root, null texts, broken CSVs, repeated rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from plan_hf.data.bad_rows import BadRowReason
from plan_hf.data.loaders import load_chexpert, load_image_text, load_mimic_cxr, load_ms_cxr, load_rsna
from tests.layouts import (
    DEFAULT_MIMIC_IMAGES,
    ChexpertRow,
    MimicImage,
    make_chexpert_layout,
    make_mimic_layout,
    make_ms_cxr_layout,
    make_rsna_layout,
    write_dicom,
    write_image,
)

OUTSIDE = BadRowReason.OUTSIDE_ROOT


def _examples(report, reason) -> str:
    return " | ".join(report.examples.get(reason, []))


# ----------------------------------------------------------------------------------------------------------------------
# Nothing outside the dataset root
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("absolute", [False, True], ids=["dot-dot", "absolute"])
def test_mimic_dicom_id_cannot_leave_the_root(tmp_path: Path, absolute: bool) -> None:
    root = tmp_path / "mimic"
    # a real image outside the root, which a loader following the CSV would read
    escape = str(tmp_path / "secret") if absolute else "../../../../../secret"
    write_image(tmp_path / "secret.jpg")
    images = (*DEFAULT_MIMIC_IMAGES, MimicImage(escape, 10000032, 50000001, "train", "PA"))
    make_mimic_layout(root, images=images, compress=False, skip_images=[escape])
    ds, report = load_mimic_cxr(root, split="train", return_report=True)
    assert escape not in ds["dicom_id"] and sorted(ds["dicom_id"]) == ["d1", "d3", "d7"]
    assert report.skipped[OUTSIDE] == 1
    assert f"mimic-cxr-2.0.0-split.csv line 9 (dicom_id={escape}): dicom_id leads outside" in _examples(report, OUTSIDE)
    with pytest.raises(ValueError, match=r"split.csv line 9 .*dicom_id leads outside the dataset folder .*secret\.jpg"):
        load_mimic_cxr(root, split="train", strict=True)


def test_rsna_patient_id_cannot_leave_the_root(tmp_path: Path) -> None:
    root = tmp_path / "rsna"
    make_rsna_layout(root, patients={"p-neg": [], "../../outside": [[1, 2, 5, 6]]})
    assert (tmp_path / "outside.dcm").is_file()
    ds, report = load_rsna(root, return_report=True)
    assert ds.with_format(None)["patient_id"] == ["p-neg"] and report.skipped[OUTSIDE] == 1
    with pytest.raises(ValueError, match=r"stage_2_train_labels.csv line 3 \(patientId=../../outside\): patientId"):
        load_rsna(root, strict=True)


def test_ms_cxr_path_cannot_leave_the_images_root(tmp_path: Path) -> None:
    csv_path = make_ms_cxr_layout(tmp_path / "ms")
    write_image(tmp_path / "secret.jpg")
    frame = pd.read_csv(csv_path)
    frame.loc[frame["dicom_id"] == "m2", "path"] = "../../secret.jpg"
    frame.to_csv(csv_path, index=False)
    ds, report = load_ms_cxr(csv_path, tmp_path / "ms" / "mimic", return_report=True)
    assert set(ds["dicom_id"]) == {"m1"} and report.skipped[OUTSIDE] == 1
    with pytest.raises(ValueError, match=r"line 5 \(dicom_id=m2\): path leads outside"):
        load_ms_cxr(csv_path, tmp_path / "ms" / "mimic", strict=True)


@pytest.mark.parametrize("absolute", [False, True], ids=["dot-dot", "absolute"])
def test_chexpert_path_cannot_leave_the_root(tmp_path: Path, absolute: bool) -> None:
    csv_path = make_chexpert_layout(tmp_path / "cx", [ChexpertRow(1), ChexpertRow(2)])
    secret = write_image(tmp_path / "cx" / "secret.jpg")  # beside the dataset folder, not in it
    frame = pd.read_csv(csv_path)
    frame.loc[1, "Path"] = str(secret) if absolute else "CheXpert-v1.0-small/../../secret.jpg"
    frame.to_csv(csv_path, index=False)
    ds, report = load_chexpert(tmp_path / "cx", return_report=True)
    assert len(ds) == 1 and report.skipped[OUTSIDE] == 1
    with pytest.raises(ValueError, match=r"train.csv line 3 .*Path leads outside"):
        load_chexpert(tmp_path / "cx", strict=True)


def test_own_list_keeps_outside_paths_only_when_asked(tmp_path: Path) -> None:
    write_image(tmp_path / "outside.png")
    write_image(tmp_path / "lists" / "inside.png")
    records = [{"image": "inside.png", "text": "Clear."}, {"image": "../outside.png", "text": "Effusion."},
               {"image": str(tmp_path / "outside.png"), "text": "Edema."}]
    (tmp_path / "lists" / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ds, report = load_image_text(tmp_path / "lists" / "l.jsonl", return_report=True)
    assert ds["text"] == ["Clear."] and report.skipped[OUTSIDE] == 2
    assert "l.jsonl line 2 (image=../outside.png): image leads outside" in _examples(report, OUTSIDE)
    ds = load_image_text(tmp_path / "lists" / "l.jsonl", allow_outside_root=True)
    assert ds["text"] == ["Clear.", "Effusion.", "Edema."]


# ----------------------------------------------------------------------------------------------------------------------
# Lists read as written
# ----------------------------------------------------------------------------------------------------------------------
def test_jsonl_texts_are_read_as_written(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    lines = ['{"image": "a.png", "text": null}', '{"image": "a.png"}', '{"image": "a.png", "text": "None"}',
             '{"image": "a.png", "text": "nan"}', '{"text": "no image here"}', "",
             '{"image": "a.png", "text": "Clear.", "effusion": null}']
    (tmp_path / "l.jsonl").write_text("\n".join(lines) + "\n")
    ds, report = load_image_text(tmp_path / "l.jsonl", label_columns=None, return_report=True)
    assert ds["text"] == ["None", "nan", "Clear."]
    assert report.skipped == {BadRowReason.MISSING_REPORT: 2, BadRowReason.MISSING_IMAGE: 1}
    missing = _examples(report, BadRowReason.MISSING_REPORT)
    assert "l.jsonl line 1 (image=a.png): field 'text' is null" in missing and "l.jsonl line 2 " in missing
    no_image = _examples(report, BadRowReason.MISSING_IMAGE)
    assert "l.jsonl line 5 (image=None): no image path in field 'image'" in no_image
    with pytest.raises(ValueError, match=r"l.jsonl line 5 \(image=None\): no image path in field 'image'"):
        load_image_text(tmp_path / "l.jsonl", strict=True)
    (tmp_path / "null.jsonl").write_text("\n".join(lines[:4]) + "\n")
    with pytest.raises(ValueError, match=r"null.jsonl line 1 \(image=a.png\): field 'text' is null, not a text"):
        load_image_text(tmp_path / "null.jsonl", strict=True)
    # a null or missing label is blank (NaN), not the unparsable text "None"
    ds = load_image_text(tmp_path / "l.jsonl", label_columns=["effusion"])
    assert ds["text"] == ["None", "nan", "Clear."] and all(math.isnan(value) for value in ds["effusion"])
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "text": "ok"}\n{"image": "a.png", "text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not JSON"):
        load_image_text(tmp_path / "bad.jsonl")


def test_csv_line_numbers_count_quoted_line_breaks(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text('image,text\na.png,"Small effusion.\nNo pneumothorax."\n\nmissing.png,Clear.\n'
                                    'a.png,None\n')
    ds, report = load_image_text(tmp_path / "l.csv", return_report=True)
    assert ds["text"] == ["Small effusion.\nNo pneumothorax.", "None"]
    assert _examples(report, BadRowReason.MISSING_IMAGE).startswith("l.csv line 5 (image=missing.png)")


BROKEN_CSVS = {
    "empty": (b"", r"l.csv is empty"),
    "header only": (b"image,text\n", r"l.csv has a header but no rows"),
    "latin-1": ("image,text\na.png,Clear.\na.png,Épanchement.\n".encode("latin-1"), r"l.csv line 3: not UTF-8"),
    "badly quoted": (b'image,text\na.png,"Clear.\n', r"l.csv: not a well-formed CSV file .*EOF inside string"),
    "extra field": (b"image,text\na.png,Clear.\na.png,Clear.,x,y\n", r"l.csv: not a well-formed CSV .*line 3"),
}


@pytest.mark.parametrize("content, message", BROKEN_CSVS.values(), ids=BROKEN_CSVS.keys())
def test_a_broken_csv_is_named(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "l.csv").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_image_text(tmp_path / "l.csv")


def test_a_broken_dataset_csv_is_named(tmp_path: Path) -> None:
    root = make_rsna_layout(tmp_path / "rsna")
    (root / "stage_2_train_labels.csv").write_bytes(b"patientId,x,y,width,height,Target\n")
    with pytest.raises(ValueError, match=r"stage_2_train_labels.csv has a header but no rows"):
        load_rsna(root)


# ----------------------------------------------------------------------------------------------------------------------
# Repeated rows are reported
# ----------------------------------------------------------------------------------------------------------------------
def _append(path: Path, rows: list[dict]) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    pd.concat([frame, pd.DataFrame(rows)]).to_csv(path, index=False)


def test_mimic_repeated_rows_are_reported(tmp_path: Path) -> None:
    layout = make_mimic_layout(tmp_path, compress=False)
    # d1 listed twice alike (line 9), d3 in two splits (lines 4 and 10)
    _append(layout.csv_paths["split"], [dict(dicom_id="d1", study_id="50000001", subject_id="10000032", split="train"),
                                        dict(dicom_id="d3", study_id="50000002", subject_id="10000032", split="test")])
    # d7 given two views; study 50000001's labels given twice, differently
    _append(layout.csv_paths["metadata"], [dict(dicom_id="d7", ViewPosition="LATERAL")])
    _append(layout.csv_paths["chexpert"], [{"subject_id": "10000032", "study_id": "50000001",
                                            "Pleural Effusion": "0.0"}])
    ds, report = load_mimic_cxr(tmp_path, split=None, return_report=True)
    assert report.skipped[BadRowReason.DUPLICATE_ROW] == 1 + 2 + 2 + 2
    examples = _examples(report, BadRowReason.DUPLICATE_ROW)
    assert "split.csv line 9 (dicom_id=d1): image dicom_id=d1 repeats mimic-cxr-2.0.0-split.csv line 2" in examples
    assert "image dicom_id=d3 is given more than once, differently (split: 'train' vs 'test')" in examples
    assert sorted(ds["train"]["dicom_id"]) == ["d1"]  # d3 dropped (ambiguous split), d7 has no view it can trust
    assert math.isnan(ds["train"][0]["Pleural Effusion"])  # conflicting labels: none kept
    with pytest.raises(ValueError, match=r"split.csv line 4 \(dicom_id=d3\): image dicom_id=d3 is given more"):
        load_mimic_cxr(tmp_path, strict=True)
    for name in report.examples[BadRowReason.DUPLICATE_ROW]:
        assert name.startswith("mimic-cxr-2.0.0-")  # every report names the file


def test_chexpert_repeated_path_is_reported(tmp_path: Path) -> None:
    csv_path = make_chexpert_layout(tmp_path, [ChexpertRow(1), ChexpertRow(2)])
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    pd.concat([frame, frame.iloc[[0]]]).to_csv(csv_path, index=False)
    ds, report = load_chexpert(tmp_path, return_report=True)
    assert len(ds) == 2 and report.skipped == {BadRowReason.DUPLICATE_ROW: 1}
    assert "train.csv line 4" in _examples(report, BadRowReason.DUPLICATE_ROW)


def test_a_relative_dataset_folder_reads_its_images(tmp_path, monkeypatch):
    """The inside-the-root check joins paths to the absolute root: a relative data folder (as the command lines
    accept) must not be joined twice."""
    from plan_hf.data.synthetic import generate_synthetic

    generate_synthetic(tmp_path / "data", num_images=6, seed=0, image_size=64, workers=1, lateral_fraction=0.0,
                       contact_sheet=False)
    monkeypatch.chdir(tmp_path)
    from plan_hf.data.loaders import load_mimic_cxr

    relative, absolute = load_mimic_cxr("data", split=None), load_mimic_cxr(tmp_path / "data", split=None)
    assert sum(map(len, relative.values())) == sum(map(len, absolute.values())) == 6
