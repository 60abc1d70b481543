"""Atomic rotated checkpoints, and a run killed with SIGKILL then resumed ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from plan_hf.training.checkpointing import (
    STATE_FILE,
    TrainingProgress,
    latest_checkpoint,
    list_checkpoints,
    resolve_resume,
    save_checkpoint,
)

from .test_training import REPO, data_dir, fresh_accelerate_state, smoke_args, subprocess_env  # noqa: F401


@pytest.fixture
def accelerator():
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    accelerator.model_for_test = model
    return accelerator


def test_rotation_keeps_the_last_k(accelerator, tmp_path):
    for step in (2, 4, 6, 8):
        saved = save_checkpoint(accelerator, tmp_path, TrainingProgress(global_step=step, epoch=1), keep_last=2)
        assert saved.name == f"step-{step:08d}"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000006", "step-00000008"]
    assert sorted(os.listdir(tmp_path)) == ["step-00000006", "step-00000008"]  # no temporary or trash folders left
    assert TrainingProgress.from_file(tmp_path / "step-00000008" / STATE_FILE) == TrainingProgress(8, 1)


def test_a_crash_while_saving_leaves_no_checkpoint(accelerator, tmp_path, monkeypatch):
    save_checkpoint(accelerator, tmp_path, TrainingProgress(global_step=2), keep_last=3)
    real_save_state = accelerator.save_state

    def crash(output_dir, **kwargs):
        real_save_state(output_dir, **kwargs)  # everything written... then the process dies before publishing
        raise KeyboardInterrupt

    monkeypatch.setattr(accelerator, "save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, TrainingProgress(global_step=4), keep_last=3)
    assert (tmp_path / ".tmp-step-00000004").is_dir()
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    # a folder that looks like a checkpoint but has no trainer_state.json (written last) is not one either
    (tmp_path / "step-00000009").mkdir()
    (tmp_path / "step-00000009" / "model.safetensors").write_bytes(b"half")
    assert resolve_resume("auto", tmp_path).name == "step-00000002"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "step-00000009"), tmp_path)
    monkeypatch.undo()
    save_checkpoint(accelerator, tmp_path, TrainingProgress(global_step=4), keep_last=3)  # cleans the leftover
    assert not (tmp_path / ".tmp-step-00000004").exists()
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_resume_none_or_auto_without_checkpoints(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path / "missing") is None


def test_sigkill_then_resume_matches_an_uninterrupted_run(data_dir, tmp_path):  # noqa: F811
    """Kill after the 2nd checkpoint (mid-epoch: 4 steps per epoch, a checkpoint every 3), resume with
    `--resume auto`: the final weights equal those of a run never interrupted (dropout on, 2 micro-batches)."""
    from training.pretrain import main

    overrides = dict(micro_batch_size=2, accumulation_steps=2, max_steps=14, save_every_steps=3, keep_checkpoints=3)
    main(smoke_args(data_dir, tmp_path / "straight", **overrides))
    expected = load_file(tmp_path / "straight" / "model" / "model.safetensors")

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "training.pretrain", *smoke_args(data_dir, out, **overrides)]
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while len(list_checkpoints(out / "checkpoints")) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    stderr = process.communicate()[1].decode()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr[-3000:]}"
    assert not (out / "model").exists()
    resumed_from = latest_checkpoint(out / "checkpoints")
    progress = TrainingProgress.from_file(resumed_from / STATE_FILE)
    assert 6 <= progress.global_step < 14 and progress.global_step % 4 != 0  # a mid-epoch checkpoint

    main(smoke_args(data_dir, out, resume="auto", **overrides))
    got = load_file(out / "model" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 15))  # the killed run's steps after the checkpoint were dropped, then re-logged
