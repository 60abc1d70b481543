"""PretrainConfig: every setting of a pre-training run, read from a YAML/JSON file and flags (`plan_hf.cli.arguments`).

One flat namespace (the same names in the YAML file, on the command line and in the model card), plus `model:`, a
dict of `PlanConfig` keyword arguments (`--model.local_loss_weight 0.5` overrides one of them), and `preset:`, a
named set of `PlanConfig` arguments from `plan_hf.presets` that `model:` overrides.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..configuration_plan import REMOVED_FIELDS, RENAMED_FIELDS

from ..cli.arguments import (
    ConfigError,
    DataArguments,
    HubArguments,
    OptimisationArguments,
    RunArguments,
    SourceArguments,
    coerce,
    parse,
)

# Keys that left `model:` (PlanConfig) for the pre-training arguments: run-time and training-schedule knobs.
MOVED_FROM_MODEL = ("local_warmup_steps", "cross_sample_chunk_size", "pcma_chunk_size")
RENAMED = {f"model.{key}": key for key in MOVED_FROM_MODEL}


@dataclass(kw_only=True)
class PretrainConfig(HubArguments, OptimisationArguments, SourceArguments, DataArguments, RunArguments):
    """Settings of `plan-pretrain` / `python -m training.pretrain` (see training/README.md for each group); the
    shared groups give the names every entry point uses."""

    # --- data -------------------------------------------------------------------------------------------------------
    data_dir: str | None = None  # the dataset's folder or file (mimic-cxr: files/ + mimic-cxr-2.0.0-*.csv)
    train_split: str = "train"
    max_train_samples: int | None = None  # keep the first N rows (quick runs)
    streaming: bool = False  # read the data as a stream (datasets.IterableDataset): needs max_steps
    shuffle_buffer_size: int = 1000  # streaming: rows drawn from at random (a seeded buffer, reseeded each epoch)
    verify_images: bool = False  # decode every training image before training (progress bar); drop and report bad ones
    max_bad_sample_fraction: float = 0.01  # unreadable images met in one epoch, as a share of it, that stop the run
    synthetic_num_images: int = 0  # > 0: write the synthetic CXR set into data_dir first when it holds no split CSV
    synthetic_image_size: int = 224
    synthetic_seed: int = 0
    # --- model ------------------------------------------------------------------------------------------------------
    preset: str | None = None  # a name in plan_hf.presets.PRESETS
    model: dict[str, Any] = field(default_factory=dict)  # PlanConfig keyword arguments (loss switches, dims)
    local_warmup_steps: int = 0  # lambda_l ramps linearly from 0 over this many optimizer steps (curriculum)
    cross_sample_chunk_size: int = 16  # images per chunk of the cross-sample local term (memory, not results)
    pcma_chunk_size: int = 64  # images per chunk when PCMA scores every report against every image
    text_model: str | None = None  # Hub name or folder of a pretrained text tower; None: built from text_config
    text_num_layers: int | None = None  # keep only the first N layers of the pretrained text tower
    text_config: dict[str, Any] | None = None  # tower config when text_model is None (default: plan_hf.tiny)
    vision_model: str | None = None  # Hub name or folder of a pretrained vision tower; None: from vision_config
    vision_config: dict[str, Any] | None = None  # tower config when vision_model is None (default: plan_hf.tiny)
    # (text_model `offline:minilm` and vision_model `offline:mobilenet_v2` name the towers of plan_hf.towers)
    vision_feature_stride: int | None = None  # the local grid: the tower's deepest map at this stride (16: 14x14)
    tokenizer: str | None = None  # default: text_model's; neither: a WordPiece vocabulary of the training reports
    tokenizer_max_words: int = 4000
    image_size: int = 224
    image_mean: float | list[float] = 0.5
    image_std: float | list[float] = 0.5
    max_length: int = 128
    # --- optimisation -----------------------------------------------------------------------------------------------
    epochs: int = 1
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
    augment: bool = False  # light random affine + brightness/contrast in the collator
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

    def __post_init__(self) -> None:
        positive = ("micro_batch_size", "accumulation_steps", "epochs", "image_size", "max_length",
                    "save_every_steps", "keep_checkpoints", "log_every_steps", "max_consecutive_nonfinite",
                    "tokenizer_max_words", "cross_sample_chunk_size", "pcma_chunk_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("learning_rate", "text_tower_learning_rate", "vision_tower_learning_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")
        for name in ("max_steps", "max_train_samples", "text_num_layers", "vision_feature_stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {value!r}")
        if self.local_warmup_steps < 0:
            raise ConfigError(f"local_warmup_steps must be >= 0, got {self.local_warmup_steps!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.streaming and self.max_steps is None:
            raise ConfigError("streaming: true needs max_steps (a stream's length is not known before it is read)")
        if self.streaming and self.verify_images:
            raise ConfigError("verify_images decodes every image before training, which a stream does not allow: "
                              "a streamed run names and counts its unreadable images as it meets them")
        if self.shuffle_buffer_size < 1:
            raise ConfigError(f"shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size!r}")
        if self.text_model is None and self.text_num_layers is not None:
            raise ConfigError("text_num_layers needs text_model (it truncates a pretrained text tower)")
        check_model_kwargs(self.model)

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
            from ..presets import PRESETS

            if self.preset not in PRESETS:
                raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
            kwargs.update(PRESETS[self.preset])
        kwargs.update(self.model)
        return kwargs


def plan_config_fields() -> set[str]:
    """The PlanConfig arguments a `model:` block may set (the towers' configs come from the top-level keys)."""
    from plan_hf.configuration_plan import PlanConfig

    names = set(inspect.signature(PlanConfig.__init__).parameters) - {"self", "kwargs", "text_config", "vision_config"}
    return names


def check_model_kwargs(model: dict[str, Any]) -> dict[str, Any]:
    """`model:` keys must be PlanConfig arguments (towers are configured by the top-level keys)."""
    allowed = plan_config_fields()
    for key in model:
        if key in MOVED_FROM_MODEL:
            raise ConfigError(f"model.{key} is now a top-level pre-training argument ({key}, --{key}): move it")
        if key in RENAMED_FIELDS:
            raise ConfigError(f"model.{key} was renamed: use model.{RENAMED_FIELDS[key]}")
        if key in REMOVED_FIELDS:
            raise ConfigError(f"model.{key} was removed (its experimental loss term no longer exists): delete it")
        if key not in allowed:
            raise ConfigError(f"unknown key model.{key}: not a PlanConfig argument (known: {', '.join(sorted(allowed))})")
    return model


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """The config of `path` (a YAML/JSON file or a shipped config's name; None: the defaults) with flags on top."""
    return parse_args(([] if path is None else ["--config", str(path)]) + list(overrides or []))


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    """`[--config FILE_OR_NAME] [--key value ...]` (None: sys.argv)."""
    return parse(PretrainConfig, argv, prog="plan-pretrain", description="Contrastive pre-training of a PlanModel.",
                 renamed=RENAMED)


def save_config(config: PretrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


__all__ = ["ConfigError", "MOVED_FROM_MODEL", "PretrainConfig", "coerce", "load_config", "parse_args", "save_config"]
