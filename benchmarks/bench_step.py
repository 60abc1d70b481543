"""Training-step cost of PLAN's local alignment relative to the global-only (CLIP-style) model, same batch, one run.

    python -m benchmarks.bench_step --preset small            # tiny towers, CPU, seconds
    python -m benchmarks.bench_step --preset base --batch 8   # ResNet-50 + BERT-base at 224 px (random init)
    python -m benchmarks.bench_step --preset base --device cuda --bf16 --batch 64

Every variant shares the towers' weights and the batch; timings are interleaved (variant A, B, C, A, B, C, ...) and
the median is reported, as ratios to the global-only step, because these machines are shared and noisy. Also times
the PLAN local loss alone against a per-sample Python loop of the same maths.
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from benchmarks.common import PRESETS, VARIANTS, build_models, make_batch, timed, train_step
from plan_hf import PlanConfig
from plan_hf.losses_plan import (
    StageSchedule,
    local_match_scores,
    plan_local_loss,
    progressive_regions,
    symmetric_infonce,
    word_region_infonce,
    word_weights,
)

def bench_steps(preset: str, batch: int, words: int, repeats: int, device, bf16: bool, local_layer: int) -> dict:
    text, vision, image_size, seq_len = PRESETS[preset]
    models = build_models(text, vision, local_layer, 128 if preset == "small" else 512, device)
    reference = next(iter(models.values()))
    inputs = make_batch(batch, seq_len, image_size, reference.config.text_config.vocab_size, words, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    with torch.no_grad(), autocast:
        grid = reference(**inputs, return_features=True).pixels.shape[1] if reference.config.uses_local_alignment \
            else models["PLAN 3 stages"](**inputs, return_features=True).pixels.shape[1]
    times: dict[str, list[float]] = {name: [] for name in models}
    memory: dict[str, float] = {}
    for name, model in models.items():  # warm-up (and peak memory, one step each)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timed(train_step(model, inputs, autocast), device)
        if device.type == "cuda":
            memory[name] = torch.cuda.max_memory_allocated() / 2**30
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(timed(train_step(model, inputs, autocast), device))
    base = statistics.median(times["global-only"])
    rows = {name: {"median_s": statistics.median(t), "ratio": statistics.median(t) / base,
                   "images_per_s": batch / statistics.median(t), **({"peak_gib": memory[name]} if memory else {})}
            for name, t in times.items()}
    return {"preset": preset, "batch": batch, "words": words, "pixels": grid, "seq_len": seq_len,
            "image_size": image_size, "repeats": repeats, "bf16": bf16, "device": str(device), "steps": rows}


# ----------------------------------------------------------------------------------------------------------------------
# The local loss alone: vectorised vs a per-sample loop of the same maths
# ----------------------------------------------------------------------------------------------------------------------
def looped_local_loss(words, mask, pixels, scale, schedule, omega):
    """The same loss with a Python loop over (report, image) pairs: the way GLoRIA/MGCA-style code computes it."""
    batch = words.shape[0]
    per_pair = [[progressive_regions(words[i][mask[i]], pixels[j], scale, schedule, "top_mass", 1.0, 1e-6)
                 for j in range(batch)] for i in range(batch)]
    total = 0.0
    for t, alpha in enumerate(schedule.loss_weights):
        tau = schedule.temperatures[t]
        within = torch.stack([
            word_region_infonce(words[i][mask[i]][None], per_pair[i][i][t][1][None], omega[i][mask[i]][None],
                                mask[i][mask[i]][None], tau) for i in range(batch)]).mean()
        scores = torch.stack([torch.stack([
            local_match_scores(words[i][mask[i]][None, None], per_pair[i][j][t][1][None, None],
                               omega[i][mask[i]][None])[0, 0] for j in range(batch)]) for i in range(batch)])
        logits = scores / tau
        total = total + alpha * (within + symmetric_infonce(logits, logits.t(), torch.arange(batch)))
    return total


def bench_local_loss(batch: int, words: int, pixels: int, dim: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    w = F.normalize(torch.randn(batch, words, dim, generator=g), dim=-1).requires_grad_()
    p = F.normalize(torch.randn(batch, pixels, dim, generator=g), dim=-1).requires_grad_()
    mask = torch.ones(batch, words, dtype=torch.bool)
    mask[::2, words // 2:] = False
    schedule = StageSchedule.from_config(PlanConfig())
    omega = word_weights(mask, None, 0.5)
    scale = torch.tensor(10.0)

    def vectorised():
        plan_local_loss(w, mask, p, scale, schedule, omega, cross_sample=True, chunk_size=16).loss.backward()

    def looped():
        looped_local_loss(w, mask, p, scale, schedule, omega).backward()

    a = plan_local_loss(w, mask, p, scale, schedule, omega).loss
    b = looped_local_loss(w, mask, p, scale, schedule, omega)
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    times = {"vectorised": [], "per-sample loop": []}
    for _ in range(repeats):
        times["vectorised"].append(timed(vectorised, torch.device("cpu")))
        times["per-sample loop"].append(timed(looped, torch.device("cpu")))
    v = statistics.median(times["vectorised"])
    return {"batch": batch, "words": words, "pixels": pixels, "dim": dim,
            "vectorised_s": v, "loop_s": statistics.median(times["per-sample loop"]),
            "speedup": statistics.median(times["per-sample loop"]) / v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--words", type=int, default=24, help="content words per report (M)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--local-layer", type=int, default=-1, help="vision hidden_states index for the pixel grid")
    parser.add_argument("--skip-loss-bench", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"step": bench_steps(args.preset, args.batch, args.words, args.repeats, torch.device(args.device),
                                   args.bf16, args.local_layer)}
    if not args.skip_loss_bench:
        results["local_loss"] = bench_local_loss(batch=16, words=args.words, pixels=49, dim=128, repeats=args.repeats)
    step = results["step"]
    print(f"\n{step['preset']}: B={step['batch']} M={step['words']} N={step['pixels']} L={step['seq_len']} "
          f"{step['image_size']}px on {step['device']}{' bf16' if step['bf16'] else ''}, median of {step['repeats']}")
    print(f"{'variant':34s} {'s/step':>8s} {'ratio':>6s} {'img/s':>8s}" + (" peak GiB" if args.device != "cpu" else ""))
    for name, row in step["steps"].items():
        print(f"{name:34s} {row['median_s']:8.3f} {row['ratio']:6.2f} {row['images_per_s']:8.1f}"
              + (f" {row['peak_gib']:8.2f}" if "peak_gib" in row else ""))
    if "local_loss" in results:
        ll = results["local_loss"]
        print(f"\nlocal loss fwd+bwd, B={ll['batch']} M={ll['words']} N={ll['pixels']} d={ll['dim']}: vectorised "
              f"{ll['vectorised_s'] * 1e3:.1f} ms, per-sample loop {ll['loop_s'] * 1e3:.1f} ms, {ll['speedup']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
