"""Evaluate a model on a suite and write metrics.json, report.md and pictures.

    plan-eval --model_name_or_path PATH_OR_HUB_ID --suite synthetic|mimic|chexpert5x200|ms-cxr|rsna|siim \
        --data_dir DIR --output_dir DIR [--split test] [--max_samples N] [--eval_batch_size B] [--device cpu] \
        [--supervised_ceiling DIR]
    plan-eval --model_name_or_path PATH_OR_HUB_ID --suite image-text --dataset csv|imagefolder|disk|parquet|... \
        --data_dir PATH [--image_column C --text_column C [--label_columns L ...]] --output_dir DIR

(`python -m eval.run` from a checkout.) What each suite runs and the keys of metrics.json:
`plan_hf.evaluation.runner`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ..evaluation import EvalSettings, HeatmapMethod, Suite, load_model, run_evaluation  # noqa: E402
from ..evaluation.report import number  # noqa: E402
from ..data.sources import source_from  # noqa: E402
from .arguments import (  # noqa: E402
    ConfigError,
    DataArguments,
    ModelArguments,
    RunArguments,
    SourceArguments,
    console_script,
    parse,
)

# Flags of the argparse command line this replaced, and their names now.
RENAMED = {"model": "model_name_or_path", "data": "data_dir", "out": "output_dir", "batch_size": "eval_batch_size"}


@dataclass(kw_only=True)
class EvalArguments(ModelArguments, SourceArguments, DataArguments, RunArguments):
    suite: Suite  # the protocol and data set layout (image-text: any `dataset:` source of image-report pairs)
    data_dir: str | None = None  # the data set's folder or file (unset for a datasets.load_dataset name)
    label_columns: list[str] | None = None  # image-text: CheXpert-style label columns for zero-shot (1 positive)
    split: str = "test"  # train | validate | test (MIMIC-style and MS-CXR sets)
    max_samples: int | None = None  # seeded subsample of each evaluated set
    eval_batch_size: int = 32  # samples per forward pass at inference
    device: str = "cpu"
    n_boot: int = 1000  # bootstrap resamples of the 95% intervals
    grounding_methods: list[HeatmapMethod] | None = None  # default: every method the model supports
    ms_cxr_csv: str | None = None  # ms-cxr suite: the box CSV when it is not in data_dir (its paths are under data_dir)
    supervised_ceiling: str | None = None  # a benchmarks.supervised_ceiling output: its maps as a reference row
    reference_rows: bool = True  # grounding with the position-prior and grid-ceiling rows
    progress: bool = True  # tqdm progress bars

    def __post_init__(self) -> None:
        if self.data_dir is None and not (self.suite == Suite.IMAGE_TEXT and self.dataset not in ("mimic-cxr",
                                                                                                 "mimic_cxr")):
            raise ConfigError(f"--suite {Suite(self.suite).value} needs --data_dir")


def parse_args(argv: list[str] | None = None) -> EvalArguments:
    return parse(EvalArguments, argv, prog="plan-eval", description=__doc__.split("\n\n")[0], renamed=RENAMED)


def main(argv: list[str] | None = None) -> dict:
    """Evaluate with the arguments `argv` (None: the command line); returns the metrics written to metrics.json."""
    args = parse_args(argv)
    model, processor = load_model(args.model_name_or_path, args.device)
    methods = None if args.grounding_methods is None else tuple(HeatmapMethod(m) for m in args.grounding_methods)
    out = Path(args.output_dir)
    source = None
    if Suite(args.suite) is Suite.IMAGE_TEXT:
        try:
            source = source_from(args)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    data_dir = Path(args.data_dir) if source is None else source.root or Path(".")
    settings = EvalSettings(suite=Suite(args.suite), data_dir=data_dir, out_dir=out, split=args.split,
                            max_samples=args.max_samples, batch_size=args.eval_batch_size, seed=args.seed,
                            n_boot=args.n_boot, grounding_methods=methods, progress=args.progress,
                            model_name=args.model_name_or_path,
                            ms_cxr_csv=None if args.ms_cxr_csv is None else Path(args.ms_cxr_csv),
                            reference_rows=args.reference_rows, source=source,
                            label_columns=tuple(args.label_columns or ()),
                            supervised_ceiling=None if args.supervised_ceiling is None else Path(args.supervised_ceiling))
    metrics = run_evaluation(model, processor, settings)
    for method, summary in (metrics.get("grounding") or {}).items():
        macro = summary["macro"]
        print(f"grounding ({method}): CNR {number(macro['cnr'])}, mIoU {number(macro['miou'])}, "
              f"pointing {number(macro['pointing'])}")
    zero_shot = metrics.get("zero_shot") or {}
    if "multiclass" in zero_shot:
        print(f"zero-shot multi-class: accuracy {number(zero_shot['multiclass']['accuracy'])}, "
              f"macro AUC {number(zero_shot['multiclass']['macro_auc'])}")
    if "binary" in zero_shot:
        print(f"zero-shot binary: macro AUC {number(zero_shot['binary']['macro']['auc'])}")
    if "retrieval" in metrics:
        r = metrics["retrieval"]
        print(f"retrieval: i2t R@1/5/10 {number(r['i2t_recall@1'])}/{number(r['i2t_recall@5'])}/"
              f"{number(r['i2t_recall@10'])}, t2i R@1/5/10 {number(r['t2i_recall@1'])}/{number(r['t2i_recall@5'])}/"
              f"{number(r['t2i_recall@10'])}")
    print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")
    return metrics


cli = console_script(main)

if __name__ == "__main__":
    main()
