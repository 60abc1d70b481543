"""`make demo`: the synthetic CXR set -> PLAN pre-trained on the CPU from the offline pretrained towers, a global-only
baseline with the same budget, the supervised ceiling -> evaluation -> a report folder.

    plan-demo --output_dir demo_out [--synthetic_num_images 1000] [--epochs 3] [--threads N] [--quick]

(`python -m training.demo` from a checkout.) Writes under --output_dir: data/ (the synthetic set), run/ (PLAN's
checkpoints, logs/metrics.jsonl, the Hub-ready model/), run_global/ (the global-only baseline: the same towers, data,
steps and seed), ceiling/ (a segmentation model trained on the set's lesion masks from the same ImageNet tower),
report/ and report_global/ (metrics.json, report.md and heat-map PNGs of plan-eval's synthetic suite) and README.md
(the grounding table with both ceilings, PLAN against global-only, how long each part took, where to look).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .arguments import RunArguments, console_script, parse

RENAMED = {"out": "output_dir", "num_images": "synthetic_num_images", "image_size": "synthetic_image_size"}
# (label, metrics.json of which evaluation, grounding row)
GROUNDING_ROWS = (
    ("PLAN: local map (word-pixel alignment)", "plan", "local"),
    ("PLAN: global-embedding map", "plan", "global"),
    ("global-only model: global-embedding map", "global", "global"),
    ("position prior (mean training box per category)", "plan", "position_prior"),
    ("position prior + location words", "plan", "position_prior_words"),
    ("supervised ceiling (segmentation on the lesion masks)", "plan", "supervised_ceiling"),
    ("grid ceiling (true boxes on the 14x14 grid)", "plan", "grid_ceiling"),
)
GROUNDING_METRICS = ("pointing", "cnr", "signed_cnr", "miou")


@dataclass(kw_only=True)
class DemoArguments(RunArguments):
    output_dir: str = "demo_out"
    seed: int = 42  # the pre-training's (the synthetic set has its own, fixed)
    synthetic_num_images: int = 1000  # synthetic studies (80% train)
    synthetic_image_size: int = 224  # synthetic images' nominal size
    epochs: int | None = None  # override demo.yaml's epochs (both models)
    baseline: bool = True  # pre-train the global-only model with the same budget, for the comparison
    ceiling_steps: int = 150  # the supervised ceiling's training steps (0: no ceiling row)
    quick: bool = False  # a minute-long check of the whole pipeline


def loss_curve(log_path: Path) -> list[dict]:
    return [r for r in map(json.loads, log_path.read_text().splitlines()) if "loss" in r]


def _cell(summary: dict[str, Any], name: str) -> str:
    from ..evaluation.report import number, with_interval

    value = summary["macro"].get(name)
    interval = summary.get("ci", {}).get(name)
    return with_interval(value, interval, 3) if interval else number(value)


def grounding_table(evaluations: dict[str, dict[str, Any]]) -> list[str]:
    """The demo's grounding rows (model maps, priors, both ceilings) as a markdown table, 95% bootstrap intervals."""
    lines = ["| map | " + " | ".join(GROUNDING_METRICS) + " |", "|---|" + "---|" * len(GROUNDING_METRICS)]
    chance = None
    for label, evaluation, row in GROUNDING_ROWS:
        summary = evaluations.get(evaluation, {}).get("grounding", {}).get(row)
        if summary is None:
            continue
        chance = summary.get("chance_pointing", chance)
        lines.append(f"| {label} | " + " | ".join(_cell(summary, m) for m in GROUNDING_METRICS) + " |")
    if chance is not None:
        lines.append(f"| chance (a random point) | {chance:.3f} | | | |")
    return lines


def comparison(evaluations: dict[str, dict[str, Any]]) -> list[str]:
    """PLAN's local map against the global-only model's map, and both models' zero-shot and retrieval."""
    if "global" not in evaluations:
        return ["(no global-only baseline was trained: `--baseline false`)"]
    plan, base = evaluations["plan"], evaluations["global"]
    local, baseline = plan["grounding"]["local"], base["grounding"]["global"]
    lines = []
    for name in ("pointing", "signed_cnr"):
        a, b = local["macro"][name], baseline["macro"][name]
        low_a, high_b = local["ci"][name]["low"], baseline["ci"][name]["high"]
        low_b, high_a = baseline["ci"][name]["low"], local["ci"][name]["high"]
        verdict = ("the 95% intervals do not overlap" if low_a > high_b or low_b > high_a
                   else "the 95% intervals overlap: not a difference this test set can show")
        lines.append(f"- {name}: PLAN's local map {a:.3f}, the global-only model's map {b:.3f}: "
                     f"{a - b:+.3f} ({a / b:.1f}x; {verdict})." if b > 0 else
                     f"- {name}: PLAN's local map {a:.3f}, the global-only model's map {b:.3f} ({verdict}).")
    lines += ["", "| model | zero-shot ACC | zero-shot AUC | image->report R@10 | report->image R@10 |",
              "|---|---|---|---|---|"]
    for label, metrics in (("PLAN", plan), ("global-only", base)):
        zero_shot, retrieval = metrics["zero_shot"]["multiclass"], metrics["retrieval"]
        lines.append(f"| {label} | {zero_shot['accuracy']:.3f} | {zero_shot['macro_auc']:.3f} | "
                     f"{retrieval['i2t_recall@10']:.3f} | {retrieval['t2i_recall@10']:.3f} |")
    return lines


def write_summary(out: Path, timings: dict, evaluations: dict[str, dict[str, Any]], ceiling_steps: int) -> Path:
    curve = loss_curve(out / "run" / "logs" / "metrics.jsonl")
    first, last = curve[0], curve[-1]
    terms = [k for k in last if (k.startswith("loss") and "stage" not in k) or k == "local_loss_weight"]
    pngs = sorted(p.relative_to(out) for p in out.glob("report*/*.png"))
    lines = [
        "# plan-hf demo",
        "",
        f"PLAN pre-trained for {last['step']} steps on {timings['num_train_samples']} synthetic chest X-rays + "
        "reports on the CPU, from two pretrained towers that install offline: MiniLM (sentence-transformers/"
        "all-MiniLM-L6-v2, first 3 of 6 layers) and the ImageNet MobileNetV2 (its stride-16 stage as a 14x14 pixel "
        "grid at 224 px); augmentation on. Beside it a global-only model with the same towers, data, steps and seed, "
        "and a supervised ceiling; all scored on the same test phrases by plan-eval's synthetic suite.",
        "",
        "## Phrase grounding",
        "",
        "Pointing game (the map's peak inside a true box), CNR (|mean in - mean out| / pooled std, the field's), "
        "signed CNR (mean in - mean out, negative when the map avoids the boxes) and mIoU; macro over the finding "
        "categories, 95% bootstrap intervals over the test images. The position priors and the grid ceiling need "
        f"no training; the supervised ceiling is a segmentation model trained for {ceiling_steps} steps on the "
        "set's lesion masks from the same ImageNet tower (a ceiling only once converged: quote it with its budget).",
        "",
        *grounding_table(evaluations),
        "",
        "**PLAN against global-only** (the same test phrases):",
        "",
        *comparison(evaluations),
        "",
        "## Time",
        "",
        f"Wall-clock seconds of each part, and the CPU seconds of the whole demo on {os.cpu_count()} cores "
        f"({torch.get_num_threads()} torch threads):",
        "",
        "| part | seconds |",
        "|---|---|",
        *[f"| {k.removesuffix('_s')} | {v:.0f} |" for k, v in timings.items() if k.endswith("_s")],
        "",
        "## PLAN's training",
        "",
        "| term | first logged | last logged |",
        "|---|---|---|",
        *[f"| {k} | {first.get(k, float('nan')):.3f} | {last[k]:.3f} |" for k in terms],
        "",
        f"{last['step']} steps, {last['samples_per_second']:.1f} samples/s at the end. Every step's terms: "
        "`run/logs/metrics.jsonl` (and TensorBoard: `tensorboard --logdir run/logs`).",
        "",
        "## Evaluation",
        "",
        "By plan-eval (synthetic suite): `report/metrics.json`, `report/report.md` (PLAN), `report_global/` "
        "(global-only).",
        "",
        "Pictures (heat maps: a phrase's soft region over the original image, ground-truth boxes in green):",
        "",
        *[f"- `{p}`" for p in pngs[:20]],
        "",
        "## The model",
        "",
        "`run/model` is a Hub-ready folder (weights, code for `trust_remote_code`, processor, model card `README.md`):",
        "",
        "```python",
        "from transformers import AutoModel, AutoProcessor",
        f"model = AutoModel.from_pretrained('{out / 'run' / 'model'}', trust_remote_code=True)",
        "```",
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> Path:
    """Run the demo with the arguments `argv` (None: the command line); returns the summary README's path."""
    if argv is None and "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP reads this when torch loads, which importing plan_hf already did: start again with it set. Waiting
        # threads then sleep instead of spinning; on cores shared with other work, spinning made small CPU
        # convolutions several times slower than one thread.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "plan_hf.cli.demo", *sys.argv[1:]])
    args = parse(DemoArguments, argv, prog="plan-demo", description=__doc__.split("\n\n")[0], renamed=RENAMED)
    out = Path(args.output_dir).resolve()
    if args.quick:
        args.synthetic_num_images, args.epochs = 80, args.epochs or 1
        args.ceiling_steps = min(args.ceiling_steps, 2)
    timings: dict = {}
    start = time.perf_counter()

    from ..data.synthetic import generate_synthetic
    from ..evaluation.ceiling import train_ceiling
    from ..hub import write_model_card
    from ..towers import offline_plan_model
    from .eval import main as evaluate
    from .pretrain import main as pretrain

    data_dir = out / "data"
    if not (data_dir / "findings.jsonl").exists():
        generate_synthetic(data_dir, args.synthetic_num_images, seed=0, image_size=args.synthetic_image_size)
    timings["synthetic_data_s"] = time.perf_counter() - start

    common = ["--config", "demo", "--data_dir", str(data_dir), "--seed", str(args.seed)]
    if args.epochs is not None:
        common += ["--epochs", str(args.epochs)]
    if args.quick:
        common += ["--micro_batch_size", "16", "--save_every_steps", "1000"]
    models = {"plan": ("run", [])}
    if args.baseline:
        models["global"] = ("run_global", ["--preset", "global"])
    model_dirs = {}
    for name, (folder, extra) in models.items():
        step = time.perf_counter()
        model_dirs[name] = pretrain([*common, "--output_dir", str(out / folder), *extra])
        timings[f"pretraining_{name}_s"] = time.perf_counter() - step
    settings = json.loads((model_dirs["plan"] / "plan_training_config.json").read_text())
    timings["num_train_samples"] = settings["num_train_samples"]

    ceiling_dir = None
    if args.ceiling_steps > 0:
        step = time.perf_counter()
        init = out / "ceiling" / "init"  # the untrained towers: the ceiling starts from the same ImageNet weights
        if not (init / "config.json").is_file():
            model, processor = offline_plan_model(image_size=settings["image_size"])
            model.save_pretrained(init)
            processor.save_pretrained(init)
        ceiling_dir = out / "ceiling"
        train_ceiling(data_dir, ceiling_dir, args.ceiling_steps, model=str(init), config=None, head_dim=32,
                      seed=args.seed)
        timings["supervised_ceiling_s"] = time.perf_counter() - step

    evaluations = {}
    for name, model_dir in model_dirs.items():
        step = time.perf_counter()
        report_dir = out / ("report" if name == "plan" else f"report_{name}")
        command = ["--model_name_or_path", str(model_dir), "--suite", "synthetic", "--data_dir", str(data_dir),
                   "--output_dir", str(report_dir), "--n_boot", "200"]
        if ceiling_dir is not None and name == "plan":
            command += ["--supervised_ceiling", str(ceiling_dir)]
        evaluate(command)
        write_model_card(model_dir, report_dir / "metrics.json")  # the card gets the results table
        evaluations[name] = json.loads((report_dir / "metrics.json").read_text())
        timings[f"evaluation_{name}_s"] = time.perf_counter() - step
    timings["total_s"] = time.perf_counter() - start
    cpu = os.times()  # CPU seconds of this process and its workers: what the run costs on an idle machine
    timings["cpu_time_s"] = cpu.user + cpu.system + cpu.children_user + cpu.children_system
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    summary = write_summary(out, timings, evaluations, args.ceiling_steps)
    print(f"demo done in {timings['total_s'] / 60:.1f} min: {summary}")
    return summary


cli = console_script(main)

if __name__ == "__main__":
    main()
