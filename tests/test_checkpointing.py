"""Atomic rotated checkpoints, verified before they are trusted and holding nothing that runs code when loaded;
a run killed with SIGKILL then resumed ends where an uninterrupted run ends."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import get_scheduler

from plan_hf.training.checkpointing import (
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointError,
    TrainingProgress,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    write_manifest,
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
    # a folder that looks like a checkpoint but has no checksum manifest (written last) is not one either
    (tmp_path / "step-00000009").mkdir()
    (tmp_path / "step-00000009" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "step-00000009" / STATE_FILE).write_text(TrainingProgress(9).to_json())
    assert resolve_resume("auto", tmp_path).name == "step-00000002"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
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


# ----------------------------------------------------------------------------------------------------------------------
# Nothing unpickled, everything verified
# ----------------------------------------------------------------------------------------------------------------------
class _Training:
    """A model, AdamW and a schedule prepared by a CPU accelerator: every kind of state a checkpoint holds."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = get_scheduler("cosine", self.optimizer, num_warmup_steps=1, num_training_steps=10)

    def step(self) -> None:
        self.model(torch.randn(4, 3)).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()

    def save(self, root, step: int):
        return save_checkpoint(self.accelerator, root, TrainingProgress(global_step=step), 5, self.scheduler)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_a_checkpoint_round_trips_without_pickle(tmp_path):
    run = _Training()
    for _ in range(3):
        run.step()
    saved = run.save(tmp_path, 3)
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    moments = run.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    rate = run.scheduler.get_last_lr()
    expected = _draws()
    # no file a loader would have to unpickle beyond tensors: accelerate's pickled schedule and RNG are not there
    names = sorted(os.listdir(saved))
    assert not [name for name in names if name.endswith(".pkl")], names
    expected_files = {MANIFEST_FILE, STATE_FILE, "scheduler.json", "random_states_0.safetensors", "model.safetensors"}
    assert expected_files <= set(names)

    fresh = _Training(seed=1)
    fresh.step()
    progress = load_checkpoint(fresh.accelerator, saved, fresh.scheduler)
    assert progress.global_step == 3
    for name, value in weights.items():
        torch.testing.assert_close(fresh.model.state_dict()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(fresh.optimizer.state_dict()["state"][0]["exp_avg"], moments, rtol=0, atol=0)
    assert fresh.scheduler.get_last_lr() == rate and fresh.scheduler.last_epoch == 3
    assert _draws() == expected  # Python, NumPy and torch generators are where they were at the save


def _flip_model_bytes(checkpoint):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 64, len(data)):  # the last 64 bytes: tensor data, the header still parses
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return "model.safetensors"


def _truncate(name):
    def damage(checkpoint):
        path = checkpoint / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return name
    return damage


def _bad_state(checkpoint):
    (checkpoint / STATE_FILE).write_text('{"global_step": 4, "epoch": ')
    return STATE_FILE


DAMAGE = {"flipped model bytes": _flip_model_bytes, "truncated random states": _truncate("random_states_0.safetensors"),
          "truncated optimizer": _truncate("optimizer.bin"), "bad trainer_state.json": _bad_state}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    run = _Training()
    run.step()
    first = run.save(tmp_path, 1)
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.step()
    bad_file = damage(run.save(tmp_path, 2))

    with caplog.at_level("WARNING", logger="plan_hf.training.checkpointing"):
        chosen = resolve_resume("auto", tmp_path)
    assert chosen == first
    assert f"step-00000002: {bad_file}" in caplog.text and "falling back" in caplog.text
    fresh = _Training(seed=1)
    assert load_checkpoint(fresh.accelerator, chosen, fresh.scheduler).global_step == 1
    for name, value in weights.items():
        torch.testing.assert_close(fresh.model.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=bad_file):  # asked for by name: no silent fallback
        resolve_resume(str(tmp_path / "step-00000002"), tmp_path)


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_only_checkpoint_fails_clearly(tmp_path, damage):
    run = _Training()
    run.step()
    bad_file = damage(run.save(tmp_path, 1))
    with pytest.raises(CheckpointError, match=rf"no intact checkpoint under .*\n.*step-00000001: {bad_file}"):
        resolve_resume("auto", tmp_path)
    with pytest.raises(CheckpointError, match=bad_file):
        load_checkpoint(_Training().accelerator, tmp_path / "step-00000001")


class _WritesAFile:
    """A pickle that creates a file when it is loaded: what a crafted checkpoint would do, harmlessly."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_slipped_into_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "ran"
    run = _Training()
    run.step()
    checkpoint = run.save(tmp_path / "ckpt", 1)
    # the file accelerate would load with weights_only=False had the schedule been registered with it
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_WritesAFile(marker)))
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl is not listed in the checksum manifest"):
        resolve_resume("auto", tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl"):
        load_checkpoint(_Training().accelerator, checkpoint, run.scheduler)
    assert not marker.exists()

    # listed in a rewritten manifest, in place of a file that loads with weights_only=True: refused before loading
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    torch.save({"state": _WritesAFile(marker)}, checkpoint / "optimizer.bin")
    write_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="optimizer.bin holds pickled objects that could run code"):
        load_checkpoint(_Training().accelerator, checkpoint, run.scheduler)
    assert not marker.exists()
