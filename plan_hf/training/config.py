"""PretrainConfig: every setting of a pre-training run, read from YAML and `--key value` overrides, type-checked.

One flat namespace (the same names in the YAML file, on the command line and in the model card), plus `model:`, a
dict of `PlanConfig` keyword arguments (`--model.local_loss_weight 0.5` overrides one of them), and `preset:`, a
named set of `PlanConfig` arguments from `plan_hf.presets` that `model:` overrides.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config file or command-line override; the message names the key."""


@dataclass
class PretrainConfig:
    """Settings of `python -m training.pretrain` (see training/README.md for each group)."""

    # --- data -------------------------------------------------------------------------------------------------------
    data_dir: str | None = None  # a MIMIC-CXR-JPG-style tree (files/ + mimic-cxr-2.0.0-*.csv)
    dataset: Literal["mimic_cxr"] = "mimic_cxr"
    train_split: str = "train"
    max_train_samples: int | None = None  # keep the first N rows (quick runs)
    verify_images: bool = False  # decode every training image before training (progress bar); drop and report bad ones
    max_bad_sample_fraction: float = 0.01  # unreadable images met in one epoch, as a share of it, that stop the run
    synthetic_num_images: int = 0  # > 0: write the synthetic CXR set into data_dir first when it holds no split CSV
    synthetic_image_size: int = 224
    synthetic_seed: int = 0
    # --- model ------------------------------------------------------------------------------------------------------
    preset: str | None = None  # a name in plan_hf.presets.PRESETS
    model: dict[str, Any] = field(default_factory=dict)  # PlanConfig keyword arguments (loss switches, dims)
    text_model: str | None = None  # Hub name or folder of a pretrained text tower; None: built from text_config
    text_num_layers: int | None = None  # keep only the first N layers of the pretrained text tower
    text_config: dict[str, Any] | None = None  # tower config when text_model is None (default: plan_hf.tiny)
    vision_model: str | None = None  # Hub name or folder of a pretrained vision tower; None: from vision_config
    vision_config: dict[str, Any] | None = None  # tower config when vision_model is None (default: plan_hf.tiny)
    tokenizer: str | None = None  # default: text_model's; neither: a WordPiece vocabulary of the training reports
    tokenizer_max_words: int = 4000
    image_size: int = 224
    image_mean: float | list[float] = 0.5
    image_std: float | list[float] = 0.5
    max_length: int = 128
    # --- optimisation -----------------------------------------------------------------------------------------------
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    micro_batch_size: int = 32  # samples per forward pass per process
    accumulation_steps: int = 1  # micro-batches per optimizer step (their features are cached: all negatives kept)
    learning_rate: float = 1e-4  # peak learning rate of everything a tower-specific one below does not cover
    text_tower_learning_rate: float | None = None  # the text tower's (pretrained towers want less); None: learning_rate
    vision_tower_learning_rate: float | None = None  # the vision tower's; None: learning_rate
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"  # a transformers.get_scheduler name
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    max_grad_norm: float = 1.0  # <= 0: no clipping (the norm is still logged)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 42
    num_workers: int = 0
    local_warmup_steps: int = 0  # the local loss weight ramps from 0 over this many steps (curriculum)
    cross_sample_chunk_size: int = 16  # images per chunk of PLAN's cross-sample term (memory vs speed)
    pcma_chunk_size: int = 64  # images per chunk of PCMA's report x image scores
    augment: bool = False  # light random affine + brightness/contrast in the collator
    cpu: bool = False  # force the CPU even when an accelerator is present
    find_unused_parameters: bool | None = None  # DDP; None: detected with one probe step before training
    # --- checkpoints ------------------------------------------------------------------------------------------------
    output_dir: str = "runs/pretrain"
    save_every_steps: int = 500
    keep_checkpoints: int = 3
    resume: str | None = None  # "auto" (latest complete checkpoint in output_dir, if any) or a checkpoint folder
    # --- logging ----------------------------------------------------------------------------------------------------
    log_every_steps: int = 10
    log_with: Literal["auto", "tensorboard", "none"] = "auto"  # auto: tensorboard when installed
    progress_bar: bool = True
    max_consecutive_nonfinite: int = 5  # that many non-finite losses in a row stop the run
    # --- export -----------------------------------------------------------------------------------------------------
    export: bool = True  # write <output_dir>/model (weights, code, processor, model card)
    license: str = "apache-2.0"
    card_datasets: list[str] = field(default_factory=list)  # Hub dataset ids for the model card metadata
    card_base_models: list[str | None] | None = None  # Hub ids of (text, vision) towers; default: their names here
    eval_json: str | None = None  # metrics JSON for the model card's results table
    push_to_hub: str | None = None  # a Hub repo id
    hub_private: bool = False
    dry_run: bool = False  # with push_to_hub: list what would be uploaded, touch no network
    # --- debugging --------------------------------------------------------------------------------------------------
    debug_nonfinite_steps: list[int] = field(default_factory=list)  # NaN pixels at these steps (from 1; tests the guard)

    def __post_init__(self) -> None:
        positive = ("micro_batch_size", "accumulation_steps", "epochs", "image_size", "max_length",
                    "save_every_steps", "keep_checkpoints", "log_every_steps", "max_consecutive_nonfinite",
                    "tokenizer_max_words")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("learning_rate", "text_tower_learning_rate", "vision_tower_learning_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")
        for name in ("max_steps", "max_train_samples", "text_num_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.text_model is None and self.text_num_layers is not None:
            raise ConfigError("text_num_layers needs text_model (it truncates a pretrained text tower)")

    @property
    def per_process_batch_size(self) -> int:
        """Samples per optimizer step on one process: all of them are contrasted with each other (and with the
        other processes' samples)."""
        return self.micro_batch_size * self.accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def plan_config_kwargs(self) -> dict[str, Any]:
        """PlanConfig keyword arguments: the preset's, then `model:` on top."""
        kwargs: dict[str, Any] = {}
        if self.preset is not None:
            try:
                from plan_hf.presets import PRESETS
            except ImportError as error:
                raise ConfigError(f"preset={self.preset!r} needs plan_hf.presets, which is not importable") from error
            if self.preset not in PRESETS:
                raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
            kwargs.update(PRESETS[self.preset])
        kwargs.update(self.model)
        return kwargs


# --------------------------------------------------------------------------------------------------------------------
# Type checking
# --------------------------------------------------------------------------------------------------------------------
def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def coerce(key: str, value: Any, kind: Any) -> Any:
    """`value` checked against the annotation `kind` (ints are accepted as floats); ConfigError naming `key`."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(kind):
            try:
                return coerce(key, value, option)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(f"{key}: expected {_type_name(kind)}, got {value!r}")
    if kind is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in typing.get_args(kind):
            return value
        raise ConfigError(f"{key}: expected one of {list(typing.get_args(kind))}, got {value!r}")
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(kind) or (Any,)
            return [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif origin is dict or kind is dict:
        if isinstance(value, dict):
            return dict(value)
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(kind)}, got {value!r} ({type(value).__name__})")


def _plan_config_fields() -> set[str]:
    from plan_hf.configuration_plan import PlanConfig

    names = set(inspect.signature(PlanConfig.__init__).parameters) - {"self", "kwargs", "text_config", "vision_config"}
    return names


def check_model_kwargs(model: dict[str, Any]) -> dict[str, Any]:
    """`model:` keys must be PlanConfig arguments (towers are configured by the top-level keys)."""
    allowed = _plan_config_fields()
    for key in model:
        if key not in allowed:
            raise ConfigError(f"unknown key model.{key}: not a PlanConfig argument (known: {', '.join(sorted(allowed))})")
    return model


def config_from_dict(values: dict[str, Any]) -> PretrainConfig:
    hints = typing.get_type_hints(PretrainConfig)
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(hints))})")
        checked[key] = coerce(key, value, hints[key])
    check_model_kwargs(checked.get("model", {}))
    return PretrainConfig(**checked)


# --------------------------------------------------------------------------------------------------------------------
# YAML + command line
# --------------------------------------------------------------------------------------------------------------------
def _parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`--key value` pairs (values parsed as YAML: 3, 0.5, true, null, [1, 2]); a bare `--flag` means true."""
    args = [str(arg) for arg in args]
    pairs: list[tuple[str, Any]] = []
    index = 0
    while index < len(args):
        token = args[index]
        if not token.startswith("--"):
            raise ConfigError(f"expected --key value, got {token!r}")
        key, has_inline, inline = token[2:].partition("=")
        key = key.replace("-", "_")
        if has_inline:
            raw, index = inline, index + 1
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            raw, index = args[index + 1], index + 2
        else:
            raw, index = "true", index + 1
        pairs.append((key, yaml.safe_load(raw) if raw != "" else None))
    return pairs


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """The config of `path` (YAML; None: the defaults) with `--key value` overrides applied, type-checked."""
    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        values.update(loaded)
    for key, value in _parse_overrides(list(overrides or [])):
        section, dot, name = key.partition(".")
        if dot:
            if section not in ("model", "text_config", "vision_config"):
                raise ConfigError(f"unknown config key {key!r}: only model.*, text_config.* and vision_config.* nest")
            values[section] = {**(values.get(section) or {}), name: value}
        else:
            values[key] = value
    return config_from_dict(values)


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    """`--config FILE` (optional) followed by any `--key value` overrides."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        hints = typing.get_type_hints(PretrainConfig)
        print("usage: python -m training.pretrain [--config FILE.yaml] [--key value ...]\n\nkeys:")
        for item in dataclasses.fields(PretrainConfig):
            print(f"  --{item.name} ({_type_name(hints[item.name])})")
        raise SystemExit(0)
    path = None
    if "--config" in args:
        position = args.index("--config")
        if position + 1 >= len(args):
            raise ConfigError("--config needs a file")
        path = args[position + 1]
        del args[position:position + 2]
    return load_config(path, args)


def save_config(config: PretrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


__all__ = ["ConfigError", "PretrainConfig", "coerce", "config_from_dict", "load_config", "parse_args", "save_config"]
