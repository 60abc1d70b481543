"""Evaluate a model on a suite and write metrics.json, report.md and pictures.

    python -m eval.run --model PATH_OR_HUB_ID --suite synthetic|mimic|chexpert5x200|ms-cxr|rsna|siim \
        --data DIR --out DIR [--split test] [--max-samples N] [--batch-size B] [--device cpu] \
        [--supervised-ceiling DIR]

What each suite runs and the keys of metrics.json: `plan_hf.evaluation.runner`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from plan_hf.evaluation import EvalSettings, HeatmapMethod, Suite, load_model, run_evaluation  # noqa: E402
from plan_hf.evaluation.report import number  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved model folder or a Hub id")
    parser.add_argument("--suite", required=True, choices=[s.value for s in Suite])
    parser.add_argument("--data", required=True, type=Path, help="the suite's data folder")
    parser.add_argument("--out", required=True, type=Path, help="where metrics.json, report.md and PNGs go")
    parser.add_argument("--split", default="test", help="train | validate | test (MIMIC-style and MS-CXR sets)")
    parser.add_argument("--max-samples", type=int, default=None, help="seeded subsample of each evaluated set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the 95%% intervals")
    parser.add_argument("--grounding-methods", default=None,
                        help="comma-separated: local,global (default: every method the model supports)")
    parser.add_argument("--ms-cxr-csv", type=Path, default=None,
                        help="ms-cxr suite: the box CSV when it is not in --data (its paths are under --data)")
    parser.add_argument("--supervised-ceiling", type=Path, default=None,
                        help="a python -m benchmarks.supervised_ceiling output: its maps as a reference row")
    parser.add_argument("--no-reference-rows", action="store_true",
                        help="grounding without the position-prior and grid-ceiling rows")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model, processor = load_model(args.model, args.device)
    methods = None if args.grounding_methods is None else tuple(
        HeatmapMethod(m.strip()) for m in args.grounding_methods.split(",") if m.strip())
    settings = EvalSettings(suite=Suite(args.suite), data_dir=args.data, out_dir=args.out, split=args.split,
                            max_samples=args.max_samples, batch_size=args.batch_size, seed=args.seed,
                            n_boot=args.n_boot, grounding_methods=methods, progress=not args.no_progress,
                            model_name=args.model, ms_cxr_csv=args.ms_cxr_csv,
                            reference_rows=not args.no_reference_rows, supervised_ceiling=args.supervised_ceiling)
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
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'report.md'}")
    return metrics


if __name__ == "__main__":
    main()
