"""Candidate speed-ups of a pre-training step on CPU, each against its baseline in the same run, interleaved
(baseline, candidate, baseline, candidate, ...), median of the repeats; with how far the result moves.

    python -m benchmarks.bench_speedups                   # all but compile (~12 min on 2 cores at load 8)
    python -m benchmarks.bench_speedups --only local step  # the library change (~5 min)
    python -m benchmarks.bench_speedups --only compile     # torch.compile: ~5 min of compilation alone

Candidates: the PLAN local loss computed from the soft regions alone (`region_match_scores`, the library's path now)
against materialising every report's regions on every image (the path before), with per-chunk checkpointing; the
cost of the top-mass sort; SDPA vs eager attention in the BERT tower; channels_last for the ResNet tower; bf16
autocast on CPU; torch.compile of the local loss (compile time apart).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModel

import plan_hf.modeling_plan as modeling_plan
from benchmarks.common import PRESETS, VARIANTS, build_models, local_inputs, make_batch, train_step
from plan_hf import PlanConfig
from plan_hf.losses_plan import StageSchedule, plan_local_loss, soft_regions


def unchanged_pixels(pixels, attention, words):
    """A text-aware pixel update that changes nothing: it sends plan_local_loss down the path that materialises
    the regions r^(i->j) (B, J, M, d) at every stage, which is what the library computed before region_match_scores."""
    return pixels


def compare(candidates: dict, repeats: int) -> dict:
    """Interleaved timing; the first candidate is the baseline. Returns {name: (median seconds, ratio)}."""
    for run in candidates.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(next(iter(times.values())))
    return {name: (statistics.median(t), statistics.median(t) / base) for name, t in times.items()}


def report(title: str, timings: dict, notes: dict | None = None) -> dict:
    print(f"\n{title}")
    for name, (seconds, ratio) in timings.items():
        note = (notes or {}).get(name, "")
        print(f"  {name:44s} {seconds * 1e3:9.1f} ms  x{ratio:.2f}  {note}")
    return {name: {"median_s": s, "ratio": r, "note": (notes or {}).get(name, "")} for name, (s, r) in timings.items()}


# ----------------------------------------------------------------------------------------------------------------------
def bench_local(repeats: int) -> dict:
    """The local loss alone (forward + backward, 3 stages, cross-sample, chunk 16)."""
    schedule = StageSchedule.from_config(PlanConfig())
    results = {}
    for batch, words, pixels, dim in [(16, 24, 49, 128), (32, 24, 49, 128), (16, 24, 16, 128), (16, 24, 49, 512)]:
        w, mask, p, scale, omega = local_inputs(batch, words, pixels, dim)

        def loss(**kwargs):
            return plan_local_loss(w, mask, p, scale, schedule, omega, chunk_size=16, **kwargs).loss

        before, now = loss(pixel_update=unchanged_pixels), loss()
        notes = {"regions from A' alone (now)": f"|dloss| {abs(before - now).item():.1e}"}
        timings = compare({
            "materialised regions (before)": lambda: loss(pixel_update=unchanged_pixels).backward(),
            "regions from A' alone (now)": lambda: loss().backward(),
            "now + checkpoint per chunk": lambda: loss(checkpoint_chunks=True).backward(),
        }, repeats)
        key = f"B={batch} M={words} N={pixels} d={dim}"
        results[key] = report(f"local loss fwd+bwd, {key}", timings, notes)
    return results


def bench_sort(repeats: int) -> dict:
    """What the top-mass sparsification costs: soft_regions forward on a cross-sample chunk's logits."""
    logits = torch.randn(16, 16, 24, 49) * 3  # (B, J, M, N)
    timings = compare({
        "softmax only ('none')": lambda: soft_regions(logits, 0.5, "none"),
        "top_mass (sort + cumsum)": lambda: soft_regions(logits, 0.5, "top_mass"),
        "sparsemax (sort + cumsum)": lambda: soft_regions(logits, 0.5, "sparsemax"),
        "torch.sort alone": lambda: logits.sort(dim=-1, descending=True),
    }, repeats * 3)
    return report("soft regions forward, (B, J, M, N) = (16, 16, 24, 49)", timings)


def bench_compile(repeats: int) -> dict:
    schedule = StageSchedule.from_config(PlanConfig())
    w, mask, p, scale, omega = local_inputs(16, 24, 49, 128)

    def eager():
        plan_local_loss(w, mask, p, scale, schedule, omega, chunk_size=16).loss.backward()

    compiled_loss = torch.compile(plan_local_loss)

    def compiled():
        compiled_loss(w, mask, p, scale, schedule, omega, chunk_size=16).loss.backward()

    start = time.perf_counter()
    compiled()
    compile_s = time.perf_counter() - start
    timings = compare({"eager": eager, "torch.compile(plan_local_loss)": compiled}, repeats)
    notes = {"torch.compile(plan_local_loss)": f"first call (compile) {compile_s:.1f} s"}
    out = report("local loss fwd+bwd, B=16 M=24 N=49 d=128: torch.compile (inductor, CPU)", timings, notes)
    out["compile_s"] = compile_s
    return out


def bench_attention(repeats: int) -> dict:
    """BERT text tower alone, forward + backward."""
    results = {}
    small = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    for name, overrides, batch, seq_len in [("BERT-base", {}, 4, 128), ("BERT 4x256", small, 16, 128)]:
        config = AutoConfig.for_model("bert", **overrides)
        towers = {}
        for implementation in ("sdpa", "eager"):
            torch.manual_seed(0)
            towers[implementation] = AutoModel.from_config(config, attn_implementation=implementation,
                                                           add_pooling_layer=False).train()
        towers["eager"].load_state_dict(towers["sdpa"].state_dict())
        ids = torch.randint(5, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[::2, seq_len // 2:] = 0  # padded reports

        def run(tower):
            def step():
                tower(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
                tower.zero_grad(set_to_none=True)
            return step

        with torch.no_grad():
            towers["sdpa"].eval(), towers["eager"].eval()
            diff = (towers["sdpa"](input_ids=ids, attention_mask=mask).last_hidden_state
                    - towers["eager"](input_ids=ids, attention_mask=mask).last_hidden_state).abs().max().item()
            towers["sdpa"].train(), towers["eager"].train()
        timings = compare({"eager": run(towers["eager"]), "sdpa (the default)": run(towers["sdpa"])}, repeats)
        results[name] = report(f"{name} text tower fwd+bwd, B={batch} L={seq_len}: attention implementation",
                               timings, {"sdpa (the default)": f"max |diff| {diff:.1e}"})
    return results


def bench_channels_last(repeats: int) -> dict:
    results = {}
    for name, vision, batch in [("ResNet-50", dict(model_type="resnet"), 4),
                                ("small ResNet", PRESETS["small"][1], 16)]:
        config = AutoConfig.for_model(**vision)
        torch.manual_seed(0)
        towers = {torch.contiguous_format: AutoModel.from_config(config).train()}
        towers[torch.channels_last] = copy.deepcopy(towers[torch.contiguous_format])
        towers[torch.channels_last].to(memory_format=torch.channels_last)
        pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        last = pixels.contiguous(memory_format=torch.channels_last)

        def run(x, memory_format):
            def step():
                towers[memory_format](pixel_values=x).pooler_output.sum().backward()
                towers[memory_format].zero_grad(set_to_none=True)
            return step

        with torch.no_grad():
            diff = (towers[torch.channels_last].eval()(pixel_values=last).pooler_output
                    - towers[torch.contiguous_format].eval()(pixel_values=pixels).pooler_output).abs().max().item()
            for tower in towers.values():
                tower.train()
        timings = compare({"contiguous (NCHW)": run(pixels, torch.contiguous_format),
                           "channels_last (NHWC)": run(last, torch.channels_last),
                           "channels_last input only": run(last, torch.contiguous_format)}, repeats)
        results[name] = report(f"{name} vision tower fwd+bwd, B={batch} 224px: memory format", timings,
                               {"channels_last (NHWC)": f"max |diff| {diff:.1e}"})
    return results


def bench_bf16(repeats: int) -> dict:
    """The whole PLAN (3 stages) step, fp32 vs bf16 autocast, small towers and ResNet-50 + BERT-base."""
    results = {}
    for preset, batch in [("small", 16), ("base", 4)]:
        text, vision, image_size, seq_len = PRESETS[preset]
        model = build_models(text, vision, -1, 128 if preset == "small" else 512, torch.device("cpu"),
                             {"PLAN 3 stages": VARIANTS["PLAN 3 stages"]})["PLAN 3 stages"]
        inputs = make_batch(batch, seq_len, image_size, model.config.text_config.vocab_size, 24, torch.device("cpu"))
        bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
        with torch.no_grad():
            model.eval()
            fp32_loss = model(**inputs).loss.item()
            with bf16:
                bf16_loss = model(**inputs).loss.item()
            model.train()
        timings = compare({"fp32": train_step(model, inputs), "bf16 autocast": train_step(model, inputs, bf16)},
                          repeats)
        results[preset] = report(f"{preset} PLAN 3-stage step fwd+bwd, B={batch} {image_size}px: bf16 autocast",
                                 timings, {"bf16 autocast": f"loss {bf16_loss:.4f} vs fp32 {fp32_loss:.4f} "
                                           f"(rel. {abs(bf16_loss - fp32_loss) / abs(fp32_loss):.1e})"})
    return results


@contextmanager
def materialised_regions_in_the_model():
    """PlanModel's loss through the pre-region_match_scores path (see unchanged_pixels)."""
    original = modeling_plan.plan_local_loss

    def before(*args, pixel_update=None, **kwargs):
        return original(*args, pixel_update=pixel_update or unchanged_pixels, **kwargs)

    modeling_plan.plan_local_loss = before
    try:
        yield
    finally:
        modeling_plan.plan_local_loss = original


def bench_step_effect(repeats: int) -> dict:
    """The library change on the whole step: small towers, 224 px (N=49), B=16 and 32, ratios to global-only."""
    results = {}
    text, vision, _, seq_len = PRESETS["small"]
    variants = {name: VARIANTS[name] for name in ("global-only", "PLAN 3 stages")}
    models = build_models(text, vision, -1, 128, torch.device("cpu"), variants)
    for batch in (16, 32):
        inputs = make_batch(batch, seq_len, 224, text["vocab_size"], 24, torch.device("cpu"))
        plan_step = train_step(models["PLAN 3 stages"], inputs)

        def before():
            with materialised_regions_in_the_model():
                plan_step()

        timings = compare({"global-only": train_step(models["global-only"], inputs),
                           "PLAN 3 stages, before": before, "PLAN 3 stages, now": plan_step}, repeats)
        results[f"B={batch}"] = report(f"small-tower step fwd+bwd, B={batch} M=24 N=49: ratio to global-only",
                                       timings)
    return results


BENCHES = {"local": bench_local, "step": bench_step_effect, "sort": bench_sort, "attention": bench_attention,
           "channels_last": bench_channels_last, "bf16": bench_bf16, "compile": bench_compile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES),
                        default=[name for name in BENCHES if name != "compile"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, torch {torch.__version__}")
    results = {name: BENCHES[name](args.repeats) for name in args.only}
    if args.json:
        with open(args.json, "w") as f:
            command = "python -m benchmarks.bench_speedups " + " ".join(sys.argv[1:])
            json.dump({"command": command, "threads": args.threads, "load_avg": os.getloadavg(),
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
