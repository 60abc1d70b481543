"""Pre-training from sources other than the MIMIC-CXR tree: a CSV list of images and reports (then evaluated from
it), and a streamed save_to_disk folder whose run, killed with SIGKILL and resumed, on one process and on two, ends
where an uninterrupted run ends, with its bad rows reported every epoch."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from datasets import Dataset, Image
from safetensors.torch import load_file

from plan_hf.data.loaders import load_mimic_cxr
from plan_hf.training.checkpointing import DATA_STATE_FILE, STATE_FILE, TrainingProgress, list_checkpoints
from plan_hf.training.config import ConfigError, PretrainConfig, load_config

from .test_training import (  # noqa: F401
    REPO,
    data_dir,
    fresh_accelerate_state,
    run_to_end,
    signal_tree,
    smoke_args,
    subprocess_env,
    two_process_command,
)

LABELS = ["Pleural Effusion", "Cardiomegaly"]


@pytest.fixture(scope="module")
def train_rows(data_dir):  # noqa: F811
    """The synthetic set's training split: image paths, findings and impression apart, two labels."""
    rows = load_mimic_cxr(data_dir, split="train").cast_column("image", Image(decode=False)).to_list()
    out = []
    for row in rows:
        findings, _, impression = row["text"].partition("\n\n")
        out.append({"path": os.path.relpath(row["image"]["path"], data_dir), "findings": findings,
                    "impression": impression, **{name: row[name] for name in LABELS}})
    return out


def test_pretraining_from_a_csv_list_then_evaluating_from_it(data_dir, train_rows, tmp_path):  # noqa: F811
    """Three lines: a CSV of image paths and reports, `--dataset csv`, and the text columns to join."""
    from plan_hf.cli.eval import main as evaluate
    from training.pretrain import main

    rows = train_rows + [{**train_rows[0], "findings": "", "impression": ""}]  # a row with no text: skipped, counted
    pd.DataFrame(rows).to_csv(data_dir / "pairs.csv", index=False)
    out = tmp_path / "run"
    main(smoke_args(data_dir / "pairs.csv", out, dataset="csv", image_column="path",
                    text_column="[findings, impression]", max_steps=3, save_every_steps=3))
    settings = json.loads((out / "model" / "plan_training_config.json").read_text())
    assert settings["num_train_samples"] == len(train_rows) and settings["dataset"] == "csv"
    assert settings["text_column"] == ["findings", "impression"]
    from plan_hf import PlanProcessor

    vocabulary = PlanProcessor.from_pretrained(out / "model").tokenizer.get_vocab()
    assert "effusion" in vocabulary  # the tokenizer was built from the joined report texts

    metrics = evaluate(["--model_name_or_path", str(out / "model"), "--suite", "image-text", "--dataset", "csv",
                        "--data_dir", str(data_dir / "pairs.csv"), "--image_column", "path",
                        "--text_column", "[findings, impression]", "--label_columns", *LABELS,
                        "--output_dir", str(tmp_path / "eval"), "--n_boot", "10", "--progress", "false"])
    assert metrics["suite"] == "image-text" and metrics["retrieval"]["num_images"] == len(train_rows)
    assert sorted(metrics["zero_shot"]["binary"]["findings"]) == sorted(LABELS)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["retrieval"] == metrics["retrieval"]


def test_streaming_needs_max_steps_and_no_verify_pass():
    with pytest.raises(ConfigError, match="streaming: true needs max_steps"):
        PretrainConfig(streaming=True)
    with pytest.raises(ConfigError, match="verify_images decodes every image before training"):
        load_config("smoke", ["--streaming", "true", "--verify_images", "true"])


@pytest.fixture(scope="module")
def saved_pairs(train_rows, data_dir, tmp_path_factory):  # noqa: F811
    """The training pairs as a save_to_disk folder (images embedded), plus one row without a report."""
    rows = train_rows + [{**train_rows[1], "findings": None, "impression": None}]
    folder = tmp_path_factory.mktemp("saved") / "pairs"
    Dataset.from_dict({"image": [str(data_dir / row["path"]) for row in rows],
                       "findings": [row["findings"] for row in rows],
                       "impression": [row["impression"] for row in rows]}).cast_column("image", Image()) \
        .save_to_disk(folder)
    return folder


STREAMED = dict(dataset="disk", streaming=True, text_column="[findings, impression]", shuffle_buffer_size=4,
                micro_batch_size=2, accumulation_steps=2, max_steps=12, save_every_steps=3, keep_checkpoints=4)


def _kill_after_checkpoints(command, out, count, env):
    """Start `command` and SIGKILL it and every process it started once `count` checkpoints exist."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(list_checkpoints(out / "checkpoints")) < count and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    signal_tree(process.pid, signal.SIGKILL)
    stderr = process.communicate()[1].decode()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr[-3000:]}"
    assert not (out / "model").exists()


def _same_weights(got_dir, expected_dir):
    got = load_file(got_dir / "model" / "model.safetensors")
    expected = load_file(expected_dir / "model" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_streamed_run_killed_then_resumed_matches_an_uninterrupted_one(saved_pairs, train_rows, tmp_path):
    """(Images decoded ahead by 2 threads, num_workers: the rows decoded but not used when it is killed are read
    again by the resumed run.)"""
    from training.pretrain import main

    settings = {**STREAMED, "num_workers": 2}
    main(smoke_args(saved_pairs, tmp_path / "straight", **settings))
    log = [json.loads(line) for line in (tmp_path / "straight" / "logs" / "metrics.jsonl").read_text().splitlines()]
    epochs = [record for record in log if record.get("event") == "bad_rows"]
    # every epoch reports its bad rows: the one row without a report, named, each complete epoch
    assert [e["complete"] for e in epochs] == [True] * (len(epochs) - 1) + [False] and len(epochs) >= 3
    for record in epochs[:-1]:
        assert record["rows_read"] == len(train_rows) + 1 and record["bad_rows"] == 1
        assert record["by_reason"] == {"empty_report": 1} and "no text in findings=None" in record["examples"][0]

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "training.pretrain", *smoke_args(saved_pairs, out, **settings)]
    _kill_after_checkpoints(command, out, 2, subprocess_env())
    checkpoint = list_checkpoints(out / "checkpoints")[-1]
    progress = TrainingProgress.from_file(checkpoint / STATE_FILE)
    stream_state = json.loads((checkpoint / DATA_STATE_FILE.format(0)).read_text())
    assert progress.global_step < 12 and 0 < stream_state["rows_read"]  # stopped inside an epoch of the stream

    main(smoke_args(saved_pairs, out, resume="auto", **settings))
    _same_weights(out, tmp_path / "straight")
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()
             if "loss" in line]
    assert steps == list(range(1, 13))


def test_streamed_unreadable_images_past_the_allowed_share_stop_the_run(saved_pairs, tmp_path):
    from plan_hf.training.loop import BadDataError
    from training.pretrain import main

    rows = Dataset.load_from_disk(saved_pairs).cast_column("image", Image(decode=False)).to_list()
    rows[2]["image"] = {"bytes": rows[2]["image"]["bytes"][:200], "path": "truncated.png"}  # opens, fails to decode
    damaged = tmp_path / "damaged"
    Dataset.from_list(rows).cast_column("image", Image()).save_to_disk(damaged)
    with pytest.raises(BadDataError, match=r"1 unreadable images in epoch 0 of 18 rows read.*"
                                           r"row \d+: unreadable image truncated.png"):
        main(smoke_args(damaged, tmp_path / "run", **STREAMED, max_bad_sample_fraction=0.0))


def test_a_two_process_streamed_run_killed_then_resumed_matches(saved_pairs, tmp_path):
    # more steps than one process runs: two busy processes leave the watcher few chances to see the checkpoints
    settings = {**STREAMED, "max_steps": 18}

    run_to_end(two_process_command(saved_pairs, tmp_path / "straight", **settings))
    out = tmp_path / "killed"
    _kill_after_checkpoints(two_process_command(saved_pairs, out, **settings), out, 2, subprocess_env())
    checkpoint = list_checkpoints(out / "checkpoints")[-1]
    assert {json.loads((checkpoint / DATA_STATE_FILE.format(i)).read_text())["process_index"] for i in (0, 1)} \
        == {0, 1}
    run_to_end(two_process_command(saved_pairs, out, resume="auto", **settings))
    _same_weights(out, tmp_path / "straight")
    log = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 19))
    assert all(r["bad_rows"] <= 1 for r in log if r.get("event") == "bad_rows")
