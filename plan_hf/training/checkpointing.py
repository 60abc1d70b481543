"""Atomic, rotated, verified training checkpoints: `accelerator.save_state` plus the loop's own state as JSON and
safetensors, and a checksum manifest.

A checkpoint is written into `checkpoints/.tmp-step-XXXXXXXX`, flushed to disk (fsync), its checksum manifest
(`checksums.json`: the size and sha256 of every file) written last, then renamed to `checkpoints/step-XXXXXXXX` in
one `os.replace`. A crash at any point leaves either the complete folder or a hidden temporary one, which
`list_checkpoints` ignores (and the next save removes). Old checkpoints are renamed away before they are deleted,
for the same reason.

Nothing in a checkpoint can run code when it is loaded. The model is safetensors; the progress, the learning-rate
schedule, where each process's data stream has got to and the random states are JSON and safetensors written here (accelerate would pickle the schedule and the
random states); the optimizer and fp16 scaler states that accelerate writes with `torch.save` are scanned for
pickled objects beyond plain containers and tensors before `accelerator.load_state` reads them with
`weights_only=True`. On resume the manifest is checked first: a file that changed, is missing or is not listed
makes the checkpoint bad, and `resolve_resume("auto")` falls back to the previous good one with a warning naming
the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "checksums.json"
SCHEDULER_FILE = "scheduler.json"
DATA_STATE_FILE = "data_state_{}.json"  # one per process: where its share of a streamed data set has got to
_RANDOM_STATES = "random_states_{}.safetensors"  # one per process
_ACCELERATE_RANDOM_STATES = "random_states_{}.pkl"  # accelerate's pickled version, replaced by the one above
_NAME = re.compile(r"^step-(\d{8})$")
_PICKLED = (".bin", ".pt", ".pth", ".pkl")  # files written with torch.save (optimizer.bin, scaler.pt)
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or loaded; the message names the checkpoint and the file."""


@dataclass
class TrainingProgress:
    """Where a run is: enough, with the accelerator state, to continue it mid-epoch exactly."""

    global_step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    epoch: int = 0  # the epoch in progress (its shuffle is seeded by it)
    batches_in_epoch: int = 0  # batches of that epoch already consumed, skipped on resume
    samples_seen: int = 0  # over all processes
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient, in total
    bad_samples: int = 0  # samples whose image could not be decoded (replaced by the next good ones), in total
    bad_samples_in_epoch: int = 0  # the same, in the epoch in progress (checked against max_bad_sample_fraction)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainingProgress":
        """Read a trainer_state.json; `CheckpointError` naming the file and the field when it is not one."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: not a readable JSON file ({error})") from error
        if not isinstance(values, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in known & values.keys():
            if not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 0:
                raise CheckpointError(f"{path}: {key} must be a non-negative integer, got {values[key]!r}")
        if "global_step" not in values:
            raise CheckpointError(f"{path}: no global_step")
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


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------------------------------
# The checksum manifest
# ---------------------------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file under `folder` (relative, '/'-separated), the manifest left out."""
    found = (path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return sorted(name for name in found if name != MANIFEST_FILE)


def write_manifest(folder: str | Path) -> Path:
    """Record the size and sha256 of every file in `folder` in `folder/checksums.json` (written atomically)."""
    folder = Path(folder)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
             for name in _files(folder)}
    path = folder / MANIFEST_FILE
    _write_atomically(path, json.dumps({"algorithm": "sha256", "files": files}, indent=2))
    return path


def _pickle_problem(path: Path) -> str | None:
    """A torch.save file may hold tensors and plain containers only: anything else could run code on loading.
    The pickle's globals are listed without loading it."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as error:  # noqa: BLE001 - not a torch.save archive at all
        return f"is not a torch.save archive ({type(error).__name__}: {error})"
    if unsafe:
        return f"holds pickled objects that could run code when loaded ({', '.join(unsafe)}): refusing to load it"
    return None


_verified: dict[Path, tuple] = {}  # checkpoints found good, with the (name, size, mtime) of their files then


def _signature(folder: Path) -> tuple:
    return tuple((name, (folder / name).stat().st_size, (folder / name).stat().st_mtime_ns)
                 for name in [MANIFEST_FILE, *_files(folder)])


def verify_checkpoint(path: str | Path) -> None:
    """Check a checkpoint against its manifest: every listed file present with its size and sha256, no file that
    is not listed, trainer_state.json readable, and the torch.save files holding tensors and containers only.
    Raises `CheckpointError` naming the checkpoint and the first bad file."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir() or not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST_FILE}, which is written last)")
    signature = _signature(path)
    if _verified.get(path.resolve()) == signature:
        return

    def bad(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {name} {why}")

    try:
        listed = json.loads(manifest_path.read_text())["files"]
        assert isinstance(listed, dict) and all(isinstance(e, dict) for e in listed.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as error:
        raise bad(MANIFEST_FILE, f"is not a checksum manifest ({type(error).__name__}: {error})") from error
    for name, expected in listed.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise bad(MANIFEST_FILE, f"lists a file outside the checkpoint: {name!r}")
        if not file.is_file():
            raise bad(name, "is missing")
        size = file.stat().st_size
        if size != expected.get("size"):
            raise bad(name, f"has {size} bytes, the manifest says {expected.get('size')} (truncated or replaced)")
        if _sha256(file) != expected.get("sha256"):
            raise bad(name, "does not match its sha256 checksum (corrupted or modified)")
    unexpected = sorted(set(_files(path)) - set(listed))
    if unexpected:
        raise bad(unexpected[0], "is not listed in the checksum manifest: refusing a checkpoint with files that "
                                 "training did not write" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1
                                                             else ""))
    if STATE_FILE not in listed:
        raise bad(STATE_FILE, "is missing")
    TrainingProgress.from_file(path / STATE_FILE)
    for name in listed:
        problem = _pickle_problem(path / name) if name.endswith(_PICKLED) else None
        if problem is not None:
            raise bad(name, problem)
    _verified[path.resolve()] = signature


# ---------------------------------------------------------------------------------------------------------------------
# Listing and choosing
# ---------------------------------------------------------------------------------------------------------------------
def is_complete(path: str | Path) -> bool:
    """A published checkpoint folder: named step-XXXXXXXX, with its manifest (written last). Not yet verified."""
    path = Path(path)
    return path.is_dir() and _NAME.match(path.name) is not None and (path / MANIFEST_FILE).is_file()


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
    """`resume`: None (start fresh), "auto" (the newest checkpoint under `root` that verifies, None when there is
    none at all) or a checkpoint folder (which must verify).

    With "auto", a checkpoint that fails `verify_checkpoint` is passed over with a warning naming the bad file, and
    the previous one is tried; when checkpoints exist but none verifies, `CheckpointError` lists why each failed.
    """
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            raise CheckpointError(f"resume={resume!r} is not a complete checkpoint folder "
                                  f"(step-XXXXXXXX with {MANIFEST_FILE})")
        verify_checkpoint(path)
        return path
    problems = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            logger.warning("%s; falling back to the previous checkpoint", error)
            problems.append(str(error))
            continue
        if problems:
            logger.warning("resuming from %s, an earlier checkpoint than the newest", path)
        return path
    if problems:
        raise CheckpointError(f"no intact checkpoint under {root} to resume from:\n  " + "\n  ".join(problems)
                              + "\nRemove them (or resume=None) to start afresh.")
    return None


def _remove(path: Path) -> None:
    """Rename out of the `step-*` namespace first, so a crash mid-delete cannot leave a half checkpoint listed."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Random states and the schedule, without pickle
# ---------------------------------------------------------------------------------------------------------------------
def _accelerator_rng():
    from accelerate.utils import get_torch_accelerator_backend

    device_type, _ = get_torch_accelerator_backend()
    if device_type is None:
        return None, None
    return device_type, torch.get_device_module(device_type)


def save_random_states(folder: Path, process_index: int, step: int) -> Path:
    """This process's Python, NumPy, torch and accelerator generators, as safetensors (numbers only)."""
    version, python_state, gauss = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {"python": torch.tensor(python_state, dtype=torch.int64),
               "numpy": torch.from_numpy(keys.astype(np.int64)),
               "torch": torch.get_rng_state()}
    device_type, module = _accelerator_rng()
    if device_type is not None:
        for index in range(module.device_count()):
            tensors[f"{device_type}_{index}"] = module.get_rng_state(index).cpu()
    scalars = {"python_version": version, "python_gauss": gauss, "numpy_position": int(position),
               "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached_gaussian), "step": step}
    path = folder / _RANDOM_STATES.format(process_index)
    save_file(tensors, str(path), metadata={"scalars": json.dumps(scalars)})
    return path


def load_random_states(folder: Path, process_index: int) -> int | None:
    """Restore what `save_random_states` wrote; return the accelerator's step counter saved with it (None when the
    checkpoint has no file for this process: it was saved by fewer processes)."""
    path = folder / _RANDOM_STATES.format(process_index)
    if not path.is_file():  # (a listed file that went missing fails verify_checkpoint before this)
        logger.warning("checkpoint %s has no %s (saved by fewer processes): this process's random generators keep "
                       "their seeded state, so the run will not repeat an uninterrupted one exactly", folder, path.name)
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            scalars = json.loads(handle.metadata()["scalars"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        random.setstate((scalars["python_version"], tuple(tensors["python"].tolist()), scalars["python_gauss"]))
        np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), scalars["numpy_position"],
                             scalars["numpy_has_gauss"], scalars["numpy_cached_gaussian"]))
        torch.set_rng_state(tensors["torch"])
        device_type, module = _accelerator_rng()
        if device_type is not None:
            for index in range(module.device_count()):
                if f"{device_type}_{index}" in tensors:
                    module.set_rng_state(tensors[f"{device_type}_{index}"], index)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {folder}: {path.name} is not a random-state file "
                              f"({type(error).__name__}: {error})") from error
    return int(scalars["step"])


def _load_scheduler(folder: Path, scheduler) -> None:
    path = folder / SCHEDULER_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {folder}: {SCHEDULER_FILE} is not readable JSON ({error})") from error
    expected = scheduler.state_dict()
    if not isinstance(state, dict) or state.keys() != expected.keys():
        raise CheckpointError(f"checkpoint {folder}: {SCHEDULER_FILE} does not hold this run's schedule (keys "
                              f"{sorted(state) if isinstance(state, dict) else type(state).__name__}, expected "
                              f"{sorted(expected)})")
    scheduler.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, root: str | Path, progress: TrainingProgress, keep_last: int,
                    scheduler=None, process_state: dict | None = None) -> Path:
    """Save the accelerator state (model, optimizer, scaler), every process's random states, `scheduler` (JSON),
    each process's `process_state` (JSON, `data_state_<i>.json`: where a stream has got to) and `progress`
    atomically as `root/step-XXXXXXXX` with its checksum manifest; keep the `keep_last` newest. Call on every
    process. Register nothing with `accelerator.register_for_checkpointing`: accelerate pickles it."""
    root = Path(root)
    final = root / checkpoint_name(progress.global_step)
    temporary = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)  # left over by a crash
        temporary.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    # accelerate pickles the random states; each process replaces its own file with a safetensors one
    (temporary / _ACCELERATE_RANDOM_STATES.format(accelerator.process_index)).unlink(missing_ok=True)
    save_random_states(temporary, accelerator.process_index, accelerator.step)
    if process_state is not None:
        (temporary / DATA_STATE_FILE.format(accelerator.process_index)).write_text(json.dumps(process_state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if scheduler is not None:
            (temporary / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict(), indent=2))
        (temporary / STATE_FILE).write_text(progress.to_json())
        _fsync_tree(temporary)
        write_manifest(temporary)  # last: its presence marks the checkpoint complete
        _fsync_dir(temporary)
        if final.exists():  # the same step saved before (a run resumed from an older checkpoint)
            _remove(final)
        os.replace(temporary, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def load_process_state(path: str | Path, process_index: int) -> dict:
    """What `save_checkpoint` saved as `process_state` for this process; `CheckpointError` naming the file when it
    is missing (a checkpoint of a run that did not stream, or of fewer processes) or not a JSON object."""
    file = Path(path) / DATA_STATE_FILE.format(process_index)
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {path} has no {file.name}: it was not saved by a streamed run of this "
                              "many processes") from error
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: {file.name} is not readable JSON ({error})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {file.name} is not a JSON object")
    return state


def load_checkpoint(accelerator, path: str | Path, scheduler=None) -> TrainingProgress:
    """Verify a checkpoint (`verify_checkpoint`), restore the accelerator state, the random states and `scheduler`;
    return its progress. Any failure is a `CheckpointError` naming the checkpoint."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        accelerator.load_state(str(path))
    except Exception as error:  # noqa: BLE001 - whatever the library raises, say which checkpoint it was
        raise CheckpointError(f"checkpoint {path}: accelerate could not load it ({type(error).__name__}: {error})") \
            from error
    step = load_random_states(path, accelerator.process_index)
    if step is not None:
        accelerator.step = step
    if scheduler is not None:
        _load_scheduler(path, scheduler)
    return TrainingProgress.from_file(path / STATE_FILE)


__all__ = [
    "CheckpointError",
    "DATA_STATE_FILE",
    "MANIFEST_FILE",
    "STATE_FILE",
    "TrainingProgress",
    "checkpoint_name",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_process_state",
    "load_random_states",
    "resolve_resume",
    "save_checkpoint",
    "save_random_states",
    "verify_checkpoint",
    "write_manifest",
]
