"""The supervised ceiling of the grounding table: a segmentation model trained on the synthetic benchmark's own lesion
masks, one output channel per phrase category, its maps scored on the grounding phrases like a model's heat maps.

    python -m benchmarks.supervised_ceiling --data DIR --out CEILING [--steps 600] [--model random --config tiny-resnet]
    python -m benchmarks.supervised_ceiling --data DIR --out PRIORS --steps 0      # the position priors alone
    python -m eval.run --model_name_or_path MODEL --suite synthetic --data_dir DIR --output_dir EVAL --supervised_ceiling CEILING

Training (`plan_hf.evaluation.ceiling`) is the fine-tuning protocol of `plan_hf.downstream.finetune`
(`PlanForSegmentation`, Trainer, soft Dice + 0.1 BCE) on every training image of the set, with channel k the union of
the masks of the image's findings of MS-CXR category k. Writes CEILING/model (the export, with
``supervised_ceiling.json``: its categories and the benchmark version it was trained on) and CEILING/metrics.json: its
grounding scores on the ``--split`` phrases beside the position priors' (`plan_hf.evaluation.references`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from plan_hf.data.synthetic import benchmark_of
from plan_hf.evaluation.ceiling import score, train_ceiling
from plan_hf.evaluation.report import number
from plan_hf.evaluation.runner import to_json


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.supervised_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="a plan_hf.data.synthetic folder")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=600, help="0: no ceiling, score the position priors only")
    parser.add_argument("--model", default="random",
                        help="'random' (then --config), a PLAN export to start from, or a ceiling's model folder to "
                             "train further")
    parser.add_argument("--config", default="tiny-resnet", help="with --model random: tiny-resnet or a config folder")
    parser.add_argument("--image-size", type=int, default=224, help="input side (when the export has no processor)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test", help="the phrases it is scored on")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ceiling, training = None, {"benchmark": benchmark_of(args.data)}
    if args.steps > 0:
        ceiling, training = train_ceiling(args.data, args.out, args.steps, args.model, args.config, args.image_size,
                                          args.batch_size, args.learning_rate, args.seed, args.head_dim)
    args.out.mkdir(parents=True, exist_ok=True)
    grounding = score(ceiling, args.data, args.split, args.n_boot)
    metrics = to_json({"benchmark": training["benchmark"], "split": args.split, "training": training,
                       "grounding": grounding,
                       "command": "python -m benchmarks.supervised_ceiling " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv)})
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    for name, summary in grounding.items():
        macro = summary["macro"]
        print(f"{name}: pointing {number(macro['pointing'])}, CNR {number(macro['cnr'])}, "
              f"mIoU {number(macro['miou'])} (chance pointing {number(summary['chance_pointing'])})")
    return metrics


if __name__ == "__main__":
    main()
