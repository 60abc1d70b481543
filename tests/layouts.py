"""Tiny on-disk copies of the published dataset layouts (DATA_FORMATS.md), written into a test's tmp_path.

Each ``make_*_layout`` writes the real file names, CSV headers and folder structure with a handful of rows and tiny
images, and returns what it wrote so that tests can compare. Defaults cover the usual cases; arguments let a test add
the bad row it is about (a missing image, a corrupt file, an empty report, a missing column).
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
    "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
# CheXpert's own CSV column order (differs from MIMIC's alphabetical one).
CHEXPERT_CSV_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)


# ---------------------------------------------------------------------------------------------------------------
# Files


def write_image(path: Path, size: tuple[int, int] = (24, 20), seed: int = 0, mode: str = "L") -> Path:
    """A small random grey image; JPEG or PNG by suffix. ``mode="I;16"`` writes a 16-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8), mode="L").convert(mode)
    image.save(path)
    return path


def write_corrupt_image(path: Path) -> Path:
    """A file with an image suffix whose content is not a decodable image (a truncated JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[:60])
    return path


def write_dicom(
    path: Path,
    pixels: np.ndarray | None = None,
    shape: tuple[int, int] = (16, 16),
    photometric: str = "MONOCHROME2",
    seed: int = 0,
) -> Path:
    """A minimal valid DICOM (Explicit VR Little Endian) with uint8 or uint16 pixels (default: random uint16)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    if pixels is None:
        pixels = np.random.default_rng(seed).integers(0, 4096, shape, dtype=np.uint16)
    bits = pixels.dtype.itemsize * 8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = path.stem
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]], header_line: str | None = None) -> Path:
    """Write a CSV (gzip-compressed when ``path`` ends in ``.gz``); ``header_line`` overrides the header verbatim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header_line is None:
        writer.writerow(header)
    else:
        buffer.write(header_line + "\n")
    for row in rows:
        writer.writerow(["" if value is None else value for value in row])
    data = buffer.getvalue().encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# ---------------------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG + reports

MIMIC_REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // eval for pneumonia

 COMPARISON:  ___.

 FINDINGS:

 There is a small left pleural effusion.  The heart size is normal.  A 1.5 cm
 nodule projects over the right upper lobe.

 IMPRESSION:

 Small left effusion.
"""
MIMIC_REPORT_IMPRESSION_ONLY = """                                 FINAL REPORT
 INDICATION:  Line placement.

 IMPRESSION:  Right IJ line ends in the SVC.  No pneumothorax.
"""
MIMIC_REPORT_NUMBERED = """ FINAL REPORT
 HISTORY:  Shortness of breath.

 FINDINGS:  Lungs are hyperinflated.

 IMPRESSION:
 1. Emphysema.
 2. No acute process.
"""
MIMIC_REPORT_NO_TEXT = """                                 FINAL REPORT
 EXAMINATION:  CHEST PORTABLE

 INDICATION:  ___ year old man with fever.

 COMPARISON:  None.
"""


@dataclass
class MimicImage:
    dicom_id: str
    subject_id: int
    study_id: int
    split: str
    view: str = "PA"

    @property
    def study_dir(self) -> str:
        return f"files/p{str(self.subject_id)[:2]}/p{self.subject_id}/s{self.study_id}"


DEFAULT_MIMIC_IMAGES = (
    MimicImage("d1", 10000032, 50000001, "train", "PA"),
    MimicImage("d2", 10000032, 50000001, "train", "LATERAL"),
    MimicImage("d3", 10000032, 50000002, "train", "AP"),
    MimicImage("d4", 11000011, 51000001, "validate", "PA"),
    MimicImage("d5", 12000022, 52000001, "test", "PA"),
    MimicImage("d6", 12000022, 52000001, "test", ""),
    MimicImage("d7", 13000033, 53000001, "train", "AP"),
)
DEFAULT_MIMIC_REPORTS: dict[int, str | None] = {
    50000001: MIMIC_REPORT_FULL,
    50000002: MIMIC_REPORT_IMPRESSION_ONLY,
    51000001: MIMIC_REPORT_NUMBERED,
    52000001: MIMIC_REPORT_FULL,
    53000001: MIMIC_REPORT_NUMBERED,
}
# study → {label: value}; other labels blank
DEFAULT_MIMIC_LABELS: dict[int, dict[str, float]] = {
    50000001: {"Pleural Effusion": 1.0, "Cardiomegaly": 0.0, "Lung Lesion": -1.0},
    50000002: {"Support Devices": 1.0, "Pneumothorax": 0.0},
    51000001: {"No Finding": 1.0},
    53000001: {"No Finding": 1.0},
}


@dataclass
class MimicLayout:
    root: Path
    images: list[MimicImage]
    reports: dict[int, str | None]
    labels: dict[int, dict[str, float]]
    csv_paths: dict[str, Path] = field(default_factory=dict)


def make_mimic_layout(
    root: Path,
    images: Sequence[MimicImage] = DEFAULT_MIMIC_IMAGES,
    reports: Mapping[int, str | None] = DEFAULT_MIMIC_REPORTS,
    labels: Mapping[int, Mapping[str, float]] = DEFAULT_MIMIC_LABELS,
    compress: bool = True,
    skip_images: Iterable[str] = (),
    corrupt_images: Iterable[str] = (),
    metadata_columns: Sequence[str] = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                                       "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime"),
    reports_root: Path | None = None,
) -> MimicLayout:
    """MIMIC-CXR-JPG under ``root`` (images ``files/p../p../s../<dicom_id>.jpg`` + the three CSVs) and the report
    ``.txt`` files under ``reports_root`` (default ``root``). A report ``None`` is not written (missing report)."""
    skip, corrupt = set(skip_images), set(corrupt_images)
    for index, image in enumerate(images):
        path = root / image.study_dir / f"{image.dicom_id}.jpg"
        if image.dicom_id in corrupt:
            write_corrupt_image(path)
        elif image.dicom_id not in skip:
            write_image(path, seed=index)
    for image in images:
        text = reports.get(image.study_id)
        if text is not None:
            report_path = (reports_root or root) / f"{image.study_dir}.txt"
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(text)
    suffix = ".csv.gz" if compress else ".csv"
    csv_paths = {
        "split": write_csv(
            root / f"mimic-cxr-2.0.0-split{suffix}", ("dicom_id", "study_id", "subject_id", "split"),
            [(i.dicom_id, i.study_id, i.subject_id, i.split) for i in images],
        ),
    }
    metadata_values = {
        "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "Rows": 20, "Columns": 24, "StudyDate": 21800506,
        "StudyTime": 213014.531,
    }
    csv_paths["metadata"] = write_csv(
        root / f"mimic-cxr-2.0.0-metadata{suffix}", metadata_columns,
        [
            [
                {"dicom_id": i.dicom_id, "subject_id": i.subject_id, "study_id": i.study_id, "ViewPosition": i.view}
                .get(column, metadata_values.get(column, ""))
                for column in metadata_columns
            ]
            for i in images
        ],
    )
    studies = sorted({(i.subject_id, i.study_id) for i in images})
    csv_paths["chexpert"] = write_csv(
        root / f"mimic-cxr-2.0.0-chexpert{suffix}", ("subject_id", "study_id", *CHEXPERT_LABELS),
        [
            (subject, study, *(labels.get(study, {}).get(name) for name in CHEXPERT_LABELS))
            for subject, study in studies
        ],
    )
    return MimicLayout(root, list(images), dict(reports), {k: dict(v) for k, v in labels.items()}, csv_paths)


# ---------------------------------------------------------------------------------------------------------------
# CheXpert


@dataclass
class ChexpertRow:
    patient: int
    study: int = 1
    view: int = 1
    frontal: bool = True
    ap_pa: str = "AP"
    labels: dict[str, float] = field(default_factory=dict)
    sex: str = "Female"
    age: int = 60

    def path(self, split: str, folder: str = "CheXpert-v1.0-small") -> str:
        kind = "frontal" if self.frontal else "lateral"
        return f"{folder}/{split}/patient{self.patient:05d}/study{self.study}/view{self.view}_{kind}.jpg"


def make_chexpert_layout(
    root: Path,
    rows: Sequence[ChexpertRow],
    split: str = "train",
    folder: str = "CheXpert-v1.0-small",
    skip_images: Iterable[int] = (),
) -> Path:
    """``root/<folder>/{split}.csv`` + the images it names; returns the CSV path. ``skip_images``: row indices."""
    skip = set(skip_images)
    dataset_dir = root / folder
    for index, row in enumerate(rows):
        if index not in skip:
            write_image(root / row.path(split, folder), size=(12, 10), seed=index)
    return write_csv(
        dataset_dir / f"{split}.csv",
        ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_CSV_LABELS),
        [
            (
                row.path(split, "CheXpert-v1.0-small"), row.sex, row.age, "Frontal" if row.frontal else "Lateral",
                row.ap_pa if row.frontal else "", *(row.labels.get(name) for name in CHEXPERT_CSV_LABELS),
            )
            for row in rows
        ],
    )


def chexpert_5x200_rows(n_per_class: int, distractors: bool = True) -> list[ChexpertRow]:
    """Rows with ``n_per_class`` clean candidates per 5x200 class, plus rows that must never be drawn: laterals,
    images positive for two of the five, and uncertain-only ones."""
    classes = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    rows: list[ChexpertRow] = []
    patient = 1
    for name in classes:
        for k in range(n_per_class):
            others = {other: (0.0 if k % 2 else -1.0) for other in classes if other != name}
            rows.append(ChexpertRow(patient, labels={name: 1.0, **others}))
            patient += 1
    if distractors:
        for name in classes:
            rows.append(ChexpertRow(patient, frontal=False, view=2, labels={name: 1.0}))
            second = "Edema" if name != "Edema" else "Atelectasis"
            rows.append(ChexpertRow(patient + 1, labels={name: 1.0, second: 1.0}))
            rows.append(ChexpertRow(patient + 2, labels={name: -1.0}))
            patient += 3
    return rows


# ---------------------------------------------------------------------------------------------------------------
# MS-CXR

MS_CXR_HEADER = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")


def make_ms_cxr_layout(
    root: Path,
    rows: Sequence[Mapping[str, Any]] | None = None,
    with_split: bool = False,
    skip_images: Iterable[str] = (),
) -> Path:
    """MS-CXR CSV at ``root/MS_CXR_Local_Alignment_v1.0.0.csv`` and its MIMIC-CXR-JPG images under
    ``root/mimic``; returns the CSV path. Rows default to two phrases on one image (one with two boxes) and one
    phrase on another image."""
    if rows is None:
        rows = [
            dict(dicom_id="m1", category_name="Pleural Effusion", label_text="bilateral effusions",
                 x=2, y=10, w=5, h=6, split="train"),
            dict(dicom_id="m1", category_name="Pleural Effusion", label_text="bilateral effusions",
                 x=14, y=11, w=6, h=5, split="train"),
            dict(dicom_id="m1", category_name="Cardiomegaly", label_text="enlarged heart",
                 x=8, y=6, w=9, h=8, split="train"),
            dict(dicom_id="m2", category_name="Pneumothorax", label_text="left apical pneumothorax",
                 x=15, y=1, w=6, h=4, split="test"),
        ]
    skip = set(skip_images)
    lines = []
    for index, row in enumerate(rows):
        relative = f"files/p10/p10000099/s5000009{index}/{row['dicom_id']}.jpg"
        relative = next((line[3] for line in lines if line[0] == row["dicom_id"]), relative)
        image_path = root / "mimic" / relative
        if row["dicom_id"] not in skip and not image_path.exists():
            write_image(image_path, size=(24, 20), seed=index)
        line = [row["dicom_id"], row["category_name"], row["label_text"], relative, row["x"], row["y"], row["w"],
                row["h"], row.get("image_width", 24), row.get("image_height", 20)]
        lines.append(line + ([row.get("split", "train")] if with_split else []))
    header = MS_CXR_HEADER + (("split",) if with_split else ())
    return write_csv(root / "MS_CXR_Local_Alignment_v1.0.0.csv", header, lines)


# ---------------------------------------------------------------------------------------------------------------
# RSNA Pneumonia, SIIM-ACR Pneumothorax


def make_rsna_layout(
    root: Path,
    patients: Mapping[str, Sequence[Sequence[float]]] | None = None,
    skip_images: Iterable[str] = (),
    shape: tuple[int, int] = (16, 16),
) -> Path:
    """``stage_2_train_labels.csv`` (one row per box; a box-less patient has one ``Target=0`` row) and
    ``stage_2_train_images/<patientId>.dcm``; returns ``root``."""
    if patients is None:
        patients = {"p-neg": [], "p-one": [[1, 2, 5, 6]], "p-two": [[0, 0, 4, 4], [8, 9, 3, 5]]}
    skip = set(skip_images)
    rows = []
    for index, (patient, boxes) in enumerate(patients.items()):
        if patient not in skip:
            write_dicom(root / "stage_2_train_images" / f"{patient}.dcm", shape=shape, seed=index)
        rows.extend([(patient, *box, 1) for box in boxes] or [(patient, None, None, None, None, 0)])
    write_csv(root / "stage_2_train_labels.csv", ("patientId", "x", "y", "width", "height", "Target"), rows)
    return root


def make_siim_layout(
    root: Path,
    images: Mapping[str, Sequence[str]] | None = None,
    shape: tuple[int, int] = (8, 10),
    skip_images: Iterable[str] = (),
) -> Path:
    """``train-rle.csv`` (header ``ImageId, EncodedPixels`` with its space; ``-1`` rows for empty masks, one row
    per mask otherwise) and ``dicom-images-train/<study>/<series>/<ImageId>.dcm``; returns ``root``."""
    if images is None:
        images = {"1.2.3.1": ["-1"], "1.2.3.2": ["0 3 5 2"], "1.2.3.3": ["1 2", "30 4"]}
    skip = set(skip_images)
    rows = []
    for index, (image_id, rles) in enumerate(images.items()):
        if image_id not in skip:
            write_dicom(root / "dicom-images-train" / f"1.2.{index}" / f"1.3.{index}" / f"{image_id}.dcm", shape=shape,
                        seed=index)
        rows.extend((image_id, f" {rle}") for rle in rles)
    write_csv(root / "train-rle.csv", (), rows, header_line="ImageId, EncodedPixels")
    return root
