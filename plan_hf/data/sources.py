"""Image-report pairs from any source `datasets` can read, the same way for pre-training, evaluation and
fine-tuning: a `PairSource` names the source, `load_pairs` reads it into memory (a memory-mapped `Dataset`) and
`PairStream` streams it (an `IterableDataset` shuffled through a seeded buffer, shards split across processes).

================  =================================================================================================
``dataset``       ``data_dir``
================  =================================================================================================
``mimic-cxr``     a MIMIC-CXR-JPG tree (`load_mimic_cxr`; the text is findings + impression); ``mimic_cxr`` too
``csv``           a ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json`` list of image paths and texts (`load_image_text`)
``imagefolder``   a folder of images with ``metadata.jsonl`` or ``metadata.csv`` (a ``file_name`` column), read by
                  `datasets`' imagefolder builder (``train/``, ``test/`` sub-folders are splits)
``disk``          a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
``parquet``,      a file, a folder of them (splits named by the files, as `datasets` reads a folder) or a glob
``arrow``
anything else     a name for `datasets.load_dataset` (a Hub dataset, or a local script-free folder); no data_dir
================  =================================================================================================

``image_column`` holds an `Image()` feature, a path (resolved under the dataset's folder: a path that leads outside it
is a bad row unless ``allow_outside_root``) or the image's bytes. ``text_column`` is one column or several, joined
(``[findings, impression]``; `join_text`: missing and blank parts left out, a row with no text at all is bad).
Bad rows follow `plan_hf.data.bad_rows`: with ``strict`` the first raises `ValueError` naming it, otherwise it is
skipped, counted and named in a `LoadReport`. A missing column is always an error that lists the columns there are.
"""

from __future__ import annotations

import glob
import dataclasses
import itertools
import logging
import os
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Image, IterableDataset, IterableDatasetDict, Value
from datasets.distributed import split_dataset_by_node

from .bad_rows import (
    BadRowReason,
    LoadReport,
    RowFilter,
    decode_image,
    image_name,
    require_columns,
    resolve_under_root,
    validate_images,
)
from .reports import join_text

logger = logging.getLogger("plan_hf.data")

__all__ = ["PairSource", "PairStream", "SourceKind", "load_labelled", "load_pairs", "source_from", "source_kind",
           "source_splits", "stream_pairs", "stream_rows"]


class SourceKind(str, Enum):
    MIMIC_CXR = "mimic-cxr"
    CSV = "csv"
    IMAGEFOLDER = "imagefolder"
    DISK = "disk"
    PARQUET = "parquet"
    ARROW = "arrow"
    LOAD_DATASET = "load_dataset"  # any other value of `dataset`: a name for datasets.load_dataset


# Other spellings of the kinds: the config value of earlier versions, and the list formats by their own names.
_SPELLINGS = {"mimic_cxr": "mimic-cxr", "tsv": "csv", "jsonl": "csv", "json": "csv", "save_to_disk": "disk"}


def source_kind(dataset: str) -> SourceKind:
    """The kind a ``dataset:`` value names; anything that is not a kind's name is a `datasets.load_dataset` name."""
    name = _SPELLINGS.get(dataset, dataset)
    named = {kind.value: kind for kind in SourceKind if kind is not SourceKind.LOAD_DATASET}
    return named.get(name, SourceKind.LOAD_DATASET)


@dataclass
class PairSource:
    """Where image-report pairs come from (see the module docstring for ``dataset`` and ``data_dir``)."""

    dataset: str = "mimic-cxr"
    data_dir: str | os.PathLike[str] | None = None
    image_column: str = "image"
    text_column: str | Sequence[str] = "text"
    strict: bool = False
    allow_outside_root: bool = False
    check_files: bool = True  # stat each image path while reading (off for slow network file systems)
    cache_dir: str | None = None  # datasets' cache for the sources read by load_dataset (default: HF_DATASETS_CACHE)

    def __post_init__(self) -> None:
        if self.kind is SourceKind.LOAD_DATASET:
            if self.data_dir is not None:
                raise ValueError(f"dataset {self.dataset!r} is read by datasets.load_dataset by that name: leave "
                                 "data_dir unset (or name a kind: mimic-cxr, csv, imagefolder, disk, parquet, arrow)")
        elif self.data_dir is None:
            raise ValueError(f"dataset {self.dataset!r} needs data_dir: the {self.kind.value} to read")
        if not self.text_columns:
            raise ValueError("text_column names no column")

    @property
    def kind(self) -> SourceKind:
        return source_kind(self.dataset)

    @property
    def text_columns(self) -> list[str]:
        return [self.text_column] if isinstance(self.text_column, str) else list(self.text_column)

    @property
    def files(self) -> bool:
        """Parquet or arrow files named one by one (a file or a glob, not a folder): one split, whatever its name."""
        return self.kind in (SourceKind.PARQUET, SourceKind.ARROW) and not Path(os.fspath(self.data_dir)).is_dir()

    @property
    def root(self) -> Path | None:
        """The folder every image path must stay inside: the data folder, a list's or a file's folder (None for a
        Hub dataset, whose images `datasets` downloads itself)."""
        if self.kind is SourceKind.LOAD_DATASET:
            return Path(self.dataset).absolute() if Path(self.dataset).is_dir() else None
        path = Path(os.fspath(self.data_dir)).absolute()
        if self.kind in (SourceKind.PARQUET, SourceKind.ARROW) and glob.has_magic(str(path)):
            path = Path(str(path)[: min(str(path).find(c) for c in "*?[" if c in str(path))]).parent
        return path if path.is_dir() else path.parent

    def __str__(self) -> str:
        return self.dataset if self.kind is SourceKind.LOAD_DATASET else f"{self.kind.value} {self.data_dir}"


class BadRow(Exception):
    """One row that cannot be a training pair: why, and what is wrong with it."""

    def __init__(self, reason: BadRowReason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------------------------------------------------
# The rules of a row, the same for a source read into memory and for a stream
# --------------------------------------------------------------------------------------------------------------------
class _Rules:
    def __init__(self, source: PairSource) -> None:
        self.source = source
        self.root = source.root

    def missing_column(self, name: str, columns: Sequence[str]) -> ValueError:
        return ValueError(f"{self.source} has no column {name!r} (its columns: {', '.join(map(str, columns))}); "
                          "set image_column / text_column")

    def text(self, row: dict[str, Any]) -> str:
        columns = self.source.text_columns
        for name in columns:
            if name not in row:
                raise self.missing_column(name, list(row))
        text = join_text(row[name] for name in columns)
        if not text:
            values = ", ".join(f"{name}={row[name]!r}" for name in columns)
            raise BadRow(BadRowReason.EMPTY_REPORT, f"no text in {values}")
        return text

    def image_path(self, path: str | None, has_bytes: bool, written: bool) -> str | None:
        """The file to read the image from (None when the row carries its bytes). ``written``: the path is a string
        column's value (resolved under the root), not `Image()` storage (where `datasets` resolved it)."""
        column = self.source.image_column
        if has_bytes:
            return path
        if not isinstance(path, str) or not path.strip():
            raise BadRow(BadRowReason.MISSING_IMAGE, f"no image in field {column!r} (got {path!r})")
        allow = self.source.allow_outside_root
        if self.root is None:
            if written and not allow:
                raise BadRow(BadRowReason.OUTSIDE_ROOT, f"field {column!r} is a path, and {self.source} has no "
                             f"folder to resolve it in: {path} (allow_outside_root to read it as written)")
            resolved, inside = os.path.abspath(path.strip()), True
        else:
            resolved, inside = resolve_under_root(path.strip(), self.root)
        if not inside and not allow:
            raise BadRow(BadRowReason.OUTSIDE_ROOT,
                         f"field {column!r} leads outside the dataset folder {self.root}: {resolved}")
        if self.source.check_files and not os.path.isfile(resolved):
            raise BadRow(BadRowReason.MISSING_IMAGE, f"missing image file {resolved} (field {column!r})")
        return resolved

    def image(self, row: dict[str, Any]) -> dict[str, Any]:
        """A streamed row's image as `Image(decode=False)` storage, its path resolved and checked."""
        column = self.source.image_column
        if column not in row:
            raise self.missing_column(column, list(row))
        value = row[column]
        if isinstance(value, dict):
            data = value.get("bytes")
            return {"bytes": data, "path": self.image_path(value.get("path"), data is not None, written=False)}
        if isinstance(value, (bytes, bytearray)):
            return {"bytes": bytes(value), "path": None}
        return {"bytes": None, "path": self.image_path(value, False, written=True)}

    def pair(self, row: dict[str, Any]) -> dict[str, Any]:
        """A streamed row as a training pair: the image decoded (PIL, or an array for DICOM) and the text."""
        text = self.text(row)
        item = self.image(row)
        try:
            image = decode_image(item)
        except Exception as error:  # noqa: BLE001 - any decoding failure makes the row unusable
            raise BadRow(BadRowReason.UNREADABLE_IMAGE,
                         f"unreadable image {image_name(item)}: {type(error).__name__}: {error}") from error
        return {"image": image, "text": text}


# --------------------------------------------------------------------------------------------------------------------
# Opening a source
# --------------------------------------------------------------------------------------------------------------------
def _load_dataset(source: PairSource, streaming: bool, builder: bool = False) -> Any:
    """`datasets.load_dataset` (or, with ``builder``, `load_dataset_builder`: the splits without reading any data)
    over the source's location."""
    from datasets import load_dataset, load_dataset_builder

    kind, location = source.kind, None if source.data_dir is None else os.fspath(source.data_dir)
    kwargs: dict[str, Any] = {"cache_dir": source.cache_dir}
    load = load_dataset_builder if builder else load_dataset
    if not builder:
        kwargs["streaming"] = streaming
    if kind is SourceKind.IMAGEFOLDER:
        return load("imagefolder", data_dir=location, **kwargs)
    if kind in (SourceKind.PARQUET, SourceKind.ARROW):
        if not source.files:  # a folder: split names from the file names, as datasets reads a folder
            return load(kind.value, data_dir=location, **kwargs)
        if not glob.has_magic(location) and not Path(location).is_file():
            raise FileNotFoundError(f"no {kind.value} file or folder {location}")
        return load(kind.value, data_files=location, **kwargs)
    return load(source.dataset, **kwargs)


def source_splits(source: PairSource) -> list[str] | None:
    """The split names of ``source``; None when it has none (a list, a single file, one saved `Dataset`), in which
    case every split name reads the whole of it."""
    kind = source.kind
    if kind is SourceKind.MIMIC_CXR:
        from .loaders import MIMIC_SPLITS

        return list(MIMIC_SPLITS)
    if kind is SourceKind.CSV or source.files:
        return None
    if kind is SourceKind.DISK:
        from datasets import load_from_disk

        loaded = load_from_disk(os.fspath(source.data_dir))
        return list(loaded) if isinstance(loaded, DatasetDict) else None
    files = _load_dataset(source, streaming=False, builder=True).config.data_files
    return list(files) if files else None


def _pick_split(loaded: Any, split: str, source: PairSource) -> Any:
    """The split of a `DatasetDict`; a source without splits (one list, one file) is used whole."""
    if not isinstance(loaded, (DatasetDict, IterableDatasetDict)):
        return loaded
    if split in loaded:
        return loaded[split]
    if source.files and len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(f"{source} has no split {split!r} (its splits: {', '.join(loaded)})")


def _open(source: PairSource, split: str, streaming: bool) -> Any:
    if source.kind is SourceKind.DISK:
        from datasets import load_from_disk

        return _pick_split(load_from_disk(os.fspath(source.data_dir)), split, source)
    return _pick_split(_load_dataset(source, streaming), split, source)


def _undecoded(rows: Any, column: str) -> Any:
    """The image column as `Image(decode=False)` storage: paths and bytes, read without decoding. A struct of
    ``bytes`` (and ``path``) is that storage written without its feature (e.g. by pandas): it is read as one."""
    features = rows.features
    feature = None if features is None else features.get(column)
    if (isinstance(feature, Image) and feature.decode) or (isinstance(feature, dict) and "bytes" in feature
                                                           and set(feature) <= {"bytes", "path"}):
        return rows.cast_column(column, Image(decode=False))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# In memory
# --------------------------------------------------------------------------------------------------------------------
def _image_refs(rows: Dataset, source: PairSource) -> tuple[list[str | None], list[bool], bool]:
    """Each row's image path and whether it carries bytes, read from the Arrow column (no bytes are copied), and
    whether the paths are a string column's values."""
    column = source.image_column
    feature = rows.features[column]
    values = rows.with_format("arrow")[column]
    if isinstance(feature, Image):
        return (pc.struct_field(values, "path").to_pylist(), pc.is_valid(pc.struct_field(values, "bytes")).to_pylist(),
                False)
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return values.to_pylist(), [False] * len(rows), True
    if isinstance(feature, Value) and feature.dtype in ("binary", "large_binary"):
        return [None] * len(rows), pc.is_valid(values).to_pylist(), False
    raise ValueError(f"{source}: column {column!r} is {feature}, not an image (an Image() feature, a path or bytes)")


def _pairs(rows: Dataset, source: PairSource, filter_: RowFilter, label_columns: Sequence[str],
           text: bool = True) -> Dataset:
    """The rows of a `datasets` source as ``image`` (Image()) and ``text`` (without ``text``: the image and the
    labels only), bad rows rejected. Label columns become float32; a `ClassLabel` column keeps its class indices
    and names."""
    rules = _Rules(source)
    column = source.image_column
    text_columns = source.text_columns if text else []
    require = [column, *text_columns, *label_columns]
    require_columns(pd.DataFrame(columns=rows.column_names), require, str(source))
    plain = _undecoded(rows.with_format(None), column)
    paths, has_bytes, written = _image_refs(plain, source)
    texts = plain.select_columns(text_columns).to_dict()
    keep: list[int] = []
    all_texts: list[str] = [""] * len(plain)  # bad rows keep "" (and no image): they are selected away below
    all_paths: list[str | None] = [None] * len(plain)
    for index in range(len(plain)):
        try:
            if text:
                all_texts[index] = rules.text({name: texts[name][index] for name in text_columns})
            all_paths[index] = rules.image_path(paths[index], has_bytes[index], written)
        except BadRow as bad:
            filter_.reject(f"row {index}", bad.reason, bad.detail)
            continue
        keep.append(index)
    # Columns are added to the whole table and the good rows selected last: a selection is an index over the
    # memory-mapped table, which adding or casting columns afterwards would copy (into the dataset's own folder).
    pairs = rows.with_format(None)
    added: dict[str, tuple[Any, Any]] = {}
    if written:  # the resolved paths, as Image() storage
        added["image"] = ([None if path is None else {"bytes": None, "path": path} for path in all_paths], Image())
    elif not isinstance(pairs.features[column], Image):  # bytes, or Image storage without its feature
        added["image"] = ([value if value is None or isinstance(value, dict) else {"bytes": value, "path": None}
                           for value in plain[column]], Image())
    if text:
        added["text"] = (all_texts, Value("string"))
    for name in label_columns:
        if isinstance(plain.features[name], ClassLabel):
            added[name] = (plain[name], plain.features[name])
        else:
            added[name] = ([np.nan if value is None else float(value) for value in plain[name]], Value("float32"))
    staged = {name: f"_pairs_{name}" for name in added}  # beside the source's columns, whatever their names
    for name, (values, kind) in added.items():
        pairs = pairs.add_column(staged[name], values, feature=kind)
    staged.setdefault("image", column)
    pairs = pairs.select_columns([staged[name] for name in ("image", *(["text"] if text else []), *label_columns)])
    pairs = pairs.rename_columns({old: new for new, old in staged.items() if old != new})
    return pairs.select(keep)


def load_pairs(
    source: PairSource,
    split: str = "train",
    label_columns: Sequence[str] = (),
    verify: bool = False,
    return_report: bool = False,
) -> Dataset | tuple[Dataset, LoadReport]:
    """The ``split`` of ``source`` as a `Dataset` with ``image`` (`Image()`, decoded on access), ``text`` and each
    of ``label_columns`` (float32). A source without splits (one list or file) is used whole; a missing split is an
    error listing those there are. ``verify`` decodes every image once now (`validate_images`)."""
    kind = source.kind
    if kind is SourceKind.MIMIC_CXR:
        from .loaders import CHEXPERT_LABELS, load_mimic_cxr

        unknown = [name for name in label_columns if name not in CHEXPERT_LABELS]
        if unknown:
            raise ValueError(f"{source} has no column {unknown[0]!r} (its labels: {', '.join(CHEXPERT_LABELS)})")
        rows, report = load_mimic_cxr(source.data_dir, split=split, strict=source.strict, verify=verify,
                                      check_files=source.check_files, return_report=True)
        pairs = rows.select_columns(["image", "text", *label_columns])
    elif kind is SourceKind.CSV:
        from .loaders import load_image_text

        rows, report = load_image_text(source.data_dir, image_column=source.image_column,
                                       text_column=source.text_columns, label_columns=list(label_columns),
                                       strict=source.strict, check_files=source.check_files, verify=verify,
                                       allow_outside_root=source.allow_outside_root, return_report=True)
        if "image" not in rows.column_names:
            raise ValueError(f"{source}: DICOM lists are read by load_image_text; pairs here need PNG/JPEG images")
        pairs = rows
    else:
        filter_ = RowFilter(f"load_pairs({source}, split={split!r})", source.strict)
        pairs = _pairs(_open(source, split, streaming=False), source, filter_, label_columns)
        if verify:
            pairs = validate_images(pairs, "image", row_filter=filter_)
        report = filter_.finish(len(pairs))
    return (pairs, report) if return_report else pairs


def load_labelled(
    source: PairSource,
    split: str = "train",
    label_columns: Sequence[str] | None = None,
    return_report: bool = False,
) -> Dataset | tuple[Dataset, LoadReport]:
    """The ``split`` of a `datasets` source (imagefolder, disk, parquet, arrow, a `load_dataset` name) as ``image``
    and label columns, no text needed: images with labels to classify. ``label_columns`` None takes the split's one
    `ClassLabel` column (imagefolder's ``label``, from the class sub-folders); several, or none, is an error listing
    the columns. Labels are float32 (blank: NaN), a `ClassLabel` keeps its indices and names. Rows without a
    readable image reference follow the strict/lenient rule, as in `load_pairs`."""
    if source.kind in (SourceKind.MIMIC_CXR, SourceKind.CSV):
        raise ValueError(f"{source}: image-label lists are read by their own loaders (classification's dataset "
                         "'csv' or 'synthetic'); load_labelled reads the sources datasets opens")
    rows = _open(source, split, streaming=False)
    if label_columns is None:
        label_columns = [name for name, feature in rows.features.items() if isinstance(feature, ClassLabel)]
        if len(label_columns) != 1:
            raise ValueError(f"{source} split {split!r} has {len(label_columns) or 'no'} class-label columns "
                             f"({', '.join(label_columns) or 'its columns: ' + ', '.join(rows.column_names)}): name "
                             "the label columns (label_columns / --label_columns)")
    filter_ = RowFilter(f"load_labelled({source}, split={split!r})", source.strict)
    labelled = _pairs(rows, source, filter_, list(label_columns), text=False)
    report = filter_.finish(len(labelled))
    return (labelled, report) if return_report else labelled


# --------------------------------------------------------------------------------------------------------------------
# Streamed
# --------------------------------------------------------------------------------------------------------------------
def stream_rows(source: PairSource, split: str = "train", num_shards: int = 64) -> IterableDataset:
    """The raw rows of ``source`` as an `IterableDataset`, images undecoded. Files and Hub datasets are streamed as
    `datasets` streams them (one shard per file); the list layouts (mimic-cxr, csv), whose index is a CSV read
    anyway, and save_to_disk folders (memory-mapped) are read first and cut into ``num_shards`` shards."""
    kind = source.kind
    if kind in (SourceKind.MIMIC_CXR, SourceKind.CSV):
        rows: Any = load_pairs(source, split)
    elif kind is SourceKind.DISK:
        rows = _open(source, split, streaming=False)
    else:
        return _undecoded(_open(source, split, streaming=True), source.image_column)
    rows = _undecoded(rows.with_format(None), "image" if kind in (SourceKind.MIMIC_CXR, SourceKind.CSV)
                      else source.image_column)
    if len(rows) == 0:
        raise ValueError(f"{source} split {split!r} has no rows")
    return rows.to_iterable_dataset(num_shards=max(1, min(num_shards, len(rows))))


@dataclass
class PairStream:
    """One process's share of a streamed source, epoch by epoch.

    Each epoch the shards are shuffled and then split across processes (`split_dataset_by_node`), and the rows pass
    a seeded shuffle buffer; `set_epoch` reseeds both, so every epoch has its own order and every process computes
    the same one. The rows this process has read in the epoch are counted (``rows_read``): a run resumed from a
    checkpoint rebuilds the epoch's stream and skips exactly those, so no row is seen twice or skipped.
    (`IterableDataset.state_dict` would lose the rows waiting in the shuffle buffer.) The state is plain numbers
    (`state_dict`, JSON). Bad rows are rejected through a `RowFilter` per epoch: raised with ``strict``, else
    counted and named (``"row 17"``: the 17th row this process read in the epoch) in `report`.

    Args:
        rows: the source's raw rows (`stream_rows`).
        source: the source (the rules of a row, its name).
        seed, buffer_size: the shuffle (``buffer_size`` rows are drawn from at random).
        process_index, num_processes: this process's place.
        decode_threads: threads that decode the images ahead of use (0: decoded as they are used).
    """

    rows: IterableDataset
    source: PairSource
    seed: int = 0
    buffer_size: int = 1000
    process_index: int = 0
    num_processes: int = 1
    decode_threads: int = 0
    epoch: int = 0
    rows_read: int = 0
    _filter: RowFilter | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._rules = _Rules(self.source)
        self._filter = self._new_filter()

    def _new_filter(self) -> RowFilter:
        where = f" process {self.process_index}" if self.num_processes > 1 else ""
        return RowFilter(f"{self.source} epoch {self.epoch}{where}", self.source.strict)

    def epoch_rows(self, epoch: int) -> IterableDataset:
        """This process's rows of `epoch`, in their order (raw, before the row rules)."""
        shuffled = self.rows.shuffle(seed=self.seed, buffer_size=self.buffer_size)
        mine = split_dataset_by_node(shuffled, rank=self.process_index, world_size=self.num_processes)
        mine.set_epoch(epoch)
        return mine

    def pairs(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The good pairs of `epoch` (image decoded, text), continuing after the rows already read in it.
        ``rows_read`` counts the rows up to the last pair given out (rows decoded ahead by the threads are not
        counted: a checkpoint's stream resumes at the first row not given out)."""
        if epoch != self.epoch:
            self.epoch, self.rows_read = epoch, 0
            self._filter = self._new_filter()
        start = self.rows_read
        rows = enumerate(itertools.islice(self.epoch_rows(epoch), start, None), start)
        for position, pair in self._decoded(rows):
            self.rows_read = position + 1
            if isinstance(pair, BadRow):
                self._filter.reject(f"row {position}", pair.reason, pair.detail)
            else:
                yield pair

    def _pair_or_bad(self, row: dict[str, Any]) -> dict[str, Any] | BadRow:
        try:
            return self._rules.pair(row)
        except BadRow as bad:
            return bad

    def _decoded(self, rows: Iterator[tuple[int, dict[str, Any]]]) -> Iterator[tuple[int, Any]]:
        """(position, pair or `BadRow`) in the rows' order. With ``decode_threads`` the images are decoded by that
        many threads, up to twice as many rows ahead (Pillow decodes without the GIL); the rows are read here."""
        if self.decode_threads <= 0:
            for position, row in rows:
                yield position, self._pair_or_bad(row)
            return
        pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="plan-decode")
        window: deque = deque()
        try:
            for position, row in rows:
                window.append((position, pool.submit(self._pair_or_bad, row)))
                if len(window) >= 2 * self.decode_threads:
                    position, future = window.popleft()
                    yield position, future.result()
            while window:
                position, future = window.popleft()
                yield position, future.result()
        finally:  # (an epoch that ends early leaves its decoded-ahead rows unread: they are dropped)
            pool.shutdown(wait=False, cancel_futures=True)

    def report(self) -> LoadReport:
        """This process's bad rows of the epoch so far (``kept``: the good rows read)."""
        report = self._filter.report
        report.kept = self.rows_read - report.num_skipped
        return report

    def _first_good(self, count: int, read) -> list[Any]:
        """`read` of the first `count` good rows in the stored order."""
        found: list[Any] = []
        for row in self.rows:
            try:
                found.append(read(row))
            except BadRow:
                continue
            if len(found) >= count:
                break
        return found

    def texts(self, limit: int) -> list[str]:
        """The first `limit` texts of the source in its stored order (a vocabulary to build a tokenizer from)."""
        return self._first_good(limit, self._rules.text)

    def first(self, count: int) -> list[dict[str, Any]]:
        """The first `count` good pairs in the stored order."""
        return self._first_good(count, self._rules.pair)

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        report = self.report()
        return {"epoch": self.epoch, "rows_read": self.rows_read, "seed": self.seed, "buffer_size": self.buffer_size,
                "process_index": self.process_index, "num_processes": self.num_processes,
                "skipped": {reason.value: count for reason, count in report.skipped.items()},
                "examples": {reason.value: list(examples) for reason, examples in report.examples.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped; `ValueError` naming the setting when the stream would not be the same."""
        for name in ("seed", "buffer_size", "num_processes", "process_index"):
            if state.get(name) != getattr(self, name):
                raise ValueError(f"the streamed data was read with {name}={state.get(name)!r}, this run has "
                                 f"{getattr(self, name)!r}: resume a streamed run with the same settings and number "
                                 "of processes")
        epoch, rows_read = state.get("epoch"), state.get("rows_read")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, rows_read)):
            raise ValueError(f"the streamed data state needs non-negative integers epoch and rows_read, got {state}")
        self.epoch, self.rows_read = epoch, rows_read
        self._filter = self._new_filter()
        report = self._filter.report
        report.skipped = Counter({BadRowReason(k): int(v) for k, v in (state.get("skipped") or {}).items()})
        report.examples = {BadRowReason(k): list(v) for k, v in (state.get("examples") or {}).items()}


def stream_pairs(source: PairSource, split: str = "train", *, seed: int = 0, buffer_size: int = 1000,
                 process_index: int = 0, num_processes: int = 1, max_rows: int | None = None,
                 decode_threads: int = 0) -> PairStream:
    """A `PairStream` over ``split`` of ``source`` (``max_rows``: the first rows only, for quick runs;
    ``decode_threads``: see `PairStream`)."""
    rows = stream_rows(source, split)
    if max_rows is not None:
        rows = rows.take(max_rows)
    if source.kind in (SourceKind.MIMIC_CXR, SourceKind.CSV):  # read by their loaders into image and text already
        source = dataclasses.replace(source, image_column="image", text_column="text")
    return PairStream(rows, source, seed=seed, buffer_size=buffer_size, process_index=process_index,
                      num_processes=num_processes, decode_threads=decode_threads)


def source_from(arguments: Any, data_dir: str | os.PathLike[str] | None = None) -> PairSource:
    """The source an entry point's arguments name (`plan_hf.cli.arguments.SourceArguments` and ``data_dir``)."""
    return PairSource(dataset=arguments.dataset,
                      data_dir=data_dir if data_dir is not None else getattr(arguments, "data_dir", None),
                      image_column=arguments.image_column, text_column=arguments.text_column,
                      strict=arguments.strict, allow_outside_root=arguments.allow_outside_root)
