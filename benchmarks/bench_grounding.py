"""The equal-budget grounding table: local-alignment objectives pre-trained from the offline pretrained towers
(MiniLM + ImageNet MobileNetV2, 224 px, 14x14 grid, augmentation on) with the same data, steps, batch and learning
rates, over several seeds, evaluated with `python -m eval.run --suite synthetic`; each metric as the mean over seeds
with a 95% t-interval.

    python -m benchmarks.bench_grounding --data_dir runs/syn224 --output_dir runs/grounding --seeds 0 1 2 \\
        --variants global=global plan=plan plan_within_pair=plan_within_pair gloria=gloria mgca=mgca place=place \\
        plan_place=plan+place plan_noaug=plan:augment=false
    python -m benchmarks.bench_grounding ... --regime tiny      # the old towers from scratch at 128 px

A variant is ``name=preset[:key=value,...]`` as in `benchmarks.bench_quality` (a PlanConfig field goes to the model,
any other key to pre-training, e.g. ``augment=false``). Runs already evaluated in `--output_dir` are reused
(`--reevaluate`: evaluated again with the current `eval.run`). Results: ``<output_dir>/grounding.json`` and
``GROUNDING.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bench_quality import Variant, _environment, _run, eval_command, final_losses, train_command

DEFAULT_VARIANTS = ("global=global", "plan=plan", "plan_within_pair=plan_within_pair", "gloria=gloria", "mgca=mgca",
                    "place=place", "plan_place=plan+place")
# Shared by every run; only the objective and the seed differ. The towers' rates are those of the demo.
TRAINING = {
    "micro_batch_size": 16,
    "accumulation_steps": 1,
    "learning_rate": 5.0e-4,
    "text_tower_learning_rate": 5.0e-5,
    "vision_tower_learning_rate": 1.0e-4,
    "weight_decay": 0.05,
    "warmup_steps": 15,
    "lr_scheduler": "cosine",
    "max_length": 96,
    "augment": True,
    "save_every_steps": 1_000_000,
    "log_every_steps": 25,
    "log_with": "none",
    "progress_bar": False,
    "export": True,
    "cpu": True,
}
MODEL = {"projection_dim": 128}
# (label, path in metrics.json, which is better)
METRICS = (
    ("local pointing", ("grounding", "local", "macro", "pointing")),
    ("local CNR", ("grounding", "local", "macro", "cnr")),
    ("local signed CNR", ("grounding", "local", "macro", "signed_cnr")),
    ("global-map pointing", ("grounding", "global", "macro", "pointing")),
    ("global-map CNR", ("grounding", "global", "macro", "cnr")),
    ("global-map signed CNR", ("grounding", "global", "macro", "signed_cnr")),
    ("zero-shot ACC", ("zero_shot", "multiclass", "accuracy")),
    ("zero-shot AUC", ("zero_shot", "multiclass", "macro_auc")),
    ("i2t R@10", ("retrieval", "i2t_recall@10")),
)
# Student t quantiles (two-sided 95%) for n - 1 degrees of freedom; scipy is not needed for so few.
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# The offline pretrained towers (`plan_hf.towers`): MiniLM (first 3 of 6 layers) + ImageNet MobileNetV2 with its
# stride-16 stage as the grid, at 224 px with ImageNet statistics.
OFFLINE_TOWERS = {
    "text_model": "offline:minilm", "text_num_layers": 3, "vision_model": "offline:mobilenet_v2",
    "vision_feature_stride": 16, "image_size": 224, "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "model": MODEL,
}
# The old regime of RESULTS §5, for one row beside the new one: towers from scratch (plan_hf.tiny's 2-layer BERT with a
# WordPiece vocabulary of the training reports, the demo's former small ResNet) at 128 px, an 8x8 grid.
TINY_TOWERS = {
    "vision_config": {"model_type": "resnet", "num_channels": 3, "embedding_size": 32, "hidden_sizes": [32, 64, 128, 256],
                      "depths": [1, 1, 1, 1], "layer_type": "basic"},
    "image_size": 128, "model": {**MODEL, "local_vision_feature_layer": -2},
}
REGIMES = {"pretrained": OFFLINE_TOWERS, "tiny": TINY_TOWERS}


def metric(metrics: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = metrics
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, (int, float)) and math.isfinite(node) else None


def mean_interval(values: list[float]) -> dict[str, float | int | None]:
    """Mean over seeds with a two-sided 95% Student-t interval (None with a single seed)."""
    if not values:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = T_95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def run_one(variant: Variant, seed: int, config_path: Path, data_dir: Path, out: Path, steps: int,
            eval_batch_size: int, env: dict[str, str], reevaluate: bool = False) -> dict[str, Any]:
    run_dir = out / variant.name / f"seed{seed}"
    result_path = run_dir / "result.json"
    previous = json.loads(result_path.read_text()) if result_path.is_file() else None
    if previous is not None and not reevaluate:
        return previous
    run_dir.mkdir(parents=True, exist_ok=True)
    train = train_command(variant, config_path, run_dir / "train", steps) + ["--seed", str(seed)]
    if previous is not None:  # --reevaluate: the trained model again through the current evaluation
        train, train_seconds = previous["train_command"], previous["train_seconds"]
    else:
        train_seconds = _run(train, run_dir / "train.log", env)
    evaluate = eval_command(run_dir / "train" / "model", data_dir, run_dir / "eval", eval_batch_size)
    eval_seconds = _run(evaluate, run_dir / "eval.log", env)
    result = {"name": variant.name, "description": variant.describe(), "seed": seed, "train_seconds": train_seconds,
              "eval_seconds": eval_seconds, "train_command": train, "eval_command": evaluate,
              "final_losses": final_losses(run_dir / "train"),
              "metrics": json.loads((run_dir / "eval" / "metrics.json").read_text())}
    result_path.write_text(json.dumps(result, indent=2))
    print(f"{variant.name} seed {seed}: trained {train_seconds / 60:.1f} min, evaluated {eval_seconds:.0f} s",
          flush=True)
    return result


def summarise(runs: list[dict[str, Any]], variants: list[Variant]) -> dict[str, Any]:
    table = {}
    for variant in variants:
        mine = [r for r in runs if r["name"] == variant.name]
        table[variant.name] = {
            "description": variant.describe(), "seeds": [r["seed"] for r in mine],
            "train_minutes": statistics.fmean(r["train_seconds"] for r in mine) / 60,
            **{label: mean_interval([v for r in mine if (v := metric(r["metrics"], path)) is not None])
               for label, path in METRICS},
            "per_category_local_pointing": {
                category: mean_interval([r["metrics"]["grounding"]["local"]["per_category"][category]["pointing"]
                                         for r in mine])
                for category in mine[0]["metrics"].get("grounding", {}).get("local", {}).get("per_category", {})},
        }
    return table


def _cell(stat: dict[str, Any]) -> str:
    if stat.get("mean") is None:
        return "n/a"
    if stat.get("low") is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def markdown(table: dict[str, Any], references: dict[str, Any], settings: dict[str, Any]) -> str:
    labels = [label for label, _ in METRICS]
    towers = ("MiniLM (3 layers) + ImageNet MobileNetV2 (stride-16 grid, 14x14 at 224 px)"
              if settings.get("regime", "pretrained") == "pretrained"
              else "towers from scratch (2-layer BERT + small ResNet, 8x8 grid at 128 px)")
    lines = [f"## Equal-budget grounding: local objectives, {settings.get('regime', 'pretrained')} regime", "",
             f"{settings['steps']} steps of batch {TRAINING['micro_batch_size']} per run on `{settings['data_dir']}`, "
             f"{towers}, augmentation on unless the variant says otherwise; mean over seeds with a 95% t-interval "
             "(n = seeds). Command:", "", "```", settings["command"], "```", "",
             "| variant | objective | seeds | " + " | ".join(labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    for name, row in table.items():
        lines.append(f"| {name} | {row['description']} | {len(row['seeds'])} | "
                     + " | ".join(_cell(row[label]) for label in labels) + " |")
    if references:
        lines += ["", "Reference rows of the same test phrases (from `eval.run`'s metrics.json of the first run):", "",
                  "```", json.dumps(references, indent=1)[:4000], "```"]
    categories = sorted({c for row in table.values() for c in row["per_category_local_pointing"]})
    if categories:
        lines += ["", "Local pointing per category (mean over seeds):", "",
                  "| variant | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
        for name, row in table.items():
            per = row["per_category_local_pointing"]
            lines.append(f"| {name} | " + " | ".join(
                f"{per[c]['mean']:.2f}" if c in per and per[c]["mean"] is not None else "n/a" for c in categories)
                + " |")
    return "\n".join(lines).replace(sys.executable + " ", "python ") + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, required=True, help="a synthetic set (python -m plan_hf.data.synthetic)")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/grounding"))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at the same time")
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--reevaluate", action="store_true",
                        help="evaluate the runs already trained in --output_dir again (after a change to eval.run)")
    parser.add_argument("--regime", choices=sorted(REGIMES), default="pretrained",
                        help="the offline pretrained towers at 224 px, or the old towers from scratch at 128 px")
    args = parser.parse_args(argv)

    env = _environment(args.threads) | {"OMP_WAIT_POLICY": "PASSIVE"}  # spinning threads starve a shared CPU
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train.yaml"
    training = dict(TRAINING)
    if args.regime == "tiny":  # towers from scratch learn at the heads' rate
        del training["text_tower_learning_rate"], training["vision_tower_learning_rate"]
    config_path.write_text(yaml.safe_dump({"data_dir": str(args.data_dir), **training, **REGIMES[args.regime]},
                                          sort_keys=False))
    variants = [Variant.parse(spec) for spec in args.variants]
    jobs = [(variant, seed) for seed in args.seeds for variant in variants]  # seed-major: every variant gets seed 0 first
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        runs = list(pool.map(lambda job: run_one(job[0], job[1], config_path, args.data_dir, out, args.steps,
                                                 args.eval_batch_size, env, args.reevaluate), jobs))
    table = summarise(runs, variants)
    references = runs[0]["metrics"].get("grounding", {}).get("references", {}) if runs else {}
    settings = {"steps": args.steps, "data_dir": str(args.data_dir), "regime": args.regime,
                "command": "python -m benchmarks.bench_grounding " + " ".join(sys.argv[1:] if argv is None else argv)}
    (out / "grounding.json").write_text(json.dumps({"settings": settings, "table": table, "references": references},
                                                   indent=2))
    text = markdown(table, references, settings)
    (out / "GROUNDING.md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main()
