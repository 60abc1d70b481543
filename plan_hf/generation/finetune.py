"""The report-generation protocol behind `plan-finetune-report-generation` (`plan_hf.cli.finetune`): build the
generator from a pre-trained export (or a random tower of the same architecture), train it with
`transformers.Seq2SeqTrainer` on the train split, generate a report for every test image, score them (BLEU-1..4,
METEOR, ROUGE-L), write the report.

Both arms of a comparison get the same decoder initialisation, data order and budget (epochs or steps): the seed is
set after the checkpoint is read and before anything random is built. Nothing is selected on the test split.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import (
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    VisionEncoderDecoderModel,
    set_seed,
)

from ..configuration_plan import PlanConfig
from ..downstream.report import write_json
from ..image_processing_plan import PlanImageProcessor
from ..modeling_plan import PlanModel
from ..processing_plan import PlanProcessor
from .data import ReportData, ReportDataset, ReportGenerationCollator, generate_reports, load_report_data
from .metrics import METRIC_KEYS, meteor_unavailable_reason, report_generation_metrics, warm_up_meteor
from .modeling import RANDOM_TOWER, build_report_generator, configure_tokenizer

logger = logging.getLogger(__name__)

TINY_CONFIGS = ("tiny-resnet", "tiny-vit")


@dataclass
class GenerationFinetuneConfig:
    """One run. `model` is a pre-trained export folder / Hub id, or "random" (then `config` names the architecture:
    an export folder / Hub id -- its processor and tokenizer are used too -- or "tiny-resnet" / "tiny-vit", which
    build a tokenizer from the training reports)."""

    model: str
    dataset: str
    data: str | None
    out: str
    config: str | None = None
    image_size: int = 224
    epochs: float = 10.0
    max_steps: int = -1
    batch_size: int = 16
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    decoder_layers: int = 3
    decoder_hidden_size: int = 256
    decoder_heads: int = 4
    max_length: int = 128
    num_beams: int = 3
    eval_batch_size: int = 32
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    synthetic_num_images: int = 0
    sections: tuple[str, ...] = ("findings", "impression")
    num_examples: int = 5
    meteor: bool = True
    seed: int = 0
    num_workers: int = 0
    save_model: bool = True
    use_cpu: bool = False
    image_column: str = "image"  # a `plan_hf.data.sources` dataset (not synthetic / mimic): its columns
    text_column: str | list[str] = "text"
    allow_outside_root: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        self.source  # noqa: B018 - a bad source is an error now, not after the model is built
        if self.model == RANDOM_TOWER and not self.config:
            raise ValueError("model='random' needs config: an export folder / Hub id, or tiny-resnet / tiny-vit")

    @property
    def source(self):
        """The `plan_hf.data.sources.PairSource` of a dataset other than synthetic / mimic (else None)."""
        if self.dataset in {name.value for name in ReportDataset}:
            return None
        from ..data.sources import SourceKind, source_from, source_kind

        # (a datasets.load_dataset name has no folder: a --data_dir given with one is not passed on)
        return source_from(self, None if source_kind(self.dataset) is SourceKind.LOAD_DATASET else self.data)

    @property
    def architecture_source(self) -> str:
        return self.config if self.model == RANDOM_TOWER else self.model


# --------------------------------------------------------------------------------------------------------------------
# Model and processor
# --------------------------------------------------------------------------------------------------------------------
def build_processor(cfg: GenerationFinetuneConfig, data: ReportData) -> PlanProcessor:
    """The checkpoint's processor (its tokenizer and image size), so both arms see the same inputs and vocabulary; for
    a tiny config, a WordPiece vocabulary of the training reports and `PlanImageProcessor(size=image_size)`."""
    source = cfg.architecture_source
    if source in TINY_CONFIGS:
        from ..tiny import build_tokenizer

        tokenizer = build_tokenizer(data.train["text"])
        processor = PlanProcessor(PlanImageProcessor(size=cfg.image_size), tokenizer, max_length=cfg.max_length)
    else:
        processor = PlanProcessor.from_pretrained(source)
    configure_tokenizer(processor.tokenizer)
    return processor


def _tower_source(cfg: GenerationFinetuneConfig, vocab_size: int) -> PlanModel | PlanConfig:
    source = cfg.architecture_source
    if source in TINY_CONFIGS:
        from ..tiny import tiny_plan_config

        return tiny_plan_config(vocab_size=vocab_size, vision=source.split("-")[1], image_size=cfg.image_size)
    if cfg.model == RANDOM_TOWER:
        return PlanConfig.from_pretrained(source)
    return PlanModel.from_pretrained(source)


def build_generator(cfg: GenerationFinetuneConfig, tokenizer: PreTrainedTokenizerBase) -> VisionEncoderDecoderModel:
    source = _tower_source(cfg, len(tokenizer))
    set_seed(cfg.seed)  # after reading the checkpoint: both arms' decoders start from the same weights
    return build_report_generator(
        source, tokenizer, decoder_layers=cfg.decoder_layers, decoder_hidden_size=cfg.decoder_hidden_size,
        decoder_heads=cfg.decoder_heads, max_length=cfg.max_length, num_beams=cfg.num_beams,
    )


def _check_input_size(model: VisionEncoderDecoderModel, processor: PlanImageProcessor) -> None:
    vision_config = model.config.encoder.vision_config
    expected, side = getattr(vision_config, "image_size", None), processor.size["height"]
    if expected is not None and hasattr(vision_config, "patch_size") and expected != side:
        raise ValueError(f"the ViT tower takes {expected}px inputs but the image processor makes {side}px; "
                         f"pass --image-size {expected} or a processor of that size")


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------
def training_arguments(cfg: GenerationFinetuneConfig, num_train: int) -> Seq2SeqTrainingArguments:
    return Seq2SeqTrainingArguments(
        output_dir=str(Path(cfg.out) / "trainer"),
        per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of the total steps
        lr_scheduler_type="cosine",
        logging_steps=max(1, math.ceil(num_train / cfg.batch_size) // 2),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # keep `image` and `text`: the collator, not the model, consumes them
        dataloader_num_workers=cfg.num_workers,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=cfg.use_cpu,
    )


def train_generator(model: VisionEncoderDecoderModel, train_dataset, collator: ReportGenerationCollator,
                    cfg: GenerationFinetuneConfig) -> dict[str, Any]:
    """Train in place; returns steps, mean loss, the first and last logged losses and seconds."""
    # VisionEncoderDecoderModel's forward takes **kwargs but its loss is a per-token mean that ignores
    # `num_items_in_batch`: telling the Trainer so makes it average the loss over gradient-accumulation steps itself.
    model.accepts_loss_kwargs = False
    trainer = Seq2SeqTrainer(model=model, args=training_arguments(cfg, len(train_dataset)),
                             train_dataset=train_dataset, data_collator=collator)
    start = time.perf_counter()
    result = trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"steps": result.global_step, "loss": float(result.training_loss),
            "first_logged_loss": losses[0] if losses else None, "last_logged_loss": losses[-1] if losses else None,
            "seconds": round(time.perf_counter() - start, 2)}


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_markdown(path: Path, payload: dict[str, Any], examples: list[dict[str, str]]) -> Path:
    """The run's settings, the metrics and a few (image, reference, generated) examples."""
    run = {key: payload[key] for key in ("model", "config", "dataset", "num_train", "num_test")}
    lines = [f"# Report generation on {payload['dataset']}", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in run.items()]
    lines += [f"| decoding | {payload['generation']['decoding']} |"]
    lines += ["", "| metric | value |", "|---|---|"]
    for key, value in {**payload["metrics"], **{f"train_{k}": v for k, v in payload["training"].items()}}.items():
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if payload.get("notes"):
        lines += [""] + [f"- {note}" for note in payload["notes"]]
    lines += ["", "## Examples (first test images)", "", "| image | reference | generated |", "|---|---|---|"]
    lines += [f"| `{_cell(e['image'])}` | {_cell(e['reference'])} | {_cell(e['generated'])} |" for e in examples]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_report_generation(cfg: GenerationFinetuneConfig) -> dict[str, Any]:
    """Train, generate, score and write OUT/metrics.json, OUT/report.md, OUT/predictions.jsonl and OUT/model."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.meteor:
        warm_up_meteor()  # the jar loads while the model trains
    data = load_report_data(cfg.dataset, cfg.data, cfg.max_train_samples, cfg.max_test_samples,
                            cfg.synthetic_num_images, cfg.image_size, cfg.sections, source=cfg.source,
                            split_seed=cfg.seed)
    processor = build_processor(cfg, data)
    model = build_generator(cfg, processor.tokenizer)
    _check_input_size(model, processor.image_processor)
    collator = ReportGenerationCollator(processor.image_processor, processor.tokenizer, cfg.max_length)
    training = train_generator(model, data.train, collator, cfg)

    model.eval()
    start = time.perf_counter()
    generated = generate_reports(model, processor.image_processor, processor.tokenizer, data.test,
                                 batch_size=cfg.eval_batch_size, num_beams=cfg.num_beams)
    generation_seconds = round(time.perf_counter() - start, 2)
    references = data.test["text"]
    metrics = report_generation_metrics(generated, references, meteor=cfg.meteor)

    notes = []
    if metrics["METEOR"] is None:
        reason = meteor_unavailable_reason() if cfg.meteor else "switched off (--no-meteor)"
        notes.append(f"METEOR not computed: {reason}")
    paths, ids = ReportData.image_paths(data.test), data.test["dicom_id"]
    payload = {
        "task": "report_generation", "model": cfg.model, "config": cfg.config, "dataset": cfg.dataset,
        "num_train": len(data.train), "num_test": len(data.test),
        "metrics": {key: metrics[key] for key in METRIC_KEYS},
        "training": training,
        "generation": {"decoding": "greedy" if cfg.num_beams == 1 else f"beam search ({cfg.num_beams} beams)",
                       "num_beams": cfg.num_beams, "max_length": cfg.max_length, "seconds": generation_seconds},
        "metric_library": "pycocoevalcap (BLEU corpus-level, METEOR 1.5 jar, ROUGE-L); texts lower-cased, "
                          "punctuation dropped",
        "notes": notes,
        "settings": asdict(cfg),
    }
    write_json(out / "metrics.json", payload)
    rows = [{"dicom_id": i, "image": p, "reference": r, "generated": g}
            for i, p, r, g in zip(ids, paths, references, generated)]
    write_jsonl(out / "predictions.jsonl", rows)
    write_markdown(out / "report.md", payload, rows[: cfg.num_examples])
    if cfg.save_model:
        model.save_pretrained(out / "model")
        processor.save_pretrained(out / "model")
    return payload


__all__ = [
    "GenerationFinetuneConfig",
    "build_generator",
    "build_processor",
    "run_report_generation",
    "train_generator",
    "training_arguments",
    "write_markdown",
]
