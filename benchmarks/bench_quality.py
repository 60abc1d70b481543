"""Quality benchmark: pre-train objective variants with the same budget on the synthetic CXR set, evaluate each with
`python -m eval.run --suite synthetic`, and write a comparison table.

    python -m benchmarks.bench_quality --out runs/quality [--num-images 2400 --image-size 128 --steps 300]
        [--variants global=global plan=plan ...] [--threads 1]
    python -m benchmarks.bench_quality --out runs/quality --inference-ablation plan

A variant is ``name=preset[:key=value,...]``: a `plan_hf.presets` name and `PlanConfig` overrides, e.g.
``plan_l2=plan:local_vision_feature_layer=-2``. Every variant trains with the training CLI
(`python -m training.pretrain`, tiny towers of `plan_hf.tiny`, the same data, seed, steps, batch and learning rate)
and is evaluated on the test split. Results: ``<out>/results.json`` and ``<out>/QUALITY.md`` (copied to
``--markdown`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plan_hf.training.config import plan_config_fields

DEFAULT_VARIANTS = ("global=global", "plan=plan")
# Shared by every variant: only the objective differs.
TRAINING = {
    "micro_batch_size": 32,
    "accumulation_steps": 1,
    "learning_rate": 5.0e-4,
    "weight_decay": 0.05,
    "warmup_steps": 20,
    "lr_scheduler": "cosine",
    "max_length": 128,
    "seed": 42,
    "save_every_steps": 1_000_000,  # no intermediate checkpoints: they cost time and are not evaluated
    "log_every_steps": 25,
    "log_with": "none",
    "progress_bar": False,
    "cpu": True,
}
MODEL = {"projection_dim": 64}


@dataclass
class Variant:
    name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """``name=preset[:key=value,...]``; values are read as YAML (numbers, booleans)."""
        name, _, rest = spec.partition("=")
        preset, _, options = (rest or name).partition(":")
        overrides = {}
        for option in filter(None, options.split(",")):
            key, _, value = option.partition("=")
            overrides[key.strip()] = yaml.safe_load(value)
        return cls(name.strip(), preset.strip(), overrides)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.overrides.items())
        return f"preset `{self.preset}`" + (f", {extra}" if extra else "")


def _environment(threads: int) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path.cwd()), env.get("PYTHONPATH")]))
    return env


def _run(command: list[str], log: Path, env: dict[str, str]) -> float:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"command failed ({completed.returncode}); see {log}")
    return time.perf_counter() - start


def ensure_data(data_dir: Path, num_images: int, image_size: int, env: dict[str, str]) -> None:
    if (data_dir / "mimic-cxr-2.0.0-split.csv.gz").is_file():
        return
    _run([sys.executable, "-m", "plan_hf.data.synthetic", "--out", str(data_dir), "--num-images", str(num_images),
          "--image-size", str(image_size), "--seed", "0", "--workers", "2"], data_dir.parent / "generate.log", env)


def train_command(variant: Variant, config_path: Path, output_dir: Path, steps: int) -> list[str]:
    command = [sys.executable, "-m", "training.pretrain", "--config", str(config_path), "--preset", variant.preset,
               "--output_dir", str(output_dir), "--max_steps", str(steps)]
    model_fields = plan_config_fields()
    for key, value in variant.overrides.items():
        # a PlanConfig field goes to the model; anything else is a pre-training argument (e.g. augment=false)
        command += [f"--model.{key}" if key in model_fields else f"--{key}", json.dumps(value)]
    return command


def eval_command(model_dir: Path, data_dir: Path, out_dir: Path, batch_size: int) -> list[str]:
    return [sys.executable, "-m", "eval.run", "--model_name_or_path", str(model_dir), "--suite", "synthetic",
            "--data_dir", str(data_dir), "--output_dir", str(out_dir), "--split", "test", "--eval_batch_size",
            str(batch_size), "--no_progress"]


def probe_command(model_dir: Path | None, config_dir: Path, data_dir: Path, out_dir: Path, steps: int) -> list[str]:
    """A linear probe (frozen tower, a linear head on all training images) of the export's vision tower; with
    `model_dir` None, of a randomly initialised tower of the same config (the floor the pre-training must beat)."""
    model = (["--model_name_or_path", str(model_dir)] if model_dir is not None
             else ["--model_name_or_path", "random", "--config_name", str(config_dir)])
    return [sys.executable, "-m", "training.finetune_classification", *model, "--dataset", "synthetic", "--data_dir",
            str(data_dir), "--fraction", "1.0", "--linear_probe", "--output_dir", str(out_dir), "--max_steps",
            str(steps), "--seed", "0", "--no_save_model", "--cpu"]


def run_probe(model_dir: Path | None, config_dir: Path, data_dir: Path, out_dir: Path, steps: int,
              env: dict[str, str]) -> dict[str, Any]:
    command = probe_command(model_dir, config_dir, data_dir, out_dir, steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = _run(command, out_dir.parent / f"{out_dir.name}.log", env)
    metrics = json.loads((out_dir / "metrics.json").read_text())["metrics"]
    return {"command": command, "seconds": seconds, "macro_auc": metrics.get("macro_auc"),
            "accuracy": metrics.get("accuracy"), "metrics": metrics}


def final_losses(output_dir: Path) -> dict[str, float]:
    """The last logged loss terms of a run (training/loop.py's JSONL log), when there is one."""
    logs = sorted(output_dir.glob("**/*.jsonl"))
    if not logs:
        return {}
    last = [json.loads(line) for line in logs[0].read_text().splitlines() if line.strip()][-1]
    return {k: v for k, v in last.items() if k.startswith("loss") and isinstance(v, (int, float))}


def grid_ceilings(data_dir: Path, image_size: int, grids: list[int]) -> dict[int, dict[str, float]]:
    """Macro CNR / mIoU / pointing game of the best map a g x g feature grid can give, on the test phrases
    (`plan_hf.evaluation.grounding.grid_oracle_maps`): what resolution alone allows."""
    from plan_hf import PlanImageProcessor
    from plan_hf.evaluation.data import find_ms_cxr_csv, grounding_items
    from plan_hf.evaluation.grounding import box_area_fraction, grid_oracle_maps, score_heatmap, summarise

    items = grounding_items(find_ms_cxr_csv(data_dir), data_dir, "test")
    image_processor = PlanImageProcessor(size=image_size)
    ceilings = {}
    for grid in grids:
        maps = grid_oracle_maps(image_processor, [item.image for item in items], [item.boxes for item in items], grid)
        records = [{"category": item.category, **score_heatmap(heatmap, item.boxes),
                    "chance_pointing": box_area_fraction(item.boxes, *heatmap.shape)}
                   for item, heatmap in zip(items, maps)]
        ceilings[grid] = summarise(records, n_boot=1)["macro"]
    return ceilings


def padding_mass(model, processor, images: Sequence[Any], phrases: Sequence[str], batch_size: int = 16
                 ) -> tuple[float, float]:
    """(mean share of the local grounding map's mass on the padding of the model's input square, mean share of the
    square the padding covers). A first number well above the second means the soft regions favour the padding,
    which `heatmap_to_original` then crops away."""
    import numpy as np
    from PIL import Image

    from plan_hf.grounding import grid_heatmaps

    on_padding, padding_area = [], []
    for batch, grids in grid_heatmaps(model, processor, images, phrases, batch_size):  # grids (b, h, w)
        side = batch["pixel_values"].shape[-1]
        for grid, (top, left, height, width) in zip(grids, batch["content_boxes"].tolist()):
            content = np.zeros((side, side), dtype=bool)
            content[top:top + height, left:left + width] = True
            full = np.asarray(Image.fromarray(grid.astype(np.float32)).resize((side, side), Image.Resampling.BILINEAR))
            on_padding.append(float(full[~content].sum() / full.sum()))
            padding_area.append(float(1 - content.mean()))
    return float(np.mean(on_padding)), float(np.mean(padding_area))


INFERENCE_SETTINGS: dict[str, dict[str, Any]] = {
    "as trained": {},
    "no pixel sparsification (keep 1.0)": {"local_region_keep_ratio": 1.0},
    "first stage only": {"local_num_stages": 1},
    "no prior carry": {"local_prior_weight": 0.0},
}


def inference_ablation(model_dir: Path, data_dir: Path, n_boot: int = 200) -> dict[str, dict[str, float]]:
    """Local grounding of one trained model with its inference-time settings changed (the weights stay)."""
    from plan_hf.evaluation import load_model
    from plan_hf.evaluation.data import find_ms_cxr_csv, grounding_items
    from plan_hf.alignment_plan import build_local_alignment
    from plan_hf.evaluation.grounding import evaluate_grounding

    model, processor = load_model(str(model_dir))
    items = grounding_items(find_ms_cxr_csv(data_dir), data_dir, "test")
    on_padding, padding_area = padding_mass(model, processor, [i.image for i in items], [i.phrase for i in items])
    print(f"local map mass on the padding: {on_padding:.3f} (padding covers {padding_area:.3f} of the input)")
    trained = {key: getattr(model.config, key) for change in INFERENCE_SETTINGS.values() for key in change}
    results = {}
    for name, change in INFERENCE_SETTINGS.items():
        for key, value in {**trained, **change}.items():
            setattr(model.config, key, value)
        weights = model.local_alignment.state_dict()  # the module reads its settings when built: build it again
        model.local_alignment = build_local_alignment(model.config)
        model.local_alignment.load_state_dict(weights)
        summary = evaluate_grounding(model, processor, items, ["local"], n_boot=n_boot, progress=False).metrics["local"]
        results[name] = {**summary["macro"], "same_image_map_correlation": summary["same_image_map_correlation"]}
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
    results["padding"] = {"map_mass_on_padding": on_padding, "padding_area": padding_area}
    return results


def _cell(metrics: dict[str, Any], path: list[str], ci: bool = True) -> str:
    node: Any = metrics
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return "n/a"
        node = node[key]
    if not isinstance(node, (int, float)):
        return "n/a" if node is None else str(node)
    text = f"{node:.3f}"
    if ci:
        parent = metrics
        for key in path[:-2] if path[-2] == "macro" else path[:-1]:
            parent = parent[key]
        interval = parent.get("ci", {}).get(path[-1])
        if interval and interval.get("low") is not None:
            text += f" [{interval['low']:.2f}, {interval['high']:.2f}]"
    return text


def comparison_markdown(results: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    lines = [
        "## Quality: objective variants on the synthetic benchmark (same budget)", "",
        f"Synthetic set ({settings.get('benchmark')}): {settings['num_images']} studies at {settings['image_size']} "
        "px (seed 0); every variant "
        f"trains {settings['steps']} steps of batch {TRAINING['micro_batch_size']} with `python -m training.pretrain` "
        f"(tiny towers from `plan_hf.tiny`, lr {TRAINING['learning_rate']}, seed {TRAINING['seed']}, "
        f"{settings['threads']} CPU thread) and is evaluated on the test split with `python -m eval.run --suite "
        "synthetic` (95% bootstrap intervals over phrases / images / queries).", "",
        "Grounding (macro over categories): `local` = the model's word-pixel map (`get_grounding_maps`); `global` = "
        "dense similarity of the phrase's global embedding with each projected pixel of the last grid (the fair "
        "baseline for a model without a local objective). Laterality: share of one-sided findings whose map holds "
        "more mass on the finding's half of the image (chance 0.5).", "",
        "| variant | objective | train min | final global loss | local: pointing | local: CNR | local: mIoU "
        "| local: laterality | local: same-image corr. | global: pointing | global: CNR | global: laterality "
        "| chance pointing |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["metrics"]
        lines.append(
            f"| {r['name']} | {r['description']} | {r['train_seconds'] / 60:.1f} | "
            f"{_cell(r['final_losses'], ['loss_global'], ci=False)} | "
            f"{_cell(m, ['grounding', 'local', 'macro', 'pointing'])} | {_cell(m, ['grounding', 'local', 'macro', 'cnr'])} | "
            f"{_cell(m, ['grounding', 'local', 'macro', 'miou'])} | "
            f"{_cell(m, ['grounding', 'local', 'macro', 'side'])} | "
            f"{_cell(m, ['grounding', 'local', 'same_image_map_correlation'], ci=False)} | "
            f"{_cell(m, ['grounding', 'global', 'macro', 'pointing'])} | "
            f"{_cell(m, ['grounding', 'global', 'macro', 'cnr'])} | "
            f"{_cell(m, ['grounding', 'global', 'macro', 'side'])} | "
            f"{_cell(m, ['grounding', 'local', 'chance_pointing'], ci=False)} |")
    if settings.get("ceilings"):
        lines += ["", "Ceiling of each grounding metric at a feature-grid resolution (the box mask averaged onto the grid "
                  "and mapped back like a model's map; no model involved):", "",
                  "| grid | pointing game | CNR | mIoU |", "|---|---|---|---|"]
        for grid, macro in settings["ceilings"].items():
            lines.append(f"| {grid}x{grid} | {macro['pointing']:.3f} | {macro['cnr']:.3f} | {macro['miou']:.3f} |")
    lines += ["", "| variant | zero-shot 5-class ACC | 5-class macro AUC | binary macro AUC | i2t R@1 | i2t R@10 "
                  "| t2i R@10 | class P@5 (i2t) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["metrics"]
        lines.append(
            f"| {r['name']} | {_cell(m, ['zero_shot', 'multiclass', 'accuracy'])} | "
            f"{_cell(m, ['zero_shot', 'multiclass', 'macro_auc'])} | "
            f"{_cell(m, ['zero_shot', 'binary', 'macro', 'auc'], ci=False)} | "
            f"{_cell(m, ['retrieval', 'i2t_recall@1'])} | {_cell(m, ['retrieval', 'i2t_recall@10'])} | "
            f"{_cell(m, ['retrieval', 't2i_recall@10'])} | {_cell(m, ['class_retrieval', 'i2t_precision@5'])} |")
    if any("probe" in r for r in results):
        lines += ["", f"Linear probe of each vision tower (frozen, a linear head trained {settings['probe_steps']} "
                      "steps on every training image, the 5 CheXpert-style synthetic labels, multi-label; test split; accuracy "
                      "at p = 0.5 is in each probe's metrics.json but is the all-negative base rate here):",
                  "", "| vision tower | macro AUC |", "|---|---|"]
        rows = [(r["name"], r["probe"]) for r in results if "probe" in r]
        if settings.get("random_probe"):
            rows.append(("random init (same config, no pre-training)", settings["random_probe"]))
        for name, probe in rows:
            lines.append(f"| {name} | {_cell(probe, ['macro_auc'], ci=False)} |")
    lines += ["", "Commands (`python` = the project's environment):", "", "```", settings["command"]]
    for r in results:
        lines += [" ".join(r["train_command"]), " ".join(r["eval_command"])]
        if "probe" in r:
            lines.append(" ".join(r["probe"]["command"]))
    if settings.get("random_probe"):
        lines.append(" ".join(settings["random_probe"]["command"]))
    lines += ["```", ""]
    return "\n".join(lines).replace(sys.executable + " ", "python ")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--data", type=Path, default=None, help="synthetic set (default: <out>/data, written once)")
    parser.add_argument("--num-images", type=int, default=2400)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest on a shared CPU)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--skip-existing", action="store_true", help="reuse variants already evaluated in --out")
    parser.add_argument("--re-evaluate", action="store_true",
                        help="with --skip-existing: evaluate the existing variants' exports again (after the "
                             "evaluation changed), without training them again")
    parser.add_argument("--probe-steps", type=int, default=300,
                        help="linear-probe steps per variant (and for a random tower); 0: no linear probe")
    parser.add_argument("--inference-ablation", metavar="VARIANT", default=None,
                        help="only re-score VARIANT's local grounding with inference-time settings changed")
    args = parser.parse_args(argv)
    if args.inference_ablation is not None:
        os.environ.update(_environment(args.threads))
        results = inference_ablation(args.out / args.inference_ablation / "train" / "model",
                                     args.data or args.out / "data")
        (args.out / args.inference_ablation / "inference_ablation.json").write_text(json.dumps(results, indent=2))
        return [results]

    env = _environment(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data or args.out / "data"
    ensure_data(data_dir, args.num_images, args.image_size, env)
    from plan_hf.data.synthetic import benchmark_of
    from plan_hf.evaluation.runner import metrics_benchmark, require_same_benchmark

    benchmark = benchmark_of(data_dir)
    config_path = args.out / "train.yaml"
    config_path.write_text(yaml.safe_dump({"data_dir": str(data_dir), "image_size": args.image_size, **TRAINING,
                                           "model": MODEL}, sort_keys=False))
    results = []
    for spec in args.variants:
        variant = Variant.parse(spec)
        run_dir = args.out / variant.name
        result_path = run_dir / "result.json"
        if args.skip_existing and result_path.is_file():
            result = json.loads(result_path.read_text())
            # A run trained or evaluated on another benchmark version is never re-used beside this set's numbers.
            require_same_benchmark({f"{run_dir} (trained on)": result.get("benchmark", metrics_benchmark(
                result["metrics"])), f"--data {data_dir}": benchmark})
            if args.re_evaluate:
                result["eval_seconds"] = _run(result["eval_command"], run_dir / "eval.log", env)
                result["metrics"] = json.loads((run_dir / "eval" / "metrics.json").read_text())
                result_path.write_text(json.dumps(result, indent=2))
            if args.probe_steps and "probe" not in result:
                result["probe"] = run_probe(run_dir / "train" / "model", run_dir / "train" / "model", data_dir,
                                            run_dir / "probe", args.probe_steps, env)
                result_path.write_text(json.dumps(result, indent=2))
            results.append(result)
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        train = train_command(variant, config_path, run_dir / "train", args.steps)
        train_seconds = _run(train, run_dir / "train.log", env)
        evaluate = eval_command(run_dir / "train" / "model", data_dir, run_dir / "eval", args.eval_batch_size)
        eval_seconds = _run(evaluate, run_dir / "eval.log", env)
        result = {"name": variant.name, "description": variant.describe(), "benchmark": benchmark,
                  "train_seconds": train_seconds,
                  "eval_seconds": eval_seconds, "train_command": train, "eval_command": evaluate,
                  "final_losses": final_losses(run_dir / "train"),
                  "metrics": json.loads((run_dir / "eval" / "metrics.json").read_text())}
        if args.probe_steps:
            result["probe"] = run_probe(run_dir / "train" / "model", run_dir / "train" / "model", data_dir,
                                        run_dir / "probe", args.probe_steps, env)
        result_path.write_text(json.dumps(result, indent=2))
        results.append(result)
        print(f"{variant.name}: trained {train_seconds / 60:.1f} min, evaluated {eval_seconds:.0f} s", flush=True)

    random_probe = None
    if args.probe_steps and results:
        random_path = args.out / "random_probe.json"
        if args.skip_existing and random_path.is_file():
            random_probe = json.loads(random_path.read_text())
        else:
            first_export = args.out / Variant.parse(args.variants[0]).name / "train" / "model"
            random_probe = run_probe(None, first_export, data_dir, args.out / "random_probe", args.probe_steps, env)
            random_path.write_text(json.dumps(random_probe, indent=2))
    ceilings = grid_ceilings(data_dir, args.image_size, [args.image_size // 32, args.image_size // 16])
    settings = {"num_images": args.num_images, "image_size": args.image_size, "steps": args.steps, "ceilings": ceilings,
                "benchmark": benchmark,
                "threads": args.threads, "random_probe": random_probe, "probe_steps": args.probe_steps,
                "command": "python -m benchmarks.bench_quality " + " ".join(
                    sys.argv[1:] if argv is None else argv)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    markdown = comparison_markdown(results, settings)
    (args.out / "QUALITY.md").write_text(markdown)
    if args.markdown is not None:
        args.markdown.write_text(markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
