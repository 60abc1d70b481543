"""Hub-ready export of a pre-trained PlanModel: weights + remote code + processor + a generated model card, and
the upload (or a dry run that lists what would be uploaded)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

from .configuration_plan import PlanConfig
from .presets import objectives_of

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card.md"  # package data
TRAINING_CONFIG_FILE = "plan_training_config.json"
CARD_TAGS = ["medical-imaging", "chest-x-ray", "radiology", "contrastive-learning", "plan"]
# Card rows of the training set-up, in this order, when present (PretrainConfig names).
TRAINING_KEYS = (
    "preset", "dataset", "data_dir", "train_split", "num_train_samples", "image_size", "max_length", "epochs",
    "max_steps", "micro_batch_size", "accumulation_steps", "num_processes", "global_batch_size", "learning_rate", "weight_decay",
    "lr_scheduler", "warmup_steps", "warmup_ratio", "max_grad_norm", "mixed_precision", "seed", "steps_trained",
    "nonfinite_steps",
)


@dataclass
class Objective:
    name: str
    on: bool
    weight: str
    details: str


def objectives_table(config: PlanConfig) -> list[Objective]:
    """Each objective of docs/method.md, on or off, with its weight and settings (from the config's loss weights)."""
    described = {}
    for line in objectives_of(config):
        key, _, text = line.partition(": ")
        described[key] = re.sub(r",? ?weight [0-9.e+-]+$", "", text)
    local_title = {"plan": "PLAN local (word-pixel alignment)", "gloria": "GLoRIA local (reference objective)",
                   "mgca": "MGCA token-level (reference objective)"}[config.local_objective]
    rows = [
        ("global", "global (image-report InfoNCE)", config.global_loss_weight),
        ("plan_local", local_title, config.local_loss_weight),
        ("pcma", "PLACE PCMA (pathology-level alignment)", config.pcma_loss_weight),
        ("correlation", "PLACE correlation exploration", config.correlation_loss_weight),
    ]
    return [Objective(name=title, on=weight > 0, weight=f"{weight:g}",
                      details=described.get(key, "") if weight > 0 else "") for key, title, weight in rows]


# Parts of a metrics JSON (eval.run's metrics.json) that are settings, bookkeeping or breakdowns, not headline numbers:
# the card's table leaves them out (metrics.json has them all).
_NOT_HEADLINE = {"seed", "n_boot", "max_samples", "seconds", "pictures", "ci", "per_category", "per_class", "findings",
                 "class_counts", "prompts_per_class", "num_undefined", "threshold", "count"}


def _flatten(values: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], float]]:
    rows = []
    for key, value in values.items():
        key = str(key)
        if key in _NOT_HEADLINE or key.startswith("num_"):
            continue
        path = prefix + (key,)
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, path))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((path, float(value)))
    return rows


def results_table(results: Mapping[str, Any]) -> list[dict[str, str]]:
    """Headline numbers of a (nested) metrics JSON as rows: task = the top-level key, metric = the rest of the path.
    Confidence intervals, per-class breakdowns, counts and settings are left to the JSON itself."""
    rows = []
    for path, value in _flatten(results):
        task, metric = (path[0], "/".join(path[1:])) if len(path) > 1 else ("-", path[0])
        rows.append({"task": task, "metric": metric, "value": f"{value:.4g}"})
    return rows


def _tower_name(config, base_models: Sequence[str], index: int) -> str:
    summary = config.model_type
    if getattr(config, "num_hidden_layers", None) is not None and hasattr(config, "hidden_size"):
        summary += f", {config.num_hidden_layers} layers, hidden {config.hidden_size}"
    elif getattr(config, "hidden_sizes", None):  # CNN stages (ResNet, ConvNeXt); not every family has depths
        summary += f", stages {list(config.hidden_sizes)}"
        summary += f", depths {list(config.depths)}" if getattr(config, "depths", None) else ""
    elif getattr(config, "depth_multiplier", None) is not None:  # MobileNet: one width multiplier says it all
        summary += f", width x{config.depth_multiplier}"
    return f"{base_models[index]} ({summary})" if index < len(base_models) and base_models[index] else \
        f"{summary}, trained from scratch"


def render_model_card(
    config: PlanConfig,
    training: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
    *,
    repo_id: str = "path/to/this/model",
    model_name: str | None = None,
    base_models: Sequence[str | None] = (),
    datasets: Sequence[str] = (),
    license: str = "apache-2.0",
    num_parameters: int | None = None,
    results_source: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """The model card: YAML metadata, usage, objectives (from the loss weights), towers, training set-up and a
    results table. `base_models`: the (text, vision) towers' Hub names, None for towers trained from scratch."""
    template = Path(template_path) if template_path is not None else TEMPLATE_PATH
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found; pass template_path=")
    objectives = objectives_table(config)
    local_name = {"plan": "PLAN", "gloria": "GLoRIA", "mgca": "MGCA"}[config.local_objective]
    methods = [name for name, on in ((local_name, config.local_loss_weight > 0),
                                     ("PLACE", config.pcma_loss_weight > 0 or config.correlation_loss_weight > 0)) if on]
    method = " + ".join(methods) or "the global contrastive objective only (CLIP-style baseline)"
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=list(CARD_TAGS),
        datasets=list(datasets) or None,
        base_model=[name for name in base_models if name] or None,
    )
    training_rows = [(key, training[key]) for key in TRAINING_KEYS if training and training.get(key) is not None]
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name or f"PLAN chest X-ray dual encoder ({method})",
        method_name=method,
        repo_id=repo_id,
        objectives=objectives,
        plan_config=config,
        text_tower=_tower_name(config.text_config, base_models, 0),
        vision_tower=_tower_name(config.vision_config, base_models, 1),
        num_parameters=f"{num_parameters / 1e6:.1f} M" if num_parameters else "-",
        training=training_rows,
        results=results_table(results) if results else [],
        results_source=results_source,
    )


def write_model_card(folder: str | os.PathLike, results_path: str | os.PathLike | None = None, **kwargs) -> Path:
    """(Re)write `folder/README.md` from the exported config and training settings, with a metrics JSON's table."""
    folder = Path(folder)
    config = PlanConfig.from_pretrained(folder)
    training_file = folder / TRAINING_CONFIG_FILE
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    results = json.loads(Path(results_path).read_text()) if results_path is not None else None
    defaults = dict(repo_id=training.get("push_to_hub") or "path/to/this/model",
                    base_models=training.get("base_models", ()), datasets=training.get("card_datasets", ()),
                    license=training.get("license", "apache-2.0"), num_parameters=training.get("num_parameters"),
                    results_source=Path(results_path).name if results_path is not None else None)
    card = render_model_card(config, training, results, **{**defaults, **kwargs})
    card.save(folder / "README.md")
    return folder / "README.md"


def _portable(value: Any, base: Path) -> Any:
    """A trainer's local path as an exported folder may carry it: relative to `base` (the run's output folder) when
    it lies inside, else only its name (a user's home, a cluster's mounts stay private). Hub ids, other strings,
    numbers pass unchanged; lists and dicts are walked."""
    if isinstance(value, Mapping):
        return {key: _portable(item, base) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(item, base) for item in value]
    if not isinstance(value, str) or not value:
        return value
    local = os.path.isabs(value) or ((os.sep in value or value.startswith(".")) and os.path.exists(value))
    if not local:
        return value
    path = Path(os.path.abspath(value))
    try:
        return path.relative_to(Path(os.path.abspath(base))).as_posix()
    except ValueError:
        return path.name


def export_pretrained(
    model,
    processor,
    folder: str | os.PathLike,
    training: Mapping[str, Any] | None = None,
    results_path: str | os.PathLike | None = None,
    state_dict: Mapping[str, Any] | None = None,
    **card_kwargs,
) -> Path:
    """Write a Hub-ready folder: safetensors weights and config (with the code files for `trust_remote_code`,
    `save_pretrained` copies them), the processor, the training settings and README.md (local paths in the settings
    written relative to the folder's parent, the run's output folder, or as their name only). Written into a temporary
    sibling folder and renamed into place, so an interrupted export never looks complete."""
    folder = Path(folder)
    temporary = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, state_dict=state_dict)  # safetensors
    processor.save_pretrained(temporary)
    settings = _portable(dict(training or {}), folder.parent)
    settings.setdefault("num_parameters", sum(p.numel() for p in model.parameters()))
    (temporary / TRAINING_CONFIG_FILE).write_text(json.dumps(settings, indent=2, default=str))
    write_model_card(temporary, results_path, **card_kwargs)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    return folder


def upload_plan(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file `push_to_hub` would upload, sorted."""
    folder = Path(folder)
    return sorted((str(path.relative_to(folder)), path.stat().st_size) for path in folder.rglob("*") if path.is_file())


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, dry_run: bool = False,
                commit_message: str = "Upload PLAN model", token: str | None = None) -> list[tuple[str, int]]:
    """Upload `folder` to the Hub model repo `repo_id` (created if missing); with `dry_run`, only list the files
    and touch no network. Returns the files as `upload_plan` lists them."""
    files = upload_plan(folder)
    if not files:
        raise FileNotFoundError(f"{folder} holds no files to upload")
    if dry_run:
        return files
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return files


def format_upload_plan(files: Sequence[tuple[str, int]], repo_id: str) -> str:
    total = sum(size for _, size in files)
    lines = [f"would upload {len(files)} files ({total / 1e6:.2f} MB) to https://huggingface.co/{repo_id}:"]
    lines += [f"  {size:>12,d}  {name}" for name, size in files]
    return "\n".join(lines)


__all__ = [
    "CARD_TAGS",
    "TEMPLATE_PATH",
    "TRAINING_CONFIG_FILE",
    "export_pretrained",
    "format_upload_plan",
    "objectives_table",
    "push_to_hub",
    "render_model_card",
    "results_table",
    "upload_plan",
    "write_model_card",
]
