"""The package's figures on one GPU, from one command (about 8 minutes on one H100/H200):

    python -m benchmarks.gpu_check --out runs/gpu_check
    python -m benchmarks.gpu_check --out /tmp/gpu_check --dry-run    # every section at tiny sizes on the CPU

Sections, each a function; one that fails is recorded (error and traceback) and the others still run:

  local_loss   the PLAN local loss alone at B=128, M=48, N=196: forward + backward time and peak memory
  profile      torch.profiler of one PLAN 3-stage step (ResNet-50 + BERT-base, B=64): the top ops, the host-device
               syncs (cudaStreamSynchronize, aten::item, aten::nonzero, ...) and where they come from, and the time
               of the sort that top-mass sparsification (`losses_plan.soft_regions`) runs
  steps_resnet bf16 images/s, peak memory and MFU of a training step (AdamW included) of ResNet-50 + BERT-base at
               224 px (14 x 14 local grid), global-only vs PLAN 3 stages vs PLACE (`plan_hf.presets`), at B=64 and
               at the largest batch that fits (doubling from 64 until out of memory)
  steps_vit    the same for ViT-B/16 + BERT-base (its 14 x 14 patch grid)
  pretrain     3 minutes of `plan-pretrain` with the shipped demo config on the GPU (bf16): first vs last
               logged loss, samples/s, and the share of the loop's time spent waiting for the next batch

MFU = FLOPs of one step (torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions, attention) / (step time x
the device's dense bf16 peak); the peak comes from `benchmarks.common.PEAK_BF16_TFLOPS` (H100, H200, A100) or
`--peak-tflops`. Towers are built from transformers' default configs (BertConfig, ResNetConfig, ViTConfig: the
real architectures, randomly initialised; nothing is downloaded).

Writes <out>/gpu_check.json and <out>/gpu_check.md after every section, so a run that is cut short keeps what it
measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections import Counter
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

from benchmarks.common import (
    PRESETS,
    PeakMemory,
    build_models,
    device_peak_tflops,
    largest_batch,
    local_inputs,
    make_batch,
    measure_step,
    runs_without_oom,
    synchronize,
    timed,
    train_step,
)
from plan_hf import PlanConfig
from plan_hf.alignment_plan import PlanLocalAlignment
from plan_hf.presets import preset_kwargs
from plan_hf.tiny import tiny_text_config, tiny_vision_config
from plan_hf.training.loop import Pretrainer

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "demo"  # the shipped pre-training config of the CPU demo (plan_hf/cli/configs/demo.yaml)

VARIANTS = {
    "global-only": preset_kwargs("global"),
    "PLAN 3 stages": preset_kwargs("plan", local_num_stages=3),
    "PLACE": preset_kwargs("place"),
}
# Host-device synchronisation: the aten ops that read a device value on the host (item; nonzero, whose output size
# depends on the data; boolean-mask indexing runs it), and the CUDA runtime calls that block the host.
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


@dataclasses.dataclass(frozen=True)
class Towers:
    """A text + vision tower pair and the geometry of its batches."""

    text: dict
    vision: dict
    image_size: int
    seq_len: int
    local_layer: int  # vision hidden_states index of the local pixel grid
    projection_dim: int


@dataclasses.dataclass(frozen=True)
class Sizes:
    towers: dict[str, Towers]
    batch: int = 64
    max_batch: int = 4096  # the doubling search stops here
    words: int = 48  # content words per report (M)
    warmup: int = 3
    repeats: int = 10
    loss_shape: tuple[int, int, int] = (128, 48, 196)  # (B, M, N) of the local loss alone
    pretrain_seconds: float = 180.0
    pretrain_overrides: list[str] = dataclasses.field(default_factory=list)


FULL = Sizes(
    towers={
        # ResNet-50 stage 3 (stride 16) gives the 14 x 14 grid the pre-training configs use (mimic_cxr.yaml)
        "ResNet-50 + BERT-base": Towers(*PRESETS["base"][:2], 224, 128, local_layer=-2, projection_dim=512),
        "ViT-B/16 + BERT-base": Towers(*PRESETS["vit-base"][:2], 224, 128, local_layer=-1, projection_dim=512),
    },
    # The step count is the cosine schedule's horizon; the clock (pretrain_seconds) usually ends the run first.
    pretrain_overrides=["--synthetic_num_images", "1000", "--synthetic_image_size", "224", "--max_steps", "6000",
                        "--num_workers", "8"],
)
DRY_RUN = Sizes(
    towers={
        "tiny ResNet + BERT": Towers(tiny_text_config(vocab_size=500), tiny_vision_config("resnet", width=8), 64, 32,
                                     local_layer=-2, projection_dim=32),
        "tiny ViT + BERT": Towers(tiny_text_config(vocab_size=500), tiny_vision_config("vit", width=8, image_size=64),
                                  64, 32, local_layer=-1, projection_dim=32),
    },
    batch=4, max_batch=8, words=8, warmup=0, repeats=1, loss_shape=(8, 8, 16), pretrain_seconds=math.inf,
    pretrain_overrides=["--synthetic_num_images", "24", "--synthetic_image_size", "64", "--max_steps", "3",
                        "--micro_batch_size", "4", "--log_every_steps", "1", "--local_warmup_steps", "1"],
)


@dataclasses.dataclass
class Context:
    sizes: Sizes
    device: torch.device
    peak_tflops: float | None
    out: Path

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# Training steps: images/s, peak memory, MFU at B=64 and at the largest batch
# ----------------------------------------------------------------------------------------------------------------------
def build_variant(towers: Towers, variant: str, device: torch.device):
    return build_models(towers.text, towers.vision, towers.local_layer, towers.projection_dim, device,
                        {variant: VARIANTS[variant]})[variant]


def steps_section(ctx: Context, index: int) -> dict:
    """Each variant of the `index`-th tower pair at the base batch, then the doubling search and the same figures
    at the largest batch."""
    sizes = ctx.sizes
    towers_name, towers = list(sizes.towers.items())[index]
    rows, errors = [], {}
    for variant in VARIANTS:
        model = None
        try:
            model = build_variant(towers, variant, ctx.device)
            vocab = model.config.text_config.vocab_size

            def batch_of(size: int) -> dict:
                return make_batch(size, towers.seq_len, towers.image_size, vocab, sizes.words, ctx.device)

            row = measure_step(model, batch_of(sizes.batch), ctx.device, ctx.autocast(), sizes.warmup, sizes.repeats,
                               ctx.peak_tflops)
            rows.append({"variant": variant, "at": "base", **row})
            print(f"{towers_name}, {variant}, B={sizes.batch}: {row['images_per_s']:.1f} img/s", flush=True)

            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)  # its state counts against the memory

            failures: list[str] = []

            def fits(size: int) -> bool:
                return runs_without_oom(train_step(model, batch_of(size), ctx.autocast(), optimizer), model, failures)

            largest, capped = largest_batch(fits, sizes.batch, cap=sizes.max_batch, bisect=False)
            del optimizer
            free_memory()
            if largest > sizes.batch:
                row = measure_step(model, batch_of(largest), ctx.device, ctx.autocast(), min(1, sizes.warmup),
                                   max(1, sizes.repeats // 3), ctx.peak_tflops)
            if largest < sizes.batch:  # B fitted without the search's optimizer state, or memory got fragmented
                raise RuntimeError(f"the search found no batch of at least {sizes.batch} that fits: {failures}")
            rows.append({"variant": variant, "at": "largest", "capped": capped,
                         "stopped_by": failures[-1] if failures else None, **row})
            print(f"{towers_name}, {variant}: largest batch {largest}{' (the cap)' if capped else ''}", flush=True)
        except Exception as error:  # one variant failing (e.g. out of memory at B=64) leaves the others' figures
            errors[variant] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        finally:
            del model
            free_memory()
    base = {row["variant"]: row["step_s"] for row in rows if row["at"] == "base"}
    for row in rows:
        if row["at"] == "base" and "global-only" in base:
            row["ratio_to_global"] = row["step_s"] / base["global-only"]
    if not rows:
        raise RuntimeError(f"every variant failed: {errors}")
    return {"towers": towers_name, "image_size": towers.image_size, "seq_len": towers.seq_len,
            "words": sizes.words, "rows": rows, "errors": errors}


# ----------------------------------------------------------------------------------------------------------------------
# The PLAN local loss alone
# ----------------------------------------------------------------------------------------------------------------------
def local_loss_section(ctx: Context) -> dict:
    batch, words, pixels = ctx.sizes.loss_shape
    config = PlanConfig(projection_dim=next(iter(ctx.sizes.towers.values())).projection_dim)
    w, mask, p, _, _ = local_inputs(batch, words, pixels, config.local_projection_dim, device=ctx.device)
    alignment = PlanLocalAlignment(config).to(ctx.device)  # the model's own module: its gate, scale and stages
    features = SimpleNamespace(words=w, word_mask=mask, pixels=p, pixel_mask=None, word_sentences=None)

    def run():
        with ctx.autocast():
            loss = alignment(features).loss
        loss.backward()
        w.grad = p.grad = None

    for _ in range(ctx.sizes.warmup):
        run()
    with PeakMemory(ctx.device) as peak:
        run()
    seconds = statistics.median(timed(run, ctx.device) for _ in range(ctx.sizes.repeats))
    return {"batch": batch, "words": words, "pixels": pixels, "dim": config.local_projection_dim,
            "stages": config.local_num_stages, "chunk_size": alignment.chunk_size,
            "fwd_bwd_ms": seconds * 1e3, "peak_gib": peak.gib}


# ----------------------------------------------------------------------------------------------------------------------
# torch.profiler of one PLAN step
# ----------------------------------------------------------------------------------------------------------------------
def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _origin(event) -> str:
    """Where the event was called: the innermost Python frame (with the innermost frame of this package, when that is
    another), or the autograd node that ran it in the backward."""
    for parent in _ancestors(event):
        if not parent.is_python_function and "Backward" in parent.name:
            return parent.name
        if parent.is_python_function and not parent.name.startswith("<built-in"):
            frames = [p.name for p in _ancestors(parent) if p.is_python_function]
            own = next((frame for frame in [parent.name, *frames] if "plan_hf/" in frame), None)
            return parent.name if own in (None, parent.name) else f"{parent.name} via {own}"
    return "?"


def profile_section(ctx: Context, top: int = 15) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    towers_name, towers = next(iter(ctx.sizes.towers.items()))
    model = build_variant(towers, "PLAN 3 stages", ctx.device)
    inputs = make_batch(ctx.sizes.batch, towers.seq_len, towers.image_size, model.config.text_config.vocab_size,
                        ctx.sizes.words, ctx.device)
    step = train_step(model, inputs, ctx.autocast())
    for _ in range(max(2, ctx.sizes.warmup)):  # cuDNN's algorithm search and the allocator's growth stay out
        step()
    step_s = timed(step, ctx.device)
    on_gpu = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    for attempt in range(3):
        with profile(activities=activities, with_stack=True) as prof:
            with record_function("plan_step"):
                step()
            synchronize(ctx.device)
        try:
            averages = prof.key_averages()
            events = prof.events()
            break
        except UnicodeDecodeError:  # torch's Python tracer now and then records an event name that is not UTF-8
            if attempt == 2:
                raise
    python_frames = {e.name for e in events if e.is_python_function}  # with_stack's Python events: not ops
    # device time where there is a device; on the CPU the ops' own host time
    self_time = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    total_time = (lambda e: e.device_time_total) if on_gpu else (lambda e: e.cpu_time_total)
    ops = [e for e in averages  # aten ops: not kernels, Python frames or the step's own label
           if e.device_type == DeviceType.CPU and e.key not in python_frames and e.key != "plan_step"]
    ranked = sorted(ops, key=self_time, reverse=True)[:top]
    top_ops = [{"name": e.key, "count": e.count, "self_ms": self_time(e) / 1e3, "total_ms": total_time(e) / 1e3}
               for e in ranked]
    # The step's events by time (the backward runs on autograd's own thread, outside the step's call tree)
    scope = next(e.time_range for e in events if e.name == "plan_step")
    in_step = [e for e in events if scope.start <= e.time_range.start and e.time_range.end <= scope.end]
    syncs = Counter(e.name for e in in_step if e.name in SYNC_OPS + SYNC_CALLS)
    # a sync point: a sync op not inside another (aten::item runs aten::_local_scalar_dense, which runs
    # cudaStreamSynchronize: one point)
    points = [e for e in in_step if e.name in SYNC_OPS and not any(p.name in SYNC_OPS for p in _ancestors(e))]
    origins = Counter(f"{e.name} in {_origin(e)}" for e in points)
    sorts = [e for e in averages if e.key == "aten::sort"]
    sort_ms = sum(total_time(e) for e in sorts) / 1e3
    return {"towers": towers_name, "variant": "PLAN 3 stages", "batch": ctx.sizes.batch,
            "time_base": "device" if on_gpu else "cpu", "step_ms": step_s * 1e3, "top_ops": top_ops,
            "syncs": dict(syncs), "sync_points": len(points),
            "sync_origins": [{"where": where, "count": n} for where, n in origins.most_common(10)],
            "sort_calls": sum(e.count for e in sorts), "sort_ms": sort_ms,
            "sort_share": sort_ms / (step_s * 1e3)}


# ----------------------------------------------------------------------------------------------------------------------
# Pre-training: plan-pretrain with the demo config, on the clock
# ----------------------------------------------------------------------------------------------------------------------
class TimedPretrainer(Pretrainer):
    """The package's Pretrainer, stopped at a deadline, counting the loop's time outside the steps (waiting for the
    data loader's next batch; logging is the rest and is small)."""

    def __init__(self, *args, seconds: float = math.inf, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = seconds
        self.steps_run, self.step_s, self.wait_s, self.loop_s = 0, 0.0, 0.0, 0.0
        self._start = self._last = time.perf_counter()

    def train(self):
        self._start = self._last = time.perf_counter()
        try:
            return super().train()
        finally:  # up to the last step's end (the final checkpoint left out): waits + steps
            self.loop_s = self._last - self._start

    def train_step(self, batch):
        start = time.perf_counter()
        self.wait_s += start - self._last
        terms = super().train_step(batch)
        synchronize(self.accelerator.device)  # the step's device work belongs to the step, not to the next wait
        self._last = time.perf_counter()
        self.step_s += self._last - start
        self.steps_run += 1
        if self._last - self._start >= self.seconds:
            self.total_steps = self.progress.global_step + 1  # the loop counts this step, logs it and stops
        return terms


def pretrain_section(ctx: Context) -> dict:
    import plan_hf.cli.pretrain as pretrain
    from accelerate.state import AcceleratorState, GradientState

    run_dir = ctx.out / "pretrain"
    on_gpu = ctx.device.type == "cuda"
    argv = ["--config", str(DEMO_CONFIG), "--data_dir", str(run_dir / "data"), "--output_dir", str(run_dir / "run"),
            "--cpu", str(not on_gpu).lower(), *(["--mixed_precision", "bf16"] if on_gpu else []),
            "--export", "false", "--log_with", "none", "--progress_bar", "false", "--save_every_steps", "1000000",
            *ctx.sizes.pretrain_overrides]
    trainers: list[TimedPretrainer] = []

    def make_trainer(*args, **kwargs) -> TimedPretrainer:
        trainers.append(TimedPretrainer(*args, seconds=ctx.sizes.pretrain_seconds, **kwargs))
        return trainers[-1]

    start = time.perf_counter()
    try:
        with mock.patch.object(pretrain, "Pretrainer", make_trainer):
            pretrain.main(argv)
    finally:  # accelerate keeps process-wide singletons: a later in-process run builds its own
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    trainer = trainers[0]
    config = trainer.config
    records = [json.loads(line) for line in (run_dir / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    terms = sorted({k for r in logged for k in r if k.startswith("loss") and "stage" not in k})
    first, last = logged[0], logged[-1]
    samples = trainer.steps_run * config.per_process_batch_size
    return {
        "config": DEMO_CONFIG, "argv": argv, "batch": config.per_process_batch_size,
        "image_size": config.image_size, "num_workers": config.num_workers,
        "mixed_precision": config.mixed_precision, "steps": trainer.steps_run,
        "logged_steps": [first["step"], last["step"]], "seconds_total": time.perf_counter() - start,
        "loop_s": trainer.loop_s, "step_s": trainer.step_s, "data_wait_s": trainer.wait_s,
        "data_wait_share": trainer.wait_s / trainer.loop_s, "samples_per_s": samples / trainer.loop_s,
        "first": {k: first[k] for k in terms if k in first}, "last": {k: last[k] for k in terms if k in last},
        # the total grows while the local weight ramps up (the curriculum): read the terms
        "fell": {k: last[k] < first[k] for k in terms if k in first and k in last},
        "local_loss_weight_last": last.get("local_loss_weight"),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Running the sections, writing JSON and markdown
# ----------------------------------------------------------------------------------------------------------------------
SECTIONS = {
    "local_loss": local_loss_section,
    "profile": profile_section,
    "steps_resnet": partial(steps_section, index=0),
    "steps_vit": partial(steps_section, index=1),
    "pretrain": pretrain_section,
}


def run_section(name: str, ctx: Context) -> dict:
    start = time.perf_counter()
    try:
        result = SECTIONS[name](ctx)
        return {"ok": True, "seconds": time.perf_counter() - start, "result": result}
    except Exception as error:  # recorded; the next section runs
        traceback.print_exc()
        return {"ok": False, "seconds": time.perf_counter() - start, "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()}
    finally:
        free_memory()


def _f(value, digits: int = 1, scale: float = 1.0) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * scale:.{digits}f}"


def render_markdown(results: dict) -> str:
    lines = [f"# GPU check: {results['device_name']}", "",
             f"`{results['command']}` — torch {results['torch']}, bf16 autocast, "
             f"peak {_f(results['peak_tflops'], 0)} TFLOP/s ({results['peak_source']}), "
             f"{results['total_s']:.0f} s in all.", ""]
    sections = results["sections"]
    for name, section in sections.items():
        lines += [f"## {name}", ""]
        if not section["ok"]:
            lines += [f"**failed** after {section['seconds']:.0f} s: `{section['error']}`", ""]
            continue
        r = section["result"]
        if name.startswith("steps"):
            lines += [f"{r['towers']}, {r['image_size']} px, L={r['seq_len']}, M={r['words']}; a step with AdamW.", "",
                      "| variant | B | img/s | ms/step | × global-only | peak GiB | TFLOP/step | MFU |",
                      "|---|---|---|---|---|---|---|---|"]
            for row in r["rows"]:
                batch = f"{row['batch']}" + (" (largest)" if row["at"] == "largest" else "") + \
                    (" = cap" if row.get("capped") else "")
                lines.append(f"| {row['variant']} | {batch} | {_f(row['images_per_s'])} | {_f(row['step_s'], 1, 1e3)} "
                             f"| {_f(row.get('ratio_to_global'), 2)} | {_f(row['peak_gib'], 2)} "
                             f"| {row['tflops_per_step']:.3g} | {_f(row['mfu'], 1, 100)}{'' if row['mfu'] is None else ' %'} |")
            notes = [f"- {row['variant']}: B={2 * row['batch']} did not fit: `{row['stopped_by']}`"
                     for row in r["rows"] if row.get("stopped_by")]
            notes += [f"- {variant} failed: `{error}`" for variant, error in r["errors"].items()]
            lines += [""] + notes if notes else []
        elif name == "local_loss":
            lines += [f"PLAN local loss alone, B={r['batch']} M={r['words']} N={r['pixels']} d={r['dim']}, "
                      f"{r['stages']} stages, chunk {r['chunk_size']}: forward + backward **{_f(r['fwd_bwd_ms'])} ms**, "
                      f"peak {_f(r['peak_gib'], 2)} GiB."]
        elif name == "profile":
            lines += [f"One {r['variant']} step of {r['towers']}, B={r['batch']}: {_f(r['step_ms'])} ms. "
                      f"Host-device sync points: {r['sync_points']} "
                      f"({', '.join(f'{k} {v}' for k, v in r['syncs'].items()) or 'none'}). "
                      f"Top-mass sort (aten::sort): {r['sort_calls']} calls, {_f(r['sort_ms'], 2)} ms "
                      f"({_f(r['sort_share'], 1, 100)} % of the step).", "",
                      f"| op | calls | self ms ({r['time_base']}) | total ms |", "|---|---|---|---|"]
            lines += [f"| `{op['name']}` | {op['count']} | {_f(op['self_ms'], 2)} | {_f(op['total_ms'], 2)} |"
                      for op in r["top_ops"]]
            if r["sync_origins"]:
                lines += ["", "Where the sync points are:", ""]
                lines += [f"- {o['count']} × `{o['where']}`" for o in r["sync_origins"]]
        elif name == "pretrain":
            lines += [f"`training.pretrain` with `{r['config']}` ({r['mixed_precision']}, batch {r['batch']}, "
                      f"{r['image_size']} px, {r['num_workers']} loader workers): {r['steps']} steps in "
                      f"{_f(r['loop_s'], 0)} s, **{_f(r['samples_per_s'])} samples/s**, "
                      f"**{_f(r['data_wait_share'], 1, 100)} %** of the loop waiting for data.", "",
                      f"| term | first logged (step {r['logged_steps'][0]}) | last logged (step {r['logged_steps'][1]}) |",
                      "|---|---|---|"]
            lines += [f"| {k} | {_f(r['first'].get(k), 3)} | {_f(v, 3)} |" for k, v in r["last"].items()]
        lines.append("")
    return "\n".join(lines)


def write_outputs(results: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    (out / "gpu_check.md").write_text(render_markdown(results))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (seconds): checks the script")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --dry-run)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak; default: looked up by the GPU's name")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--pretrain-seconds", type=float, default=None, help="default: 180 (dry run: a few steps)")
    args = parser.parse_args(argv)
    sizes = DRY_RUN if args.dry_run else FULL
    if args.pretrain_seconds is not None:
        sizes = dataclasses.replace(sizes, pretrain_seconds=args.pretrain_seconds)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    peak = args.peak_tflops if args.peak_tflops is not None else device_peak_tflops(device)
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(sizes=sizes, device=device, peak_tflops=peak, out=args.out)
    results = {
        "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
        "dry_run": args.dry_run, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        "peak_tflops": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops is not None else
        ("PEAK_BF16_TFLOPS" if peak is not None else "unknown: no MFU"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
        "sections": {}, "total_s": 0.0,
    }
    start = time.perf_counter()
    for name in args.sections:
        print(f"--- {name}", flush=True)
        results["sections"][name] = run_section(name, ctx)
        results["total_s"] = time.perf_counter() - start
        write_outputs(results, args.out)
        print(f"--- {name}: {'ok' if results['sections'][name]['ok'] else 'FAILED'} "
              f"({results['sections'][name]['seconds']:.0f} s)", flush=True)
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
