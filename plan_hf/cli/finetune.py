"""The fine-tuning command lines: classification, detection and segmentation on 1% / 10% / 100% of a training split
(`plan_hf.downstream.finetune`), and report generation (`plan_hf.generation.finetune`).

    plan-finetune-classification --model_name_or_path PATH_OR_HUB_ID --dataset chexpert|rsna|csv|synthetic \
        --data_dir DIR --fraction 0.01|0.1|1.0 [--linear_probe] --output_dir DIR
    plan-finetune-classification ... --dataset imagefolder|disk|parquet|arrow|HUB_NAME [--label_columns A B]
        (any datasets source: class sub-folders, or label columns; its train/test splits or a seeded split)
    plan-finetune-detection / plan-finetune-segmentation   (the same, their data sets and heads)
    plan-finetune-report-generation --model_name_or_path PATH_OR_HUB_ID --dataset synthetic|mimic --data_dir DIR \
        --output_dir DIR [--epochs E --max_steps N --micro_batch_size B --decoder_layers K]

`--model_name_or_path random --config_name tiny-resnet|tiny-vit|FOLDER` trains the same architecture from random
weights (the baseline arm). Each writes OUTPUT_DIR/metrics.json, a report, pictures and OUTPUT_DIR/model.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data.sources import SourceKind, source_kind
from ..downstream.data import SYNTHETIC_LESION_TYPES, DatasetName, ProblemType
from ..downstream.finetune import RANDOM_MODEL, FinetuneConfig, Task, run_finetune
from .arguments import (
    ConfigError,
    DataArguments,
    ModelArguments,
    OptimisationArguments,
    RunArguments,
    SourceArguments,
    console_script,
    parse,
)

# Flags of the argparse command lines these replaced, and their names now.
RENAMED = {"model": "model_name_or_path", "data": "data_dir", "out": "output_dir", "batch_size": "micro_batch_size",
           "use_cpu": "cpu"}
# Argument names -> the protocols' settings (FinetuneConfig, GenerationFinetuneConfig) where they differ.
SETTING_NAMES = {"model_name_or_path": "model", "config_name": "config", "data_dir": "data", "output_dir": "out",
                 "micro_batch_size": "batch_size", "cpu": "use_cpu", "label_columns": "class_names"}


def check_data_dir(dataset: str, data_dir: str | None, own: set[str]) -> None:
    """Only a `datasets.load_dataset` name goes without --data_dir (an entry point's `own` data set names and the
    source kinds are read from a folder or file)."""
    if data_dir is None and (dataset in own or source_kind(dataset) is not SourceKind.LOAD_DATASET):
        raise ConfigError(f"--dataset {dataset} needs --data_dir: its folder or file (only a datasets.load_dataset "
                          "name goes without)")


@dataclass(kw_only=True)
class FinetuneArguments(ModelArguments, DataArguments, OptimisationArguments, RunArguments):
    config_name: str | None = None  # model_name_or_path random: its architecture (folder, Hub id, tiny-vit...)
    image_size: int = 224  # input side when the model folder has no image processor
    save_model: bool = True  # save the fine-tuned model under OUTPUT_DIR/model

    def __post_init__(self) -> None:
        if self.model_name_or_path == RANDOM_MODEL and not self.config_name:
            raise ConfigError("--model_name_or_path random needs --config_name: the architecture to initialise (an "
                              "export folder / Hub id, or tiny-resnet / tiny-vit)")


@dataclass(kw_only=True)
class FractionArguments(FinetuneArguments):
    fraction: float = 1.0  # training fraction, e.g. 0.01, 0.1, 1.0
    split_seed: int = 0  # train/test split of sets published without one
    linear_probe: bool = False  # freeze the vision tower (kept in eval mode); train the head only


@dataclass(kw_only=True)
class ClassificationArguments(FractionArguments):
    # chexpert, rsna, csv, synthetic, or a datasets source: imagefolder, disk, parquet, arrow, a load_dataset name
    dataset: str
    data_dir: str | None = None  # the data set's folder or file (none for a load_dataset name)
    label_columns: list[str] | None = None  # class names: label columns, or a subset of the CheXpert labels
    problem_type: ProblemType | None = None  # csv and sources; default multi-label (one ClassLabel: single-label)
    image_column: str = "image"  # a datasets source's image column (an Image() feature, a path or bytes)
    allow_outside_root: bool = False  # a datasets source: read image paths that lead outside its folder
    strict: bool = False  # a datasets source: a row without a usable image is an error, not skipped and counted

    def __post_init__(self) -> None:
        super().__post_init__()
        check_data_dir(self.dataset, self.data_dir, {name.value for name in DatasetName})


@dataclass(kw_only=True)
class DenseArguments(FractionArguments):
    finding_types: list[str] = field(default_factory=lambda: list(SYNTHETIC_LESION_TYPES))  # synthetic: types kept
    head_dim: int = 64  # width of the feature pyramid and head


@dataclass(kw_only=True)
class DetectionArguments(DenseArguments):
    dataset: Literal["rsna", "synthetic"]
    box_classes: Literal["agnostic", "type"] = "agnostic"  # synthetic: one class or one per type
    score_threshold: float = 0.01
    nms_iou: float = 0.5


@dataclass(kw_only=True)
class SegmentationArguments(DenseArguments):
    dataset: Literal["siim", "synthetic"]
    mask_threshold: float = 0.5


@dataclass(kw_only=True)
class ReportGenerationArguments(SourceArguments, FinetuneArguments):
    dataset: str  # synthetic | mimic (the MIMIC-CXR-JPG layout), or a pre-training source (csv, parquet, ...) with train and test splits
    data_dir: str | None = None  # the data set's folder or file (none for a load_dataset name)
    synthetic_num_images: int = 0  # synthetic: write this many images into an empty data_dir
    sections: list[str] = field(default_factory=lambda: ["findings", "impression"])  # the report sections to write
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    decoder_layers: int = 3
    decoder_hidden_size: int = 256
    decoder_heads: int = 4
    max_length: int = 128  # longest report in tokens (training targets and generation)
    num_beams: int = 3  # beam width at test time (1: greedy)
    eval_batch_size: int = 32  # samples per forward pass at inference
    max_train_samples: int | None = None  # keep the first N training pairs
    max_test_samples: int | None = None  # score the first N test pairs
    num_examples: int = 5  # examples shown in report.md
    meteor: bool = True  # score METEOR (it starts a Java process)

    def __post_init__(self) -> None:
        from ..generation.data import ReportDataset

        super().__post_init__()
        check_data_dir(self.dataset, self.data_dir, {name.value for name in ReportDataset})


TASK_ARGUMENTS: dict[Task, type[FractionArguments]] = {
    Task.CLASSIFICATION: ClassificationArguments,
    Task.DETECTION: DetectionArguments,
    Task.SEGMENTATION: SegmentationArguments,
}


def settings(args: FinetuneArguments) -> dict[str, Any]:
    """The arguments under the protocols' setting names (`--max_steps` unset is the Trainer's -1)."""
    values = {SETTING_NAMES.get(k, k): v for k, v in dataclasses.asdict(args).items() if k != "threads"}
    values["max_steps"] = -1 if values["max_steps"] is None else values["max_steps"]
    return values


def _report(title: str, payload: dict[str, Any], out: str) -> None:
    print(f"{title}: " + ", ".join(f"{k}={v:.4f}" for k, v in payload["metrics"].items() if isinstance(v, float))
          + f"  -> {out}")


def finetune(task: Task | str, argv: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune for `task` with the arguments `argv` (None: the command line); returns the metrics payload."""
    task = Task(task)
    args = parse(TASK_ARGUMENTS[task], argv, prog=f"plan-finetune-{task.value}",
                 description=f"Fine-tune a PLAN vision tower for {task.value} on 1%/10%/100% of a training split.",
                 renamed=RENAMED)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = FinetuneConfig(task=task, **settings(args))
    payload = run_finetune(cfg)
    _report(f"{task.value} on {cfg.dataset} ({cfg.fraction:.0%})", payload, cfg.out)
    return payload


def classification(argv: list[str] | None = None) -> dict[str, Any]:
    return finetune(Task.CLASSIFICATION, argv)


def detection(argv: list[str] | None = None) -> dict[str, Any]:
    return finetune(Task.DETECTION, argv)


def segmentation(argv: list[str] | None = None) -> dict[str, Any]:
    return finetune(Task.SEGMENTATION, argv)


def report_generation(argv: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune a vision tower + a new text decoder to write reports; BLEU-1..4, METEOR and ROUGE-L on the test
    split (needs the `generation` extra)."""
    from ..generation.finetune import GenerationFinetuneConfig, run_report_generation

    args = parse(ReportGenerationArguments, argv, prog="plan-finetune-report-generation",
                 description="Fine-tune a PLAN vision tower + a new text decoder (VisionEncoderDecoderModel) to write "
                             "reports; score BLEU-1..4, METEOR and ROUGE-L on the test split.",
                 renamed=RENAMED)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    values = settings(args)
    values["sections"] = tuple(values["sections"])
    cfg = GenerationFinetuneConfig(**values)
    payload = run_report_generation(cfg)
    _report(f"report generation on {cfg.dataset} ({cfg.model})", payload, cfg.out)
    return payload


classification_cli = console_script(classification)
detection_cli = console_script(detection)
segmentation_cli = console_script(segmentation)
report_generation_cli = console_script(report_generation)
