"""Report generation (PLACE's downstream task): a pre-trained PLAN vision tower as the encoder of a
`transformers.VisionEncoderDecoderModel`, fine-tuned with `Seq2SeqTrainer`, scored with BLEU-1..4, METEOR and
ROUGE-L (pycocoevalcap). `plan-finetune-report-generation` (`plan_hf.cli.finetune`) runs
`finetune.run_report_generation`.

Importing this package registers `model_type="plan_vision_encoder"` with `AutoConfig`/`AutoModel`, so that
`VisionEncoderDecoderModel.from_pretrained(folder)` can rebuild a saved generator.
"""

from .data import ReportGenerationCollator, generate_reports, load_report_data, report_labels
from .metrics import METRIC_KEYS, meteor_unavailable_reason, normalize_report, report_generation_metrics
from .modeling import (
    DecoderSettings,
    PlanVisionEncoder,
    PlanVisionEncoderConfig,
    build_report_generator,
    configure_tokenizer,
    load_report_generator,
)

__all__ = [
    "DecoderSettings",
    "METRIC_KEYS",
    "PlanVisionEncoder",
    "PlanVisionEncoderConfig",
    "ReportGenerationCollator",
    "build_report_generator",
    "configure_tokenizer",
    "generate_reports",
    "load_report_data",
    "load_report_generator",
    "meteor_unavailable_reason",
    "normalize_report",
    "report_generation_metrics",
    "report_labels",
]
