"""Atomic, rotated training checkpoints: `accelerator.save_state` plus a small trainer_state.json.

A checkpoint is written into `checkpoints/.tmp-step-XXXXXXXX`, flushed to disk (fsync), its trainer_state.json
written last, then renamed to `checkpoints/step-XXXXXXXX` in one `os.replace`. A crash at any point leaves either
the complete folder or a hidden temporary one, which `list_checkpoints` ignores (and the next save removes). Old
checkpoints are renamed away before they are deleted, for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainingProgress:
    """Where a run is: enough, with the accelerator state, to continue it mid-epoch exactly."""

    global_step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    epoch: int = 0  # the epoch in progress (its shuffle is seeded by it)
    batches_in_epoch: int = 0  # batches of that epoch already consumed, skipped on resume
    samples_seen: int = 0  # over all processes
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient, in total

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainingProgress":
        values = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` (and `root`) to disk, so the rename publishes complete data."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and _NAME.match(path.name) is not None and (path / STATE_FILE).is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary and half-written folders are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if is_complete(path)]
    return sorted(found, key=lambda path: int(_NAME.match(path.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(resume: str | None, root: str | Path) -> Path | None:
    """`resume`: None (start fresh), "auto" (the latest complete checkpoint under `root`, if any) or a folder."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"resume={resume!r} is not a complete checkpoint folder (step-XXXXXXXX with {STATE_FILE})")
    return path


def _remove(path: Path) -> None:
    """Rename out of the `step-*` namespace first, so a crash mid-delete cannot leave a half checkpoint listed."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(accelerator, root: str | Path, progress: TrainingProgress, keep_last: int) -> Path:
    """Save the accelerator state (model, optimizer, scaler, registered objects, every process's RNG) and
    `progress` atomically as `root/step-XXXXXXXX`; keep the `keep_last` newest. Call on every process."""
    root = Path(root)
    final = root / checkpoint_name(progress.global_step)
    temporary = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)  # left over by a crash
        temporary.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / STATE_FILE).write_text(progress.to_json())
        _fsync_tree(temporary)
        if final.exists():  # the same step saved before (a run resumed from an older checkpoint)
            _remove(final)
        os.replace(temporary, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> TrainingProgress:
    """Restore the accelerator state of a complete checkpoint; return its progress."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    accelerator.load_state(str(path))
    return TrainingProgress.from_file(path / STATE_FILE)


__all__ = [
    "STATE_FILE",
    "TrainingProgress",
    "checkpoint_name",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_resume",
    "save_checkpoint",
]
