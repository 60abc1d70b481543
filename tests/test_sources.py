"""Image-report pairs from every kind of source (`plan_hf.data.sources`), each written here as a tiny copy: the same
pairs in memory and streamed, bad rows counted or raised, and a stream that splits across processes, reshuffles
each epoch and resumes exactly where it stopped."""

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset, DatasetDict, Image
from PIL import Image as PILImage

from plan_hf.data.bad_rows import BadRowReason
from plan_hf.data.sources import PairSource, PairStream, load_pairs, source_splits, stream_pairs

from .layouts import write_corrupt_image, write_image

@pytest.fixture(autouse=True)
def no_parquet_shutdown_sleep(monkeypatch):
    """`datasets` waits 5 s after each streamed pass over parquet files (for Arrow's reader threads to end before
    the interpreter does, apache/arrow#45214); the threads are joined before that wait, and tests end no interpreter."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


TEXTS = [("Finding 0.", "Impression 0."), ("Finding 1.", None), ("", "Impression 2."), ("Finding 3.", "Impression 3."),
         ("Finding 4.", "Impression 4."), ("Finding 5.", "Impression 5."), (None, "")]  # the last has no text
EXPECTED = {"Finding 0.\n\nImpression 0.": 0, "Finding 1.": 1, "Impression 2.": 2, "Finding 3.\n\nImpression 3.": 3,
            "Finding 4.\n\nImpression 4.": 4, "Finding 5.\n\nImpression 5.": 5}
BOTH = ["findings", "impression"]


def _image(seed: int) -> PILImage.Image:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    PILImage.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return PILImage.open(io.BytesIO(buffer.getvalue()))


def _records(folder: Path, column: str = "path") -> list[dict]:
    """The rows, their PNGs written under `folder/images`, paths relative to `folder`."""
    rows = []
    for i, (findings, impression) in enumerate(TEXTS):
        write_image(folder / "images" / f"img{i}.png", seed=i)
        rows.append({column: f"images/img{i}.png", "findings": findings, "impression": impression})
    return rows


def _png_bytes(folder: Path, i: int) -> bytes:
    return (folder / "images" / f"img{i}.png").read_bytes()


def _with_bytes(folder: Path) -> Dataset:
    rows = _records(folder)
    return Dataset.from_dict({
        "image": [{"bytes": _png_bytes(folder, i), "path": f"img{i}.png"} for i in range(len(rows))],
        "findings": [r["findings"] for r in rows], "impression": [r["impression"] for r in rows],
    }).cast_column("image", Image())


def csv_list(tmp: Path) -> PairSource:
    pd.DataFrame(_records(tmp)).to_csv(tmp / "pairs.csv", index=False)
    return PairSource("csv", tmp / "pairs.csv", image_column="path", text_column=BOTH)


def jsonl_list(tmp: Path) -> PairSource:
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _records(tmp)))
    return PairSource("jsonl", tmp / "pairs.jsonl", image_column="path", text_column=BOTH)


def imagefolder_jsonl(tmp: Path) -> PairSource:
    (tmp / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _records(tmp, "file_name")))
    return PairSource("imagefolder", tmp, text_column=BOTH, cache_dir=str(tmp.parent / "cache"))


def imagefolder_csv(tmp: Path) -> PairSource:
    pd.DataFrame(_records(tmp, "file_name")).to_csv(tmp / "metadata.csv", index=False)
    return PairSource("imagefolder", tmp, text_column=BOTH, cache_dir=str(tmp.parent / "cache"))


def disk_image_feature(tmp: Path) -> PairSource:
    _with_bytes(tmp / "png").save_to_disk(tmp / "saved")
    return PairSource("disk", tmp / "saved", text_column=BOTH)


def disk_bytes_splits(tmp: Path) -> PairSource:
    rows = _records(tmp / "png")
    data = Dataset.from_dict({"png": [_png_bytes(tmp / "png", i) for i in range(len(rows))],
                              "findings": [r["findings"] for r in rows], "impression": [r["impression"] for r in rows]})
    DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(tmp / "saved")
    return PairSource("disk", tmp / "saved", image_column="png", text_column=BOTH)


def disk_paths(tmp: Path) -> PairSource:
    rows = _records(tmp / "saved_images")  # paths relative to the saved folder's parent: moved under it below
    data = Dataset.from_dict({"file": [f"images/img{i}.png" for i in range(len(rows))],
                              "findings": [r["findings"] for r in rows], "impression": [r["impression"] for r in rows]})
    data.save_to_disk(tmp / "saved")
    shutil.move(tmp / "saved_images" / "images", tmp / "saved" / "images")
    return PairSource("disk", tmp / "saved", image_column="file", text_column=BOTH)


def parquet_folder(tmp: Path) -> PairSource:
    (tmp / "parquet").mkdir(parents=True)
    _with_bytes(tmp / "png").to_parquet(tmp / "parquet" / "train-00000-of-00001.parquet")
    return PairSource("parquet", tmp / "parquet", text_column=BOTH, cache_dir=str(tmp / "cache"))


def arrow_file(tmp: Path) -> PairSource:
    _with_bytes(tmp / "png").save_to_disk(tmp / "saved")
    return PairSource("arrow", next((tmp / "saved").glob("*.arrow")), text_column=BOTH, cache_dir=str(tmp / "cache"))


def load_dataset_folder(tmp: Path) -> PairSource:
    (tmp / "hub" / "data").mkdir(parents=True)
    _with_bytes(tmp / "png").to_parquet(tmp / "hub" / "data" / "train.parquet")
    return PairSource(str(tmp / "hub"), text_column=BOTH, cache_dir=str(tmp / "cache"))


SOURCES = {f.__name__: f for f in (csv_list, jsonl_list, imagefolder_jsonl, imagefolder_csv, disk_image_feature,
                                   disk_bytes_splits, disk_paths, parquet_folder, arrow_file, load_dataset_folder)}


@pytest.mark.parametrize("make", SOURCES.values(), ids=SOURCES.keys())
def test_every_source_gives_the_same_pairs_in_memory_and_streamed(make, tmp_path):
    source = make(tmp_path / "data")
    pairs, report = load_pairs(source, "train", return_report=True)
    assert pairs.column_names == ["image", "text"] and isinstance(pairs.features["image"], Image)
    assert report.kept == 6 and report.skipped == Counter({BadRowReason.EMPTY_REPORT: 1}), report
    got = {row["text"]: np.asarray(row["image"]) for row in pairs}
    assert got.keys() == EXPECTED.keys()
    for text, seed in EXPECTED.items():
        np.testing.assert_array_equal(got[text], np.asarray(_image(seed)), err_msg=text)

    stream = stream_pairs(source, "train", seed=1, buffer_size=3)
    streamed = {pair["text"]: np.asarray(pair["image"]) for pair in stream.pairs(0)}
    assert streamed.keys() == EXPECTED.keys()
    for text in EXPECTED:
        np.testing.assert_array_equal(streamed[text], got[text], err_msg=text)
    assert stream.report().kept == 6 and stream.report().num_skipped == (0 if source.kind.value == "csv" else 1)
    assert list(tmp_path.rglob("cache-*.arrow")) == []  # nothing written into the data's own folders


def test_splits_are_found_and_a_missing_one_is_named(tmp_path):
    source = disk_bytes_splits(tmp_path / "data")
    assert source_splits(source) == ["train", "test"] and len(load_pairs(source, "test")) == 1
    with pytest.raises(ValueError, match=r"no split 'validate' \(its splits: train, test\)"):
        load_pairs(source, "validate")
    assert source_splits(csv_list(tmp_path / "list")) is None  # a list has none: every split reads all of it
    assert len(load_pairs(csv_list(tmp_path / "list2"), "test")) == 6
    assert source_splits(parquet_folder(tmp_path / "pq")) == ["train"]


def test_a_missing_column_lists_those_there_are(tmp_path):
    for source in (disk_image_feature(tmp_path / "a"), csv_list(tmp_path / "b")):
        source.text_column = ["findings", "report"]
        with pytest.raises(ValueError, match=r"no column 'report' \(its columns: .*findings, impression"):
            load_pairs(source)
    source = disk_image_feature(tmp_path / "c")
    source.text_column = "report"
    stream = stream_pairs(source)
    with pytest.raises(ValueError, match=r"has no column 'report' \(its columns: image, findings, impression\)"):
        next(stream.pairs(0))
    with pytest.raises(ValueError, match="needs data_dir"):
        PairSource("parquet")
    with pytest.raises(ValueError, match="leave data_dir unset"):
        PairSource("someone/cxr-reports", data_dir="x")


def test_paths_outside_the_root_missing_files_and_strict(tmp_path):
    root = tmp_path / "data"
    rows = _records(root)[:3]
    write_image(root / "outside.png", seed=9)
    rows.append({"path": "../outside.png", "findings": "Outside.", "impression": None})
    rows.append({"path": "images/gone.png", "findings": "Gone.", "impression": None})
    Dataset.from_list(rows).save_to_disk(root / "saved")
    shutil.move(root / "images", root / "saved" / "images")
    source = PairSource("disk", root / "saved", image_column="path", text_column=BOTH)
    pairs, report = load_pairs(source, return_report=True)
    assert sorted(pairs["text"]) == ["Finding 0.\n\nImpression 0.", "Finding 1.", "Impression 2."]
    assert report.skipped == Counter({BadRowReason.OUTSIDE_ROOT: 1, BadRowReason.MISSING_IMAGE: 1})
    assert any("row 3: field 'path' leads outside the dataset folder" in e
               for e in report.examples[BadRowReason.OUTSIDE_ROOT])
    source.allow_outside_root = True
    assert "Outside." in load_pairs(source)["text"]
    source.strict = True
    with pytest.raises(ValueError, match=r"row 4: missing image file .*gone.png \(field 'path'\)"):
        load_pairs(source)


@pytest.mark.parametrize("threads", [0, 3], ids=["decoded-in-turn", "decoded-ahead-by-threads"])
def test_streamed_bad_rows_are_named_and_counted_or_raised(threads, tmp_path):
    data = _with_bytes(tmp_path / "png")
    broken = write_corrupt_image(tmp_path / "png" / "broken.png").read_bytes()
    data = data.cast_column("image", Image(decode=False))
    rows = data.to_list()
    rows[4]["image"] = {"bytes": broken, "path": "broken.png"}
    Dataset.from_list(rows).cast_column("image", Image()).save_to_disk(tmp_path / "saved")
    source = PairSource("disk", tmp_path / "saved", text_column=BOTH)
    stream = stream_pairs(source, buffer_size=2, decode_threads=threads)
    texts = [pair["text"] for pair in stream.pairs(0)]
    assert len(texts) == 5 and "Finding 4.\n\nImpression 4." not in texts
    report = stream.report()
    assert report.kept == 5 and report.skipped == Counter({BadRowReason.EMPTY_REPORT: 1,
                                                           BadRowReason.UNREADABLE_IMAGE: 1})
    (unreadable,) = report.examples[BadRowReason.UNREADABLE_IMAGE]
    assert report.source == f"{source} epoch 0"
    assert unreadable.startswith("row ") and ": unreadable image broken.png: " in unreadable
    source.strict = True
    with pytest.raises(ValueError, match=r"epoch 0: row \d: unreadable image broken.png"):
        list(stream_pairs(source, buffer_size=2, decode_threads=threads).pairs(0))


def _numbered(tmp_path: Path, count: int = 40) -> PairSource:
    """`count` rows in 4 parquet files (4 shards), text "row <i>", a row with no text every 10th."""
    write_image(tmp_path / "x.png")
    png = (tmp_path / "x.png").read_bytes()
    (tmp_path / "pq").mkdir()
    for shard in range(4):
        ids = range(shard * count // 4, (shard + 1) * count // 4)
        Dataset.from_dict({"image": [png] * len(ids), "text": ["" if i % 10 == 7 else f"row {i}" for i in ids]},
                          ).to_parquet(tmp_path / "pq" / f"train-{shard:05d}-of-00004.parquet")
    return PairSource("parquet", tmp_path / "pq", image_column="image", cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("threads", [0, 3], ids=["decoded-in-turn", "decoded-ahead-by-threads"])
def test_a_stream_splits_across_processes_reshuffles_each_epoch_and_resumes_exactly(threads, tmp_path):
    """With decoding threads too: the rows decoded ahead of a stop are not counted as read, so the resumed stream
    gives them again (and the stopped one's order is the plain one)."""
    source = _numbered(tmp_path)
    good = {f"row {i}" for i in range(40) if i % 10 != 7}

    def streams():
        return [stream_pairs(source, seed=5, buffer_size=4, process_index=rank, num_processes=2,
                             decode_threads=threads) for rank in (0, 1)]

    epochs = []
    for epoch in (0, 1):
        orders = [[pair["text"] for pair in stream.pairs(epoch)] for stream in streams()]
        assert sorted(orders[0] + orders[1]) == sorted(good)  # every good row once per epoch, over both processes
        assert set(orders[0]).isdisjoint(orders[1])
        epochs.append(orders)
    assert epochs[0][0] != epochs[1][0]  # set_epoch: another order
    plain = [[p["text"] for p in stream_pairs(source, seed=5, buffer_size=4, process_index=rank,
                                              num_processes=2).pairs(1)] for rank in (0, 1)]
    assert epochs[1] == plain  # threads change no order
    assert [[p["text"] for p in s.pairs(1)] for s in streams()] == epochs[1]  # seeded: the same again

    for rank in (0, 1):  # stopped after 7 pairs of epoch 1, resumed from the JSON state in a fresh stream
        stopped = streams()[rank]
        pairs = stopped.pairs(1)
        first = [next(pairs)["text"] for _ in range(7)]
        state = json.loads(json.dumps(stopped.state_dict()))
        resumed = streams()[rank]
        resumed.load_state_dict(state)
        rest = [pair["text"] for pair in resumed.pairs(1)]
        assert first + rest == epochs[1][rank]
        straight = streams()[rank]
        list(straight.pairs(1))
        assert resumed.report().skipped == straight.report().skipped  # the bad rows before the stop are kept too
        assert resumed.rows_read == straight.rows_read
    with pytest.raises(ValueError, match="num_processes=2, this run has 1"):
        stream_pairs(source, seed=5, buffer_size=4).load_state_dict(state)


def test_a_stream_takes_max_rows_and_names_texts_for_a_vocabulary(tmp_path):
    source = _numbered(tmp_path)
    stream = stream_pairs(source, max_rows=12)
    assert stream.texts(100) == [f"row {i}" for i in range(12) if i != 7]
    assert [pair["text"] for pair in stream.first(2)] == ["row 0", "row 1"]
    assert isinstance(stream, PairStream) and sorted(p["text"] for p in stream.pairs(0)) == sorted(stream.texts(100))


def test_report_generation_reads_a_source_and_splits_one_without_a_test_split(tmp_path):
    from plan_hf.generation.data import load_report_data
    from plan_hf.generation.finetune import GenerationFinetuneConfig

    config = GenerationFinetuneConfig(model="random", config="tiny-resnet", dataset="csv", out=str(tmp_path / "out"),
                                      data=str(csv_list(tmp_path / "list").data_dir), image_column="path",
                                      text_column=BOTH)
    data = load_report_data(config.dataset, config.data, source=config.source, split_seed=3)
    train, test = set(data.train["text"]), set(data.test["text"])
    assert train | test == {" ".join(text.split()) for text in EXPECTED} and not train & test  # a partition
    assert len(test) == 1 and data.test["dicom_id"] == ["test-0"]  # 20% of the 6 pairs, named by split and row
    splits = load_report_data("disk", None, source=disk_bytes_splits(tmp_path / "saved"))
    assert (len(splits.train), len(splits.test)) == (6, 1)  # its own train and test splits
    with pytest.raises(ValueError, match="needs data_dir"):
        GenerationFinetuneConfig(model="random", config="tiny-resnet", dataset="parquet", data=None, out="x")
