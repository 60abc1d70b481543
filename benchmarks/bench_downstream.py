"""Downstream benchmark: classification, detection and segmentation on the synthetic CXR set, a PLAN-pretrained tower
against a randomly initialised tower of the same config, at the same budget (steps, batch, learning rate, seed).

    python -m benchmarks.bench_downstream --out runs/downstream --model runs/pretrain/model \\
        [--data DIR | --num-images 1200 --image-size 64] [--fractions 0.1 1.0] [--steps 150] [--threads 1]
    python -m benchmarks.bench_downstream --out runs/downstream --pretrain-steps 300   # pre-trains the export first
    python -m benchmarks.bench_downstream --out runs/downstream                          # random-init arm only

Every cell is one `plan_hf.downstream.finetune.run_finetune` call (what `python -m training.finetune_*` runs), with
its own report under ``<out>/<task>/<arm>/f<fraction>``. The random arm takes the export's config and image
processor (``--model_name_or_path random --config_name <export>``), so only the tower's weights differ. Results: ``<out>/results.json``
and ``<out>/DOWNSTREAM.md`` (copied to ``--markdown`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HEADLINE = {"classification": ("macro_auc", "macro AUC"), "detection": ("map", "mAP@[.40:.75]"),
            "segmentation": ("dice", "Dice")}
# The pre-training run --pretrain-steps makes: the bench_quality settings, tiny towers, on the same synthetic data.
PRETRAIN = {
    "micro_batch_size": 32, "accumulation_steps": 1, "learning_rate": 5.0e-4, "weight_decay": 0.05, "warmup_steps": 20,
    "lr_scheduler": "cosine", "max_length": 128, "seed": 42, "save_every_steps": 1_000_000, "log_every_steps": 25,
    "log_with": "none", "progress_bar": False, "cpu": True, "preset": "plan", "model": {"projection_dim": 64},
}


def ensure_data(data_dir: Path, num_images: int, image_size: int) -> None:
    if (data_dir / "findings.jsonl").is_file():
        return
    from plan_hf.data.synthetic import generate_synthetic

    generate_synthetic(data_dir, num_images=num_images, seed=0, image_size=image_size, workers=2, contact_sheet=False)


def pretrain(out: Path, data_dir: Path, image_size: int, steps: int, env: dict[str, str]) -> Path:
    """Pre-train PLAN with `python -m training.pretrain` on the benchmark's data; returns the export folder."""
    output_dir = out / "pretrain"
    if (output_dir / "model" / "config.json").is_file():
        return output_dir / "model"
    config = output_dir / "config_in.yaml"
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {"data_dir": str(data_dir), "image_size": image_size, **PRETRAIN}
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    command = [sys.executable, "-m", "training.pretrain", "--config", str(config), "--output_dir", str(output_dir),
               "--max_steps", str(steps)]
    with open(output_dir / "pretrain.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return output_dir / "model"


def run_cell(task: str, arm: str, fraction: float, args: argparse.Namespace, model: str | None, data_dir: Path) -> dict:
    from plan_hf.downstream.finetune import FinetuneConfig, run_finetune

    cfg = FinetuneConfig(
        task=task, model=model if arm == "plan" else "random",
        config=None if arm == "plan" else (model or f"tiny-{args.tower}"),
        dataset="synthetic", data=str(data_dir), out=str(args.out / task / arm / f"f{fraction:g}"), fraction=fraction,
        seed=args.seed, linear_probe=args.linear_probe, image_size=args.image_size, max_steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate, save_model=False,
    )
    start = time.perf_counter()
    payload = run_finetune(cfg)
    key = HEADLINE[task][0]
    return {"task": task, "arm": arm, "fraction": fraction, "value": payload["metrics"][key], "metric": key,
            "num_train": payload["num_train"], "num_test": payload["num_test"],
            "seconds": round(time.perf_counter() - start, 1), "metrics": payload["metrics"]}


def _cell(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def model_input_side(model: str | None, default: int) -> int:
    """The square side the export's image processor feeds the tower (what both arms use), else `default`."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = Path(model) / name if model else None
        if path is not None and path.is_file():
            config = json.loads(path.read_text())
            config = config.get(key, {}) if key else config
            if "size" in config:
                return int(config["size"]["height"])
    return default


def markdown(results: list[dict], settings: dict[str, Any]) -> str:
    arms = [a for a in ("random", "plan") if any(r["arm"] == a for r in results)]
    lines = [
        "## Downstream fine-tuning (synthetic CXR set)", "",
        f"Synthetic set `{settings['data']}` ({settings['num_images']} studies, model input {settings['image_size']} px; "
        f"official train/test split). Each cell: `run_finetune` (= `python -m training.finetune_<task>`), "
        f"{settings['steps']} steps of batch {settings['batch_size']}, learning rate {settings['learning_rate']}, "
        f"seed {settings['seed']}, {'linear probe (frozen tower)' if settings['linear_probe'] else 'full fine-tuning'}"
        "; "
        "the training fraction is a seeded subset of the train split. `random` = the same config with a randomly "
        "initialised tower" + (f"; `plan` = the export `{settings['model']}`." if settings["model"] else
                               ". **No pre-trained export was given: random-init numbers only.**"),
        "Detection: one class (every lesion's boxes, RSNA's one-class protocol), COCO AP averaged over IoU 0.40-0.75. "
        "Segmentation: every lesion's mask, per-image Dice at the original size (empty-empty = 1).", "",
        "| task | metric | fraction | n train | " + " | ".join(arms) + (" | plan - random |" if len(arms) == 2 else ""),
        "|---|---|---|---|" + "---|" * len(arms) + ("---|" if len(arms) == 2 else ""),
    ]
    for task in HEADLINE:
        for fraction in sorted({r["fraction"] for r in results if r["task"] == task}):
            cells = {r["arm"]: r for r in results if r["task"] == task and r["fraction"] == fraction}
            if not cells:
                continue
            row = [task, HEADLINE[task][1], f"{fraction:.0%}", str(next(iter(cells.values()))["num_train"])]
            row += [_cell(cells[a]["value"]) if a in cells else "-" for a in arms]
            both = len(arms) == 2 and all(a in cells for a in arms)
            if both and None not in (cells["plan"]["value"], cells["random"]["value"]):
                row.append(f"{cells['plan']['value'] - cells['random']['value']:+.3f}")
            lines.append("| " + " | ".join(row) + " |")
    total = sum(r["seconds"] for r in results)
    lines += ["", f"Wall time of the fine-tuning cells: {total:.0f} s on {settings['device']} "
                  f"({settings['threads']} torch thread(s)). Command: `{settings['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="a pre-trained export folder (training.pretrain's <output_dir>/model)")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="without --model: pre-train one for N steps")
    parser.add_argument("--data", type=Path, help="synthetic set folder (default: <out>/data, generated)")
    parser.add_argument("--num-images", type=int, default=1200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--tower", choices=("resnet", "vit"), default="resnet", help="random arm without --model")
    parser.add_argument("--tasks", nargs="+", default=list(HEADLINE), choices=list(HEADLINE))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--linear-probe", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny towers)")
    parser.add_argument("--markdown", type=Path, help="also write the section here (e.g. a section to paste into benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # one load report per cell ("head newly initialised") is noise here
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data or args.out / "data"
    ensure_data(data_dir, args.num_images, args.image_size)
    model = args.model
    if model is None and args.pretrain_steps > 0:
        model = str(pretrain(args.out, data_dir, args.image_size, args.pretrain_steps, env))
    arms = ["random"] + (["plan"] if model else [])

    results = []
    for task in args.tasks:
        for fraction in args.fractions:
            for arm in arms:
                results.append(run_cell(task, arm, fraction, args, model, data_dir))
                print(json.dumps({k: v for k, v in results[-1].items() if k != "metrics"}), flush=True)
    settings = {
        "data": str(data_dir), "num_images": sum(1 for _ in open(data_dir / "findings.jsonl")),
        "image_size": model_input_side(model, args.image_size), "steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "seed": args.seed, "linear_probe": args.linear_probe, "model": model,
        "pretrain_steps": args.pretrain_steps if args.model is None else None, "threads": args.threads,
        "device": "GPU" if torch.cuda.is_available() else "CPU",
        "command": " ".join(["python -m benchmarks.bench_downstream", *(argv or sys.argv[1:])]),
    }
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    text = markdown(results, settings)
    (args.out / "DOWNSTREAM.md").write_text(text)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
