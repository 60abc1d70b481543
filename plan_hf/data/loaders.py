"""Loaders for the published chest X-ray layouts (see DATA_FORMATS.md) into `datasets` objects.

Every loader builds its index from the dataset's CSV files (never by walking hundreds of thousands of image files;
SIIM, ~12k DICOMs without a path column, is the one directory scan), checks that the image files exist
(``check_files``), and returns rows whose images are decoded only when a row is read:

- JPEG/PNG: an ``image`` column of `datasets.Image()` over the file paths (PIL images on access).
- DICOM (RSNA, SIIM, a user's ``.dcm`` list): an ``image_path`` column, and a transform
  (`datasets.Dataset.with_transform`) that adds ``image`` -- float32 (H, W) in [0, 1] from
  `plan_hf.image_processing_plan.read_dicom` (rescale, VOI LUT, MONOCHROME1 inverted, full bit depth kept). Note
  that `datasets` runs a transform for *every* column access, so read metadata columns through
  ``ds.with_format(None)``, which decodes nothing.

Labels keep their published names (``"Pleural Effusion"``, ``"No Finding"``, ...; `CHEXPERT_LABELS`) as float32
columns: 1.0 positive, 0.0 negative, -1.0 uncertain, NaN blank. Other columns are snake_case.

Common keyword arguments: ``strict`` / ``return_report`` (bad rows, see `plan_hf.data.bad_rows`), ``check_files``
(stat each image while indexing; off for slow network file systems, at the price of failures at read time),
``verify`` (decode every image once now, `validate_images`), ``streaming`` (return an `IterableDataset` /
`IterableDatasetDict` that reads rows in order without materialising anything beyond the index).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import pandas as pd
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    IterableDataset,
    IterableDatasetDict,
    List,
    Value,
)
from tqdm.auto import tqdm

from .labels import CHEXPERT_5X200_CLASSES, CHEXPERT_LABELS
from .bad_rows import (
    BadRowReason,
    LoadReport,
    RowFilter,
    keep_under_root,
    logger,
    read_dicom_image,
    require_columns,
    validate_images,
    with_locations,
)
from .reports import join_text, parse_report, report_text
from .rle import rle_decode, rle_encode

__all__ = [
    "CHEXPERT_5X200_CLASSES",
    "CHEXPERT_LABELS",
    "DicomDecoder",
    "MIMIC_SPLITS",
    "build_chexpert_5x200",
    "load_chexpert",
    "load_image_text",
    "load_mimic_cxr",
    "load_ms_cxr",
    "load_rsna",
    "load_siim",
    "rle_decode",
    "rle_encode",
    "validate_images",
]

MIMIC_SPLITS: tuple[str, ...] = ("train", "validate", "test")

AnyDataset = Union[Dataset, DatasetDict, IterableDataset, IterableDatasetDict]
# What every loader returns: the data, or ``(data, LoadReport)`` with ``return_report=True``.
LoadResult = Union[AnyDataset, tuple[AnyDataset, LoadReport]]


# ----------------------------------------------------------------------------------------------------------------
# Shared plumbing


class DicomDecoder:
    """The lazy transform of the DICOM loaders: adds ``image`` (float32 (H, W) in [0, 1]) from ``image_path``.

    With ``masks_column`` (SIIM) it also adds ``mask``: the union of that column's RLE strings, bool (H, W) at the
    decoded image's size. A class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, masks_column: str | None = None) -> None:
        self.masks_column = masks_column

    def decode_example(self, example: dict[str, Any]) -> dict[str, Any]:
        image = read_dicom_image(example["image_path"])
        decoded = {**example, "image": image}
        if self.masks_column is not None:
            height, width = image.shape[-2:]
            mask = np.zeros((height, width), dtype=bool)
            for rle in example[self.masks_column]:
                mask |= rle_decode(rle, height, width)
            decoded["mask"] = mask
        return decoded

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        size = len(batch["image_path"])
        rows = [self.decode_example({key: values[i] for key, values in batch.items()}) for i in range(size)]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else dict(batch)


def _read_text(path: Path) -> str:
    """A text file (plain or .gz) as UTF-8; `ValueError` naming the file (and the line) when it is not."""
    data = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: not a readable .gz file ({error})") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                         f"{error.start}; save the file as UTF-8)") from error


def _record_lines(text: str, separator: str) -> list[int]:
    """The line each CSV record starts on (the header's left out), as an editor numbers lines: a quoted field
    may span lines, and blank lines (which pandas skips) are counted."""
    reader = csv.reader(io.StringIO(text), delimiter=separator)
    starts, end = [], 0
    for record in reader:
        if record:
            starts.append(end + 1)
        end = reader.line_num
    return starts[1:]


def _read_table(path: Path, separator: str = ",") -> pd.DataFrame:
    """Read a CSV (plain or .gz) as strings, blanks as ``""`` (values are parsed per column, with checks), with a
    ``_line`` column (the line each row starts on). A file that is empty, has no rows, is not UTF-8 or is not
    well-formed CSV is a `ValueError` naming it (and the line, where pandas says which)."""
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"{path} is empty")
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False,
                            skipinitialspace=True, sep=separator)
    except (pd.errors.ParserError, csv.Error, ValueError) as error:
        raise ValueError(f"{path}: not a well-formed CSV file ({str(error).strip()})") from error
    if frame.empty:
        raise ValueError(f"{path} has a header but no rows")
    frame.columns = [str(column).strip() for column in frame.columns]  # SIIM's header is "ImageId, EncodedPixels"
    lines = _record_lines(text, separator)
    frame["_line"] = lines if len(lines) == len(frame) else np.arange(len(frame)) + 2
    return frame


def _find_file(folder: Path, name: str) -> Path:
    """``folder/name`` or ``folder/name.gz``."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"neither {folder / name} nor {folder / name}.gz exists")


def _parse_numbers(
    frame: pd.DataFrame, columns: Iterable[str], rows: RowFilter, file_name: str, integer: bool = False
) -> pd.DataFrame:
    """Parse string columns to numbers: blank → NaN; anything else unparsable is a bad row (invalid value)."""
    for column in columns:
        text = frame[column].astype(str).str.strip()
        values = pd.to_numeric(text, errors="coerce")
        unparsable = values.isna() & (text != "")
        if integer:  # ids and sizes may not be blank or fractional
            unparsable |= values.isna() | (values % 1 != 0)
        frame = rows.drop(
            frame.assign(**{column: values}),
            unparsable.to_numpy(),
            BadRowReason.INVALID_VALUE,
            lambda row, column=column, text=text: f"column {column!r} needs a number, got {text[row.name]!r}",
        )
        if integer:
            frame = frame.assign(**{column: frame[column].astype("int64")})
    return frame


def _drop_missing_files(frame: pd.DataFrame, column: str, rows: RowFilter, check_files: bool) -> pd.DataFrame:
    if not check_files or frame.empty:
        return frame
    exists = np.fromiter((os.path.isfile(path) for path in frame[column]), dtype=bool, count=len(frame))
    return rows.drop(frame, ~exists, BadRowReason.MISSING_IMAGE, lambda row: f"missing image file {row[column]}")


def _label_features(names: Iterable[str]) -> dict[str, Value]:
    return {name: Value("float32") for name in names}


def _to_dataset(frame: pd.DataFrame, features: Mapping[str, Any]) -> Dataset:
    """Build a Dataset with exactly ``features`` (column order included) from the matching frame columns."""
    data = {name: frame[name].tolist() for name in features}
    return Dataset.from_dict(data, features=Features(dict(features)))


def _finish(
    datasets_by_split: Mapping[str, Dataset] | Dataset,
    rows: RowFilter,
    *,
    decoder: DicomDecoder | None = None,
    verify: bool = False,
    num_workers: int = 8,
    streaming: bool = False,
    return_report: bool = False,
) -> Any:
    """The common tail of every loader: verify, attach the lazy decoder, stream, log and return the report."""
    single = isinstance(datasets_by_split, Dataset)
    splits: dict[str, Dataset] = (
        {"_": datasets_by_split} if isinstance(datasets_by_split, Dataset) else dict(datasets_by_split)
    )
    if verify:
        splits = {name: validate_images(ds, num_workers=num_workers, row_filter=rows) for name, ds in splits.items()}
    report: LoadReport = rows.finish(sum(len(ds) for ds in splits.values()))
    result: dict[str, Any] = {}
    for name, ds in splits.items():
        if streaming:
            iterable = ds.to_iterable_dataset()
            result[name] = iterable.map(decoder.decode_example) if decoder is not None else iterable
        else:
            result[name] = ds.with_transform(decoder) if decoder is not None else ds
    output: Any = result["_"] if single else (IterableDatasetDict(result) if streaming else DatasetDict(result))
    return (output, report) if return_report else output


# ----------------------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG + reports


def _files_dir(root: Path) -> Path:
    """``root/files`` when ``root`` is the dataset folder, ``root`` itself when it already is ``files/``."""
    return root if root.name == "files" and not (root / "files").is_dir() else root / "files"


def load_mimic_cxr(
    root: str | os.PathLike[str],
    split: Literal["train", "validate", "test"] | None = None,
    views: Sequence[str] | None = ("PA", "AP"),
    sections: Sequence[str] = ("findings", "impression"),
    fallback: Literal["last"] | None = None,
    strict: bool = False,
    reports_root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
    verify: bool = False,
    streaming: bool = False,
    return_report: bool = False,
    num_workers: int = 8,
) -> LoadResult:
    """MIMIC-CXR-JPG 2.0.0 images with their report text and CheXpert labels.

    ``root`` holds ``files/`` and the three ``mimic-cxr-2.0.0-{split,metadata,chexpert}.csv[.gz]`` files;
    ``reports_root`` (default ``root``) holds the reports' ``files/pXX/pSUBJECT/sSTUDY.txt``. The chexpert CSV is
    optional (labels are then NaN, and a warning is logged).

    ``split=None`` returns a `DatasetDict` with ``train``/``validate``/``test`` kept apart; a split name returns that
    `Dataset`. ``views`` keeps rows whose ``ViewPosition`` is one of them (``None`` keeps all); a blank or missing
    ``ViewPosition`` is not frontal and is left out whenever ``views`` is given. ``sections`` and ``fallback`` choose
    the text (`report_text`); a report with none of them is an empty report.

    Columns: ``image`` (Image), ``text``, ``dicom_id``, ``study_id``, ``subject_id``, ``split``, ``view_position``,
    then the 14 `CHEXPERT_LABELS` (float32, NaN blank). Bad rows: missing image, missing report file, empty report,
    unparsable id or split; an unparsable label drops that chexpert CSV row (the study's labels become NaN, its
    images stay).
    """
    if split is not None and split not in MIMIC_SPLITS:
        raise ValueError(f"split must be one of {MIMIC_SPLITS} or None, got {split!r}")
    root = Path(root).absolute()  # image paths are joined to it, then checked to stay inside it
    images_dir = _files_dir(root)
    reports_dir = _files_dir(Path(reports_root)) if reports_root is not None else images_dir
    csv_dir = root.parent if root.name == "files" else root
    rows = RowFilter(f"load_mimic_cxr({root})", strict)

    split_path = _find_file(csv_dir, "mimic-cxr-2.0.0-split.csv")
    frame = _read_table(split_path)
    require_columns(frame, ("dicom_id", "study_id", "subject_id", "split"), split_path)
    frame = with_locations(frame, split_path.name, "dicom_id")
    frame = rows.drop_duplicates(frame, ["dicom_id"], ["study_id", "subject_id", "split"], what="image")
    meta_path = _find_file(csv_dir, "mimic-cxr-2.0.0-metadata.csv")
    metadata = _read_table(meta_path)
    require_columns(metadata, ("dicom_id", "ViewPosition"), meta_path)
    metadata = with_locations(metadata.assign(ViewPosition=metadata["ViewPosition"].str.strip().str.upper()),
                              meta_path.name, "dicom_id")
    # an image given two views has none we could trust: it is left without one (and out of a views filter)
    metadata = rows.drop_duplicates(metadata, ["dicom_id"], ["ViewPosition"], what="image")

    frame = rows.drop(
        frame, ~frame["split"].isin(MIMIC_SPLITS).to_numpy(), BadRowReason.INVALID_VALUE,
        lambda row: f"split must be one of {MIMIC_SPLITS}, got {row['split']!r}",
    )
    if split is not None:
        frame = frame[frame["split"] == split]
    view_by_dicom = dict(zip(metadata["dicom_id"], metadata["ViewPosition"]))
    frame = frame.assign(view_position=frame["dicom_id"].map(view_by_dicom).fillna(""))
    if views is not None:  # a filter, not a bad row: lateral views are not errors
        frame = frame[frame["view_position"].isin([view.upper() for view in views])]
    frame = _parse_numbers(frame, ("study_id", "subject_id"), rows, split_path.name, integer=True)

    try:
        chexpert_path: Path | None = _find_file(csv_dir, "mimic-cxr-2.0.0-chexpert.csv")
    except FileNotFoundError:
        chexpert_path = None
        logger.warning("load_mimic_cxr: no mimic-cxr-2.0.0-chexpert.csv[.gz] in %s; the labels are NaN", csv_dir)
    if chexpert_path is not None:
        labels = _read_table(chexpert_path)
        require_columns(labels, ("subject_id", "study_id", *CHEXPERT_LABELS), chexpert_path)
        labels = with_locations(labels, chexpert_path.name, "study_id")
        labels = _parse_numbers(labels, ("study_id", "subject_id"), rows, chexpert_path.name, integer=True)
        labels = _parse_numbers(labels, CHEXPERT_LABELS, rows, chexpert_path.name)
        labels = rows.drop_duplicates(labels, ["subject_id", "study_id"], CHEXPERT_LABELS, what="study")
        labels = labels.drop(columns=["_where", "_line"])
        frame = frame.merge(labels, on=["subject_id", "study_id"], how="left")
    else:
        frame = frame.assign(**{name: np.nan for name in CHEXPERT_LABELS})

    subject = frame["subject_id"].astype(str)
    study_dirs = ("p" + subject.str[:2] + "/p" + subject + "/s" + frame["study_id"].astype(str)).tolist()
    frame = frame.assign(
        image_path=[str(images_dir / d / f"{dicom}.jpg") for d, dicom in zip(study_dirs, frame["dicom_id"])],
        report_path=[str(reports_dir / f"{d}.txt") for d in study_dirs],
    )
    frame = keep_under_root(frame, "image_path", images_dir, rows, "dicom_id")
    frame = _drop_missing_files(frame, "image_path", rows, check_files)

    # Reports are small: read each study's once, now, so that empty reports are known before training starts.
    texts: dict[str, str | None] = {}
    for path in tqdm(frame["report_path"].unique(), desc="Reading reports", unit="report", leave=False):
        try:
            texts[path] = report_text(parse_report(Path(path).read_text(errors="replace")), sections, fallback)
        except FileNotFoundError:
            texts[path] = None
    text = [texts[path] for path in frame["report_path"]]
    frame = frame.assign(text=pd.Series(text, index=frame.index, dtype=object))
    frame = rows.drop(
        frame, np.array([value is None for value in text], dtype=bool), BadRowReason.MISSING_REPORT,
        lambda row: f"missing report file {row['report_path']}",
    )
    frame = rows.drop(
        frame, np.array([not value.strip() for value in frame["text"]], dtype=bool), BadRowReason.EMPTY_REPORT,
        lambda row: f"report {row['report_path']} has no {' or '.join(sections)} text",
    )

    features = {
        "image": Image(),
        "text": Value("string"),
        "dicom_id": Value("string"),
        "study_id": Value("int64"),
        "subject_id": Value("int64"),
        "split": Value("string"),
        "view_position": Value("string"),
        **_label_features(CHEXPERT_LABELS),
    }
    frame = frame.rename(columns={"image_path": "image"})
    if split is not None:
        built: Any = _to_dataset(frame, features)
    else:
        built = {name: _to_dataset(frame[frame["split"] == name], features) for name in MIMIC_SPLITS}
    return _finish(
        built, rows, verify=verify, num_workers=num_workers, streaming=streaming, return_report=return_report
    )


# ----------------------------------------------------------------------------------------------------------------
# CheXpert


def _chexpert_dir(root: Path, csv_name: str) -> Path:
    """The folder holding ``train.csv``/``valid.csv``: ``root`` itself or the one sub-folder that holds it."""
    if (root / csv_name).is_file():
        return root
    candidates = sorted(path.parent for path in root.glob(f"*/{csv_name}"))
    if not candidates:
        raise FileNotFoundError(f"no {csv_name} in {root} or in a folder inside it")
    if len(candidates) > 1:  # e.g. CheXpert-v1.0 and CheXpert-v1.0-small side by side: don't guess
        raise ValueError(f"several folders in {root} hold {csv_name}; pass one as root: {[str(c) for c in candidates]}")
    return candidates[0]


def _resolve_chexpert_path(folder: Path, relative: str) -> str:
    # CSV paths start with the dataset folder's published name ("CheXpert-v1.0-small/train/..."); the CSV sits in
    # that folder, so drop the first part whatever the folder is called on this disk.
    parts = Path(relative).parts
    if len(parts) > 1 and parts[1] in ("train", "valid", "test"):
        parts = parts[1:]
    return str(folder.joinpath(*parts))


def load_chexpert(
    root: str | os.PathLike[str],
    split: Literal["train", "valid"] = "train",
    frontal_only: bool = True,
    uncertain: Literal["keep", "zeros", "ones"] = "keep",
    strict: bool = False,
    check_files: bool = True,
    verify: bool = False,
    streaming: bool = False,
    return_report: bool = False,
    num_workers: int = 8,
) -> LoadResult:
    """CheXpert 1.0 ``train.csv``/``valid.csv`` with images.

    ``root`` is the folder holding the CSVs (``CheXpert-v1.0-small``, under any name) or the one containing it.
    ``uncertain`` maps -1.0 labels: keep them, or make them 0.0 (U-Zeros) or 1.0 (U-Ones); blanks stay NaN either way.

    Columns: ``image`` (Image), ``path`` (the CSV's relative ``Path``), ``sex``, ``age`` (int32, -1 when blank),
    ``frontal_lateral``, ``view_position`` (the ``AP/PA`` column; blank for laterals), then the 14
    `CHEXPERT_LABELS` (float32). Bad rows: missing image, unparsable label.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    if uncertain not in ("keep", "zeros", "ones"):
        raise ValueError(f"uncertain must be 'keep', 'zeros' or 'ones', got {uncertain!r}")
    folder = _chexpert_dir(Path(root).absolute(), f"{split}.csv")
    csv_path = folder / f"{split}.csv"
    rows = RowFilter(f"load_chexpert({csv_path})", strict)
    frame = _read_table(csv_path)
    require_columns(frame, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS), csv_path)
    frame = with_locations(frame, csv_path.name, "Path")
    frame = rows.drop_duplicates(frame, ["Path"], what="image")
    if frontal_only:
        frame = frame[frame["Frontal/Lateral"].str.strip() == "Frontal"]
    frame = _parse_numbers(frame, CHEXPERT_LABELS, rows, csv_path.name)
    if uncertain != "keep":
        frame = frame.replace({name: {-1.0: 0.0 if uncertain == "zeros" else 1.0} for name in CHEXPERT_LABELS})
    age = pd.to_numeric(frame["Age"], errors="coerce").fillna(-1).astype("int32")
    frame = frame.assign(
        image=[_resolve_chexpert_path(folder, path) for path in frame["Path"]],
        path=frame["Path"],
        sex=frame["Sex"],
        age=age,
        frontal_lateral=frame["Frontal/Lateral"],
        view_position=frame["AP/PA"],
    )
    frame = keep_under_root(frame, "image", folder, rows, "Path")
    frame = _drop_missing_files(frame, "image", rows, check_files)
    features = {
        "image": Image(),
        "path": Value("string"),
        "sex": Value("string"),
        "age": Value("int32"),
        "frontal_lateral": Value("string"),
        "view_position": Value("string"),
        **_label_features(CHEXPERT_LABELS),
    }
    return _finish(
        _to_dataset(frame, features), rows, verify=verify, num_workers=num_workers, streaming=streaming,
        return_report=return_report,
    )


def build_chexpert_5x200(
    dataset_or_root: Dataset | str | os.PathLike[str],
    out_manifest: str | os.PathLike[str],
    n_per_class: int = 200,
    seed: int = 0,
    allow_fewer: bool = False,
) -> Dataset:
    """Draw CheXpert 5x200: ``n_per_class`` frontal images for each of `CHEXPERT_5X200_CLASSES`.

    A candidate for a class is frontal and positive (1.0) for that class and for none of the other four (their
    blank, 0.0 and -1.0 values are allowed). Candidates are ordered by path and drawn with
    ``numpy.random.default_rng(seed)``, so the draw depends only on the CSV and the seed. Writes ``out_manifest``
    (CSV: ``path``, ``class``; ``path`` as in CheXpert's CSV) and returns the rows with ``label``
    (ClassLabel over the five classes). A class with fewer than ``n_per_class`` candidates raises `ValueError`
    naming it and the counts, unless ``allow_fewer`` (then all its candidates are taken).

    ``dataset_or_root`` is a `load_chexpert` dataset (any split, uncertain labels kept) or a CheXpert root, which
    is loaded with ``load_chexpert(root, "train")``.
    """
    dataset = dataset_or_root if isinstance(dataset_or_root, Dataset) else load_chexpert(dataset_or_root, "train")
    plain = dataset.with_format(None)
    needed = ["path", *CHEXPERT_5X200_CLASSES]
    missing = [name for name in needed if name not in plain.column_names]
    if missing:
        raise ValueError(f"build_chexpert_5x200 needs a load_chexpert dataset; missing columns {missing}")
    table = plain.select_columns(needed + (["frontal_lateral"] if "frontal_lateral" in plain.column_names else []))
    frame = table.to_pandas()
    positive = frame[list(CHEXPERT_5X200_CLASSES)].to_numpy() == 1.0  # (N, 5), NaN compares False
    frontal = (frame["frontal_lateral"] == "Frontal").to_numpy() if "frontal_lateral" in frame else True
    exactly_one = frontal & (positive.sum(axis=1) == 1)

    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    labels: list[int] = []
    shortfalls: list[str] = []
    for class_index, name in enumerate(CHEXPERT_5X200_CLASSES):
        candidates = np.flatnonzero(exactly_one & positive[:, class_index])
        candidates = candidates[np.argsort(frame["path"].to_numpy()[candidates], kind="stable")]
        if len(candidates) < n_per_class:
            shortfalls.append(f"{name}: {len(candidates)} candidates < {n_per_class}")
            take = candidates
        else:
            take = np.sort(rng.choice(candidates, size=n_per_class, replace=False))
        chosen.extend(take.tolist())
        labels.extend([class_index] * len(take))
    if shortfalls and not allow_fewer:
        raise ValueError("not enough CheXpert 5x200 candidates: " + "; ".join(shortfalls))

    manifest = pd.DataFrame(
        {"path": frame["path"].to_numpy()[chosen], "class": [CHEXPERT_5X200_CLASSES[i] for i in labels]}
    )
    Path(out_manifest).parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(out_manifest, index=False)
    selected = dataset.select(chosen)
    return selected.add_column("label", labels).cast_column("label", ClassLabel(names=list(CHEXPERT_5X200_CLASSES)))


# ----------------------------------------------------------------------------------------------------------------
# MS-CXR


def load_ms_cxr(
    csv_path: str | os.PathLike[str],
    images_root: str | os.PathLike[str],
    split: str | None = None,
    strict: bool = False,
    check_files: bool = True,
    verify: bool = False,
    streaming: bool = False,
    return_report: bool = False,
    num_workers: int = 8,
) -> LoadResult:
    """MS-CXR phrase-grounding boxes, one row per (``dicom_id``, ``label_text``).

    ``images_root`` is the MIMIC-CXR-JPG folder the CSV's ``path`` column is relative to. ``split`` keeps one split
    of MS-CXR 1.1.0 (a CSV without a ``split`` column then is an error).

    Columns: ``image`` (Image), ``dicom_id``, ``category_name``, ``label_text``, ``boxes`` (list of ``[x, y, w, h]``
    in original pixels, x, y = top-left), ``image_width``, ``image_height`` and, when the CSV has it, ``split``.
    Bad rows: missing image, unparsable box or size (the whole phrase is dropped, not just the box).
    """
    csv_path = Path(csv_path)
    rows = RowFilter(f"load_ms_cxr({csv_path})", strict)
    frame = _read_table(csv_path)
    box_columns = ("x", "y", "w", "h")
    require_columns(
        frame,
        ("dicom_id", "category_name", "label_text", "path", *box_columns, "image_width", "image_height")
        + (("split",) if split is not None else ()),
        csv_path,
    )
    frame = with_locations(frame, csv_path.name, "dicom_id")
    if split is not None:
        frame = frame[frame["split"] == split]
    parsed = _parse_numbers(frame, box_columns, rows, csv_path.name)
    parsed = _parse_numbers(parsed, ("image_width", "image_height"), rows, csv_path.name, integer=True)
    incomplete = parsed[list(box_columns)].isna().any(axis=1).to_numpy()
    parsed = rows.drop(parsed, incomplete, BadRowReason.INVALID_VALUE, lambda row: "box has a blank coordinate")
    # One phrase is unusable when any of its boxes is: drop the phrase's other rows too.
    survivors = set(parsed.index)
    broken_phrases = set(map(tuple, frame.loc[~frame.index.isin(survivors), ["dicom_id", "label_text"]].to_numpy()))
    keys = list(zip(parsed["dicom_id"], parsed["label_text"]))
    parsed = parsed[[key not in broken_phrases for key in keys]]
    phrases = pd.DataFrame(
        [
            {
                "_where": group["_where"].iloc[0],
                "image": str(Path(images_root).absolute() / group["path"].iloc[0]),
                "dicom_id": dicom_id,
                "category_name": group["category_name"].iloc[0],
                "label_text": label_text,
                "boxes": group[list(box_columns)].to_numpy(dtype=np.float32).tolist(),
                "image_width": int(group["image_width"].iloc[0]),
                "image_height": int(group["image_height"].iloc[0]),
                "split": group["split"].iloc[0] if "split" in group else "",
            }
            for (dicom_id, label_text), group in parsed.groupby(["dicom_id", "label_text"], sort=False)
        ],
        columns=["_where", "image", "dicom_id", "category_name", "label_text", "boxes", "image_width",
                 "image_height", "split"],
    )
    phrases = keep_under_root(phrases, "image", images_root, rows, "path")
    phrases = _drop_missing_files(phrases, "image", rows, check_files)
    features: dict[str, Any] = {
        "image": Image(),
        "dicom_id": Value("string"),
        "category_name": Value("string"),
        "label_text": Value("string"),
        "boxes": List(List(Value("float32"))),
        "image_width": Value("int32"),
        "image_height": Value("int32"),
    }
    if "split" in frame.columns:
        features["split"] = Value("string")
    return _finish(
        _to_dataset(phrases, features), rows, verify=verify, num_workers=num_workers, streaming=streaming,
        return_report=return_report,
    )


# ----------------------------------------------------------------------------------------------------------------
# RSNA Pneumonia and SIIM-ACR Pneumothorax (DICOM)


def load_rsna(
    root: str | os.PathLike[str],
    strict: bool = False,
    check_files: bool = True,
    verify: bool = False,
    streaming: bool = False,
    return_report: bool = False,
    num_workers: int = 8,
) -> LoadResult:
    """RSNA Pneumonia Detection: ``stage_2_train_labels.csv`` + ``stage_2_train_images/<patientId>.dcm``.

    One row per patient. Columns: ``patient_id``, ``image_path``, ``label`` (ClassLabel: 0 no pneumonia,
    1 pneumonia; the CSV's ``Target``), ``boxes`` (list of ``[x, y, width, height]`` in original pixels, empty when
    ``label`` is 0), and on access ``image`` (float32 (H, W) in [0, 1], decoded lazily from the DICOM).
    Bad rows: missing image, unparsable ``Target``, a positive row with a blank box coordinate.
    """
    root = Path(root).absolute()  # image paths are joined to it, then checked to stay inside it
    csv_path = root / "stage_2_train_labels.csv"
    rows = RowFilter(f"load_rsna({root})", strict)
    frame = _read_table(csv_path)
    box_columns = ("x", "y", "width", "height")
    require_columns(frame, ("patientId", *box_columns, "Target"), csv_path)
    frame = with_locations(frame, csv_path.name, "patientId")
    frame = _parse_numbers(frame, ("Target",), rows, csv_path.name, integer=True)
    frame = _parse_numbers(frame, box_columns, rows, csv_path.name)
    no_box = frame[list(box_columns)].isna().any(axis=1).to_numpy()
    frame = rows.drop(
        frame, no_box & (frame["Target"] == 1).to_numpy(), BadRowReason.INVALID_VALUE,
        lambda row: "Target is 1 but the box has a blank coordinate",
    )
    patients = pd.DataFrame(
        [
            {
                "_where": group["_where"].iloc[0],
                "patient_id": patient_id,
                "image_path": str(root / "stage_2_train_images" / f"{patient_id}.dcm"),
                "label": int(group["Target"].max()),
                "boxes": group.loc[group["Target"] == 1, list(box_columns)].to_numpy(dtype=np.float32).tolist(),
            }
            for patient_id, group in frame.groupby("patientId", sort=False)
        ],
        columns=["_where", "patient_id", "image_path", "label", "boxes"],
    )
    patients = keep_under_root(patients, "image_path", root, rows, "patientId")
    patients = _drop_missing_files(patients, "image_path", rows, check_files)
    features = {
        "patient_id": Value("string"),
        "image_path": Value("string"),
        "label": ClassLabel(names=["no pneumonia", "pneumonia"]),
        "boxes": List(List(Value("float32"))),
    }
    return _finish(
        _to_dataset(patients, features), rows, decoder=DicomDecoder(),
        verify=verify, num_workers=num_workers, streaming=streaming, return_report=return_report,
    )


def load_siim(
    root: str | os.PathLike[str],
    strict: bool = False,
    check_files: bool = True,
    verify: bool = False,
    streaming: bool = False,
    return_report: bool = False,
    num_workers: int = 8,
) -> LoadResult:
    """SIIM-ACR Pneumothorax: ``train-rle.csv`` + ``dicom-images-train/<study>/<series>/<ImageId>.dcm``.

    One row per image; several RLE rows of an image are merged (union). Columns: ``image_id``, ``image_path``,
    ``label`` (ClassLabel: 0 no pneumothorax, 1 pneumothorax), ``rles`` (the image's RLE strings, ``-1`` rows left
    out), and on access ``image`` (float32 (H, W) in [0, 1]) and ``mask`` (bool (H, W), `rle_decode` at the decoded
    image's size). The DICOMs are found by one directory scan (no path column in the CSV), so ``check_files`` has
    no effect here. Bad rows: missing image, malformed RLE.
    """
    root = Path(root).absolute()  # image paths are joined to it, then checked to stay inside it
    csv_path = root / "train-rle.csv"
    rows = RowFilter(f"load_siim({root})", strict)
    frame = _read_table(csv_path)
    require_columns(frame, ("ImageId", "EncodedPixels"), csv_path)
    frame = with_locations(frame, csv_path.name, "ImageId")
    rle = frame["EncodedPixels"].str.strip()
    malformed = np.array([not _is_valid_rle(value) for value in rle], dtype=bool)
    frame = rows.drop(
        frame.assign(EncodedPixels=rle), malformed, BadRowReason.INVALID_VALUE, lambda row: "malformed RLE"
    )

    images_dir = root / "dicom-images-train" if (root / "dicom-images-train").is_dir() else root
    found = {path.stem: str(path) for path in images_dir.rglob("*.dcm")}
    frame = frame.assign(ImageId=frame["ImageId"].str.strip())
    images = pd.DataFrame(
        [
            {
                "_where": group["_where"].iloc[0],
                "image_id": image_id,
                "image_path": found.get(image_id, ""),
                "label": int((group["EncodedPixels"] != "-1").any()),
                "rles": [value for value in group["EncodedPixels"] if value != "-1"],
            }
            for image_id, group in frame.groupby("ImageId", sort=False)
        ],
        columns=["_where", "image_id", "image_path", "label", "rles"],
    )
    images = rows.drop(
        images, (images["image_path"] == "").to_numpy(), BadRowReason.MISSING_IMAGE,
        lambda row: f"no {row['image_id']}.dcm under {images_dir}",
    )
    features = {
        "image_id": Value("string"),
        "image_path": Value("string"),
        "label": ClassLabel(names=["no pneumothorax", "pneumothorax"]),
        "rles": List(Value("string")),
    }
    return _finish(
        _to_dataset(images, features), rows,
        decoder=DicomDecoder(masks_column="rles"), verify=verify, num_workers=num_workers, streaming=streaming,
        return_report=return_report,
    )


def _is_valid_rle(value: str) -> bool:
    if value == "-1":
        return True
    numbers = value.split()
    return bool(numbers) and len(numbers) % 2 == 0 and all(number.isdigit() for number in numbers)


# ----------------------------------------------------------------------------------------------------------------
# A user's own image-text list


def _read_json_records(path: Path, lines: bool) -> pd.DataFrame:
    """A JSON Lines file (one object a line; blank lines allowed) or a JSON array of objects, as a frame of the
    values as written (null and missing keys as None), with ``_line`` (JSONL: the line; JSON: the record, from 1)."""
    text = _read_text(path)
    records: list[dict[str, Any]] = []
    numbers: list[int] = []
    if lines:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not JSON ({error.msg} at column {error.colno})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
            numbers.append(number)
    else:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {error.lineno}: not JSON ({error.msg})") from error
        if not isinstance(loaded, list) or not all(isinstance(record, dict) for record in loaded):
            raise ValueError(f"{path}: expected a JSON array of objects (one per image)")
        records, numbers = loaded, list(range(1, len(loaded) + 1))
    if not records:
        raise ValueError(f"{path} holds no records")
    frame = pd.DataFrame.from_records(records).astype(object)
    frame = frame.where(frame.notna(), None)  # a key missing from some records: None, as a null
    frame["_line"] = numbers
    return frame


def _as_label_text(value: Any) -> str:
    """A JSON label value in the form `_parse_numbers` reads: null is blank, numbers as written."""
    return "" if value is None else str(value)


def load_image_text(
    path: str | os.PathLike[str],
    image_column: str = "image",
    text_column: str | Sequence[str] | None = "text",
    label_columns: Sequence[str] | None = None,
    images_root: str | os.PathLike[str] | None = None,
    strict: bool = False,
    check_files: bool = True,
    verify: bool = False,
    streaming: bool = False,
    return_report: bool = False,
    num_workers: int = 8,
    allow_outside_root: bool = False,
) -> LoadResult:
    """A CSV (``.csv``, ``.tsv``, optionally ``.gz``) or JSON Lines (``.jsonl``/``.json``) list of images and texts.

    ``text_column`` may name several columns (``["findings", "impression"]``): their texts are joined
    (`join_text`; a blank or null part is left out, a row with no text in any of them is an empty report).
    Relative image paths are resolved against ``images_root`` (default: the list file's folder); a path that leads
    outside it (``..``, an absolute path) is a bad row unless ``allow_outside_root=True``. Texts are kept as
    written (stripped; "None" and "nan" are texts); a null or missing text or image is a bad row naming the line.
    Columns: ``image`` (Image; or, when the paths are DICOM files, ``image_path`` plus the lazily decoded ``image``
    as in `load_rsna`), ``text`` (when ``text_column`` is given), and each of ``label_columns`` under its own name
    (float32). Bad rows: missing or outside image, missing or empty text, unparsable label.
    """
    path = Path(path)
    rows = RowFilter(f"load_image_text({path})", strict)
    suffixes = [suffix.lower() for suffix in path.suffixes if suffix.lower() != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".jsonl", ".json"):
        frame = _read_json_records(path, lines=kind == ".jsonl")
    elif kind in (".csv", ".tsv"):
        frame = _read_table(path, "\t" if kind == ".tsv" else ",")
    else:
        raise ValueError(f"{path}: expected a .csv, .tsv, .jsonl or .json file")
    label_columns = list(label_columns or [])
    text_columns = ([text_column] if text_column else []) if isinstance(text_column, str) else list(text_column or [])
    require_columns(frame, [image_column, *text_columns, *label_columns], path)
    frame = with_locations(frame, path.name, image_column)
    no_image = np.array([not isinstance(value, str) or not value.strip() for value in frame[image_column]])
    frame = rows.drop(frame, no_image, BadRowReason.MISSING_IMAGE,
                      lambda row: f"no image path in field {image_column!r} (got {row[image_column]!r})")
    base = (Path(images_root) if images_root is not None else path.parent).absolute()
    frame = keep_under_root(frame.assign(_image=frame[image_column].str.strip()), "_image", base, rows, image_column,
                            allow_outside_root)
    frame = _drop_missing_files(frame, "_image", rows, check_files)
    if len(text_columns) == 1:
        (text_column,) = text_columns
        frame = rows.drop(frame, frame[text_column].map(lambda v: not isinstance(v, str)).to_numpy(dtype=bool),
                          BadRowReason.MISSING_REPORT,
                          lambda row: f"field {text_column!r} is {json.dumps(row[text_column])}, not a text")
        frame = frame.assign(_text=frame[text_column].str.strip())
        frame = rows.drop(frame, (frame["_text"] == "").to_numpy(), BadRowReason.EMPTY_REPORT, lambda row: "empty text")
    elif text_columns:  # e.g. findings + impression: the parts that have text, joined
        joined = [join_text(parts) for parts in zip(*(frame[name] for name in text_columns))]
        frame = rows.drop(frame.assign(_text=joined), np.array([not text for text in joined], dtype=bool),
                          BadRowReason.EMPTY_REPORT,
                          lambda row: f"no text in any of the fields {', '.join(map(repr, text_columns))}")
    frame = frame.assign(**{name: frame[name].map(_as_label_text) for name in label_columns})
    frame = _parse_numbers(frame, label_columns, rows, path.name)

    is_dicom = frame["_image"].str.lower().str.endswith(".dcm")
    if is_dicom.any() and not is_dicom.all():
        raise ValueError(f"{path}: mixes DICOM and other image files; split it into two lists")
    image_name = "image_path" if is_dicom.any() else "image"
    columns = {image_name: frame["_image"]}
    features: dict[str, Any] = {image_name: Value("string") if is_dicom.any() else Image()}
    if text_columns:
        columns["text"] = frame["_text"]
        features["text"] = Value("string")
    for name in label_columns:
        columns[name] = frame[name]
        features[name] = Value("float32")
    dataset = _to_dataset(pd.DataFrame(columns), features)
    return _finish(
        dataset, rows, decoder=DicomDecoder() if is_dicom.any() else None, verify=verify, num_workers=num_workers,
        streaming=streaming, return_report=return_report,
    )
