"""The one place where loaders decide what to do with a bad row, and the summary they hand back.

Every loader takes ``strict`` and ``return_report``:

- ``strict=True``: the first bad row raises `ValueError` naming it (``"train.csv line 7 (Path=...): missing image
  file /data/...jpg"``).
- ``strict=False`` (default): bad rows are skipped and counted by `BadRowReason`; when loading ends the counts are
  logged on the ``plan_hf.data`` logger (WARNING when anything was skipped, INFO otherwise) and, with
  ``return_report=True``, returned as a `LoadReport` next to the data: ``ds, report = load_x(..., return_report=True)``.

A CSV that lacks a column the loader needs is always an error (`require_columns`), whatever ``strict`` says: that is
a wrong file, not a bad row. Undecodable images can only be found by decoding them: `validate_images` (or a loader's
``verify=True``) does that with a progress bar and feeds the same `LoadReport`.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, overload

import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict, Image
from PIL import Image as PILImage
from tqdm.auto import tqdm

__all__ = [
    "BadRowReason",
    "LoadReport",
    "RowFilter",
    "decode_image",
    "image_name",
    "keep_under_root",
    "read_dicom_image",
    "require_columns",
    "resolve_under_root",
    "validate_images",
    "with_locations",
]

logger = logging.getLogger("plan_hf.data")

# How many offending rows per reason a report keeps, so that a user can go and look at them.
_MAX_EXAMPLES = 5


class BadRowReason(str, Enum):
    """Why a row was skipped."""

    MISSING_IMAGE = "missing_image"
    UNREADABLE_IMAGE = "unreadable_image"
    MISSING_REPORT = "missing_report"
    EMPTY_REPORT = "empty_report"
    INVALID_VALUE = "invalid_value"
    OUTSIDE_ROOT = "outside_root"  # a path that leads out of the dataset's folder ("../..", an absolute path)
    DUPLICATE_ROW = "duplicate_row"  # a key repeated in a CSV (identical rows: the first kept; conflicting: none)


@dataclass
class LoadReport:
    """What a lenient load kept and skipped.

    ``kept`` counts the rows returned (all splits together). ``skipped`` counts by reason the rows each check ran
    on: CSV rows for unparsable values, dataset rows (an image, a phrase, a patient) for missing or unreadable
    images and missing or empty reports. ``examples`` keeps the first few descriptions per reason (the text a
    strict load would have raised with).
    """

    source: str
    kept: int = 0
    skipped: Counter[BadRowReason] = field(default_factory=Counter)
    examples: dict[BadRowReason, list[str]] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        counts = ", ".join(f"{reason.value}: {count}" for reason, count in sorted(self.skipped.items()))
        return f"{self.source}: kept {self.kept} rows, skipped {self.num_skipped}" + (f" ({counts})" if counts else "")

    def __str__(self) -> str:
        return self.summary()


class RowFilter:
    """Applies the strict/lenient policy for one load and fills its `LoadReport`."""

    def __init__(self, source: str, strict: bool) -> None:
        self.strict = strict
        self.report = LoadReport(source=source)

    def reject(self, where: str, reason: BadRowReason, detail: str) -> None:
        """One bad row: raise when strict, else count it."""
        message = f"{where}: {detail}"
        if self.strict:
            raise ValueError(f"{self.report.source}: {message}")
        self.report.skipped[reason] += 1
        examples = self.report.examples.setdefault(reason, [])
        if len(examples) < _MAX_EXAMPLES:
            examples.append(message)

    def drop(
        self,
        frame: pd.DataFrame,
        bad: Sequence[bool] | np.ndarray | pd.Series,
        reason: BadRowReason,
        detail: Callable[[pd.Series], str],
    ) -> pd.DataFrame:
        """Reject the rows of ``frame`` where ``bad`` holds and return the others.

        ``frame`` carries a ``_where`` column (see `with_locations`); ``detail(row)`` says what is wrong with a row.
        """
        bad = np.asarray(bad, dtype=bool)
        for _, row in frame[bad].iterrows():
            self.reject(row["_where"], reason, detail(row))
        return frame[~bad]

    def finish(self, kept: int) -> LoadReport:
        """Record how many rows were kept and log the summary."""
        self.report.kept = kept
        logger.log(logging.WARNING if self.report.num_skipped else logging.INFO, self.report.summary())
        for reason, examples in self.report.examples.items():
            logger.debug("%s, e.g. %s", reason.value, "; ".join(examples))
        return self.report


    def drop_duplicates(self, frame: pd.DataFrame, keys: Sequence[str], compare: Sequence[str] | None = None,
                        what: str = "row") -> pd.DataFrame:
        """Reject rows whose ``keys`` repeat an earlier row's: a repeat that agrees with the first on ``compare``
        (default: every column read from the file) is dropped and counted, the first kept; rows that disagree
        leave nothing to choose from, so every row of that key is rejected. Both name the lines involved."""
        keys = list(keys)
        repeated = frame.duplicated(keys, keep=False).to_numpy()
        if not repeated.any():
            return frame
        compare = list(compare) if compare is not None else [c for c in frame.columns if not str(c).startswith("_")]
        bad = np.zeros(len(frame), dtype=bool)
        details: dict[Any, str] = {}
        positions = pd.Series(np.arange(len(frame)), index=frame.index)
        for key, group in frame[repeated].groupby(keys, sort=False):
            first = group.iloc[0]
            shown = ", ".join(f"{k}={v}" for k, v in zip(keys, key if isinstance(key, tuple) else (key,)))
            differing = [c for c in compare if group[c].astype(str).nunique() > 1]
            if differing:
                values = "; ".join(f"{c}: {' vs '.join(map(repr, group[c].astype(str).unique()))}" for c in differing)
                for index in group.index:
                    details[index] = f"{what} {shown} is given more than once, differently ({values})"
                bad[positions[group.index].to_numpy()] = True
            else:
                for index in group.index[1:]:
                    details[index] = f"{what} {shown} repeats {first['_where'].split(' (')[0]}"
                bad[positions[group.index[1:]].to_numpy()] = True
        return self.drop(frame, bad, BadRowReason.DUPLICATE_ROW, lambda row: details[row.name])


def keep_under_root(
    frame: pd.DataFrame,
    column: str,
    root: str | os.PathLike[str],
    rows: RowFilter,
    field: str,
    allow_outside_root: bool = False,
) -> pd.DataFrame:
    """Make ``column``'s paths absolute (relative ones joined to ``root``) with ``..`` folded, and reject the rows
    whose path then leads outside ``root`` (``field``, the CSV column the path came from, is named). Paths are
    compared as written, so a dataset may hold symbolic links to other disks; its CSVs may not point elsewhere.
    ``allow_outside_root`` keeps every path (for one's own lists that name absolute paths)."""
    base = os.path.abspath(os.fspath(root))
    resolved = [resolve_under_root(value, base) for value in frame[column]]
    inside = np.fromiter((allow_outside_root or is_inside for _, is_inside in resolved), dtype=bool,
                         count=len(resolved))
    return rows.drop(
        frame.assign(**{column: [path for path, _ in resolved]}), ~inside, BadRowReason.OUTSIDE_ROOT,
        lambda row: f"{field} leads outside the dataset folder {base}: {row[column]}",
    )


def resolve_under_root(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> tuple[str, bool]:
    """``path`` made absolute (a relative one joined to ``root``) with ``..`` folded, and whether it stays inside
    ``root``: the rule of `keep_under_root`, for one path."""
    base = os.path.abspath(os.fspath(root))
    resolved = os.path.normpath(os.path.join(base, os.fspath(path)))
    return resolved, resolved.startswith(base.rstrip(os.sep) + os.sep)


def with_locations(frame: pd.DataFrame, file_name: str, id_column: str | None = None) -> pd.DataFrame:
    """Add the ``_where`` column: ``"<file> line <n> (<id_column>=<value>)"``, lines as an editor counts them.

    The line numbers come from the ``_line`` column when the reader set one (it knows about quoted line breaks and
    blank lines), else the header is taken as line 1 and each row as one line. Call it right after reading.
    """
    if "_line" in frame.columns:
        lines = frame["_line"].astype(str).to_numpy()
    else:
        lines = (np.arange(len(frame)) + 2).astype(str)
    where = pd.Series([f"{file_name} line {line}" for line in lines], index=frame.index)
    if id_column is not None:
        where = where + f" ({id_column}=" + frame[id_column].map(str) + ")"
    return frame.assign(_where=where)


def require_columns(frame: pd.DataFrame, columns: Iterable[str], file_name: str | os.PathLike[str]) -> None:
    """Raise `ValueError` naming the file and the first missing column (always, even in lenient loads)."""
    for column in columns:
        if column not in frame.columns:
            own = [str(name) for name in frame.columns if not str(name).startswith("_")]
            raise ValueError(f"{os.fspath(file_name)} has no column {column!r} (its columns: {', '.join(own)})")


def read_dicom_image(path: str | os.PathLike[str] | bytes) -> np.ndarray:
    """Decode a DICOM file (or its bytes) into float32 (H, W) in [0, 1] with the image processor's `read_dicom`."""
    # Imported on use: `import plan_hf.data` should not pull the image-processing stack in.
    from ..image_processing_plan import read_dicom

    return read_dicom(path)


def decode_image(item: Any) -> Any:
    """Decode one image fully: a path, bytes, or `datasets.Image(decode=False)` storage (``{"bytes", "path"}``).
    A DICOM file gives float32 (H, W) in [0, 1], anything else a loaded PIL image; raises when it cannot be decoded
    (`verify()` misses truncated files; a full decode does not)."""
    if isinstance(item, dict):
        path, data = item.get("path"), item.get("bytes")
        source: Any = data if data is not None else path
    else:
        path, source = (None, item) if isinstance(item, bytes) else (item, item)
    if path is not None and os.fspath(path).lower().endswith(".dcm"):
        return read_dicom_image(source)
    image = PILImage.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
    return image


def image_name(item: Any) -> str:
    """How a message names an image: its path, or ``<bytes>``."""
    path = item.get("path") if isinstance(item, dict) else None if isinstance(item, bytes) else item
    return str(path) if path else "<bytes>"


def _check_image(item: Any) -> str | None:
    """Decode one image fully; the error text when it cannot be decoded, else ``None``."""
    try:
        image = decode_image(item)
        if hasattr(image, "close"):
            image.close()
        return None
    except Exception as error:  # noqa: BLE001 - any decoding failure makes the row unusable
        return f"unreadable image {image_name(item)}: {type(error).__name__}: {error}"


@overload
def validate_images(
    dataset: Dataset, image_column: str | None = ..., strict: bool = ..., num_workers: int = ...,
    return_report: bool = ..., id_column: str | None = ..., row_filter: RowFilter | None = ...,
) -> Dataset: ...
@overload
def validate_images(
    dataset: DatasetDict, image_column: str | None = ..., strict: bool = ..., num_workers: int = ...,
    return_report: bool = ..., id_column: str | None = ..., row_filter: RowFilter | None = ...,
) -> DatasetDict: ...
def validate_images(
    dataset: Dataset | DatasetDict,
    image_column: str | None = None,
    strict: bool = False,
    num_workers: int = 8,
    return_report: bool = False,
    id_column: str | None = None,
    row_filter: RowFilter | None = None,
) -> Any:
    """Decode every image once (with a progress bar) and drop, or with ``strict`` raise on, undecodable ones.

    ``image_column`` defaults to ``"image"`` when it is an `Image()` column, else ``"image_path"`` (the DICOM loaders'
    path column). Rows are named by ``id_column`` (default: the first of dicom_id, image_id, patient_id, path present).
    Transforms set on the dataset are kept. ``return_report=True`` returns ``(dataset, LoadReport)``;
    ``row_filter`` lets a loader add the counts to its own report.
    """
    own_filter = row_filter is None
    rows = row_filter if row_filter is not None else RowFilter("validate_images", strict)
    if isinstance(dataset, DatasetDict):
        result: Any = DatasetDict(
            {
                name: validate_images(split, image_column, strict, num_workers, False, id_column, rows)
                for name, split in dataset.items()
            }
        )
        kept = sum(len(split) for split in result.values())
    else:
        result = _validate_split(dataset, image_column, num_workers, id_column, rows)
        kept = len(result)
    if own_filter:
        rows.finish(kept)
    return (result, rows.report) if return_report else result


def _validate_split(
    dataset: Dataset, image_column: str | None, num_workers: int, id_column: str | None, rows: RowFilter
) -> Dataset:
    plain = dataset.with_format(None)  # no transform: read the stored paths, don't decode through it
    if image_column is None:
        image_column = "image" if isinstance(plain.features.get("image"), Image) else "image_path"
    if isinstance(plain.features[image_column], Image):
        plain = plain.cast_column(image_column, Image(decode=False))
    items = list(plain[image_column])
    if id_column is None:
        id_column = next((c for c in ("dicom_id", "image_id", "patient_id", "path") if c in plain.column_names), None)
    ids = list(plain[id_column]) if id_column is not None else None
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        errors = list(tqdm(pool.map(_check_image, items), total=len(items), desc="Verifying images", unit="img"))
    good: list[int] = []
    for index, error in enumerate(errors):
        if error is None:
            good.append(index)
        else:
            where = f"row {index}" + (f" ({id_column}={ids[index]})" if ids is not None else "")
            rows.reject(where, BadRowReason.UNREADABLE_IMAGE, error)
    return dataset if len(good) == len(dataset) else dataset.select(good)
