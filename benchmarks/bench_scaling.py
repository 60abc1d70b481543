"""How PLAN's step time, peak memory and FLOPs grow with batch B, words M and pixel grid N, against the global-only
(CLIP-style) model at the same geometry; and the MFU of a step on an accelerator.

    python -m benchmarks.bench_scaling time                  # step-time ratios over B, M, N (small towers)
    python -m benchmarks.bench_scaling memory                # peak memory, one fresh process per point
    python -m benchmarks.bench_scaling flops                 # FLOPs / step at ResNet-50 / ViT-B/16 + BERT-base, 224 px
    python -m benchmarks.bench_scaling max-batch --preset base --device cuda --bf16

On 2 cores at load 8: time ~8 min (--repeats 3), memory ~3 min, flops ~5 min; a few minutes each on an idle machine.
    python -m benchmarks.bench_scaling mfu --preset base --device cuda --bf16 --batch 64   # on a GPU

Timings are interleaved (variant A, B, C, ..., A, B, C, ...) and the median of the repeats is reported as a ratio to
the global-only step of the same run: the machines these run on are shared. `--threads` (default 1) sets torch's
intra-op threads: on a loaded 2-core machine two OpenMP threads spin against other processes and a step gets 3-6x
slower and far noisier than with one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
    PEAK_BF16_TFLOPS,
    PRESETS,
    VARIANTS,
    build_models,
    largest_batch,
    make_batch,
    measure_step,
    reset_peak_rss,
    runs_without_oom,
    status_mib,
    step_flops,
    timed,
    train_step,
)
from plan_hf import PlanConfig, PlanModel
from plan_hf.losses_plan import StageSchedule, plan_local_loss, word_weights

SMALL_TEXT, SMALL_VISION, _, SMALL_SEQ_LEN = PRESETS["small"]
# Pixel grid N of the small ResNet (stride 32): (image size, vision hidden_states index) giving it.
GRIDS = {16: (128, -1), 49: (224, -1), 196: (224, -2)}
CENTRE = dict(batch=16, words=24, pixels=49)
SWEEP = [dict(CENTRE, batch=8), CENTRE, dict(CENTRE, batch=32), dict(CENTRE, words=8), dict(CENTRE, words=48),
         dict(CENTRE, pixels=16), dict(CENTRE, pixels=196)]


def _return_freed_memory_to_the_os() -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which tensors come from the heap and
    freed ones stay resident: RSS would then track the allocator's history rather than the live tensors. A fixed
    threshold (64 KiB) keeps every tensor above it mmap-ed and unmapped when freed."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD; setting it also turns the dynamic adjustment off


# ----------------------------------------------------------------------------------------------------------------------
# Step time vs B, M, N (small towers: the local term is visible)
# ----------------------------------------------------------------------------------------------------------------------
def time_point(batch: int, words: int, pixels: int, repeats: int) -> dict:
    image_size, local_layer = GRIDS[pixels]
    models = build_models(SMALL_TEXT, SMALL_VISION, local_layer, 128, torch.device("cpu"))
    inputs = make_batch(batch, SMALL_SEQ_LEN, image_size, SMALL_TEXT["vocab_size"], words, torch.device("cpu"))
    steps = {name: train_step(model, inputs) for name, model in models.items()}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step, torch.device("cpu")))
    base = statistics.median(times["global-only"])
    # Load on a shared machine only ever adds time: the ratio of the minima is the second, less noisy estimate.
    return {"batch": batch, "words": words, "pixels": pixels, "image_size": image_size, "global_only_s": base,
            "ratios": {name: statistics.median(t) / base for name, t in times.items()},
            "min_ratios": {name: min(t) / min(times["global-only"]) for name, t in times.items()}}


def run_time(args) -> list[dict]:
    rows = []
    for point in SWEEP:
        row = time_point(point["batch"], point["words"], point["pixels"], args.repeats)
        rows.append(row)
        print(f"B={row['batch']:3d} M={row['words']:3d} N={row['pixels']:3d} ({row['image_size']}px) "
              f"global-only {row['global_only_s']:.3f}s  " +
              "  ".join(f"{name} x{ratio:.2f} (min x{row['min_ratios'][name]:.2f})"
                        for name, ratio in row["ratios"].items() if name != "global-only"), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory: each point in a fresh process; peak RSS during one step above the RSS once everything is built
# ----------------------------------------------------------------------------------------------------------------------
def _make_run(spec: dict, batch: int):
    """The measured call of a memory point, at `batch` (its own inputs)."""
    torch.manual_seed(0)
    if spec["kind"] == "step":
        image_size, _ = GRIDS[spec["pixels"]]
        inputs = make_batch(batch, SMALL_SEQ_LEN, image_size, SMALL_TEXT["vocab_size"], spec["words"],
                            torch.device("cpu"))
        return train_step(spec["model"], inputs)
    words, pixels, dim = spec["words"], spec["pixels"], spec["dim"]
    w = F.normalize(torch.randn(batch, words, dim), dim=-1).requires_grad_()
    p = F.normalize(torch.randn(batch, pixels, dim), dim=-1).requires_grad_()
    mask = torch.ones(batch, words, dtype=torch.bool)
    schedule = StageSchedule.from_config(PlanConfig())
    omega, scale = word_weights(mask, None, 0.5), torch.tensor(10.0)
    # "materialised": the regions r^(i->j) (B, J, M, d) built at every stage, as before region_match_scores (the
    # text-aware pixel-update path, here with an update that changes nothing).
    update = (lambda pixels_, attention, words_: pixels_) if spec.get("materialised") else None
    chunk = min(spec["chunk"] or batch, batch)

    def run():
        plan_local_loss(w, mask, p, scale, schedule, omega, chunk_size=chunk, pixel_update=update,
                        checkpoint_chunks=spec["checkpoint"]).loss.backward()
    return run


def memory_child(spec: dict) -> dict:
    """Peak RSS above the built state during one call. A first call at a small batch runs every kernel once, so the
    code pages it faults in (libtorch is file-backed, its pages count in RSS) are not counted as memory of the step."""
    spec = dict(spec)
    if spec["kind"] == "step":
        _, local_layer = GRIDS[spec["pixels"]]
        variant = {spec["variant"]: VARIANTS[spec["variant"]]}
        spec["model"] = next(iter(build_models(SMALL_TEXT, SMALL_VISION, local_layer, 128, torch.device("cpu"),
                                               variant).values()))
    _make_run(spec, batch=4)()
    run = _make_run(spec, spec["batch"])
    baseline = reset_peak_rss()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    spec.pop("model", None)
    return {**spec, "peak_mib": status_mib("VmHWM") - baseline, "seconds": seconds}


def _memory_child_main(spec: dict, threads: int, queue) -> None:
    _return_freed_memory_to_the_os()
    torch.set_num_threads(threads)
    queue.put(memory_child(spec))


def measure_in_subprocess(spec: dict, threads: int) -> dict:
    """One point in a fresh process: forked from this one, which has only imported (no tensors, no thread pool), so
    the child starts with the same small heap and its own ru_maxrss; a spawned interpreter would pay the imports
    (~25 s each on a loaded 2-core machine) at every point."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    queue = context.SimpleQueue()
    process = context.Process(target=_memory_child_main, args=(spec, threads, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"memory point {spec} failed with exit code {process.exitcode}")
    return queue.get()


def run_memory(args) -> dict:
    results = {"loss": [], "step": []}
    loss_shape = dict(words=24, pixels=49, dim=128)
    for batch in args.batches:
        for chunk in args.chunks:
            for checkpoint in (False, True):
                spec = dict(kind="loss", batch=batch, chunk=chunk, checkpoint=checkpoint, **loss_shape)
                results["loss"].append(measure_in_subprocess(spec, args.threads))
        spec = dict(kind="loss", batch=batch, chunk=16, checkpoint=False, materialised=True, **loss_shape)
        results["loss"].append(measure_in_subprocess(spec, args.threads))
        print(f"local loss B={batch}: " + ", ".join(
            f"chunk {r['chunk'] or 'B'}{' ckpt' if r['checkpoint'] else ''}"
            f"{' materialised' if r.get('materialised') else ''} {r['peak_mib']:.0f} MiB"
            for r in results["loss"] if r["batch"] == batch), flush=True)
    for batch in args.step_batches:
        for variant in VARIANTS:
            spec = dict(kind="step", variant=variant, batch=batch, **{k: CENTRE[k] for k in ("words", "pixels")})
            results["step"].append(measure_in_subprocess(spec, args.threads))
        print(f"step B={batch}: " + ", ".join(f"{r['variant']} {r['peak_mib']:.0f} MiB"
                                              for r in results["step"] if r["batch"] == batch), flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs per step (FlopCounterMode: matmuls, convolutions, attention; elementwise ops and sorts are not counted)
# ----------------------------------------------------------------------------------------------------------------------
def preset_models(preset: str, device, variants: dict) -> tuple[dict, int, int]:
    text, vision, image_size, seq_len = PRESETS[preset]
    return build_models(text, vision, -1, 128 if preset == "small" else 512, device, variants), image_size, seq_len


def run_flops(args) -> list[dict]:
    """FLOPs of one training step (forward + backward) at two batch sizes, fitted as a B + b B^2 (the cross-sample
    local term is quadratic in B), so the count at any batch follows."""
    variants = {name: VARIANTS[name] for name in ("global-only", "PLAN 3 stages", "PLAN 3 stages, no cross-sample")}
    rows = []
    for preset in args.presets:
        models, image_size, seq_len = preset_models(preset, torch.device("cpu"), variants)
        vocab = next(iter(models.values())).config.text_config.vocab_size
        for name, model in models.items():
            counts = {}
            for batch in (2, 4):
                inputs = make_batch(batch, seq_len, image_size, vocab, args.words, torch.device("cpu"))
                counts[batch] = step_flops(model, inputs)
            # f(B) = a B + b B^2 through f(2), f(4)
            quadratic = (counts[4] - 2 * counts[2]) / 8
            linear = counts[2] / 2 - 2 * quadratic
            row = {"preset": preset, "variant": name, "image_size": image_size, "seq_len": seq_len,
                   "gflops_per_image": linear / 1e9, "gflops_quadratic": quadratic / 1e9,
                   "gflops_at": {b: (linear * b + quadratic * b * b) / 1e9 for b in args.at_batches}}
            rows.append(row)
            print(f"{preset:9s} {name:32s} {row['gflops_per_image']:8.1f} GFLOP/image (fwd+bwd) + "
                  f"{row['gflops_quadratic'] * 1e3:.2f} MFLOP * B^2; per step: " +
                  ", ".join(f"B={b}: {v / 1e3:.2f} TFLOP" for b, v in row["gflops_at"].items()), flush=True)
        del models
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# MFU on an accelerator: FLOPs / step (counted) / (step time x peak FLOP/s)
# ----------------------------------------------------------------------------------------------------------------------
def run_mfu(args) -> dict:
    device = torch.device(args.device)
    variants = {name: VARIANTS[name] for name in ("global-only", "PLAN 3 stages")}
    models, image_size, seq_len = preset_models(args.preset, device, variants)
    vocab = next(iter(models.values())).config.text_config.vocab_size
    inputs = make_batch(args.batch, seq_len, image_size, vocab, args.words, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else None
    rows = {}
    for name, model in models.items():
        rows[name] = measure_step(model, inputs, device, autocast, args.warmup, args.repeats, args.peak_tflops)
        flops, seconds = rows[name]["tflops_per_step"] * 1e12, rows[name]["step_s"]
        print(f"{args.preset} {name:16s} B={args.batch}{' bf16' if args.bf16 else ''} on {device}: "
              f"{flops / 1e12:.3f} TFLOP/step, {seconds * 1e3:.1f} ms/step, {args.batch / seconds:.1f} img/s, "
              f"MFU {100 * rows[name]['mfu']:.1f}% of {args.peak_tflops:g} TFLOP/s"
              + (f", peak {rows[name]['peak_gib']:.1f} GiB" if device.type == "cuda" else ""), flush=True)
    return rows


def run_max_batch(args) -> int:
    """Largest batch (doubling, then bisection) whose training step fits in accelerator memory."""
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("max-batch searches for the out-of-memory point of a CUDA device")
    models, image_size, seq_len = preset_models(args.preset, device, {"PLAN 3 stages": VARIANTS["PLAN 3 stages"]})
    model = models["PLAN 3 stages"]
    vocab = model.config.text_config.vocab_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else None

    def fits(batch: int) -> bool:
        inputs = make_batch(batch, seq_len, image_size, vocab, args.words, device)
        return runs_without_oom(train_step(model, inputs, autocast), model)

    low, _ = largest_batch(fits, args.batch)
    print(f"{args.preset} PLAN 3 stages{' bf16' if args.bf16 else ''}: largest batch {low}")
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--json", help="also write the results here")
    commands = parser.add_subparsers(dest="command", required=True)
    timing = commands.add_parser("time")
    timing.add_argument("--repeats", type=int, default=3)
    memory = commands.add_parser("memory")
    memory.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    memory.add_argument("--chunks", type=int, nargs="+", default=[4, 16, 0], help="0 = one chunk of B")
    memory.add_argument("--step-batches", type=int, nargs="+", default=[8, 16, 32])
    flops = commands.add_parser("flops")
    flops.add_argument("--presets", nargs="+", default=["base", "vit-base"], choices=sorted(PRESETS))
    flops.add_argument("--words", type=int, default=24)
    flops.add_argument("--at-batches", type=int, nargs="+", default=[32, 64, 128])
    for name in ("mfu", "max-batch"):
        sub = commands.add_parser(name)
        sub.add_argument("--preset", choices=sorted(PRESETS), default="base")
        sub.add_argument("--device", default="cuda")
        sub.add_argument("--batch", type=int, default=64)
        sub.add_argument("--words", type=int, default=24)
        sub.add_argument("--bf16", action="store_true")
        sub.add_argument("--warmup", type=int, default=3)
        sub.add_argument("--repeats", type=int, default=10)
        sub.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS["H100"],
                         help="the device's dense peak (H100 SXM bf16: 989)")
    args = parser.parse_args()
    if args.command != "memory":  # the memory points set it in their own processes
        torch.set_num_threads(args.threads)
    runner = {"time": run_time, "memory": run_memory, "flops": run_flops, "mfu": run_mfu, "max-batch": run_max_batch}
    results = runner[args.command](args)
    if args.json:
        with open(args.json, "w") as f:
            command = "python -m benchmarks.bench_scaling " + " ".join(sys.argv[1:])
            json.dump({"command": command, "threads": args.threads, "load_avg": os.getloadavg(),
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
