"""The data pipeline: processed images per second through PlanCollator (PlanImageProcessor + tokenizer, word and
sentence ids) against transformers' stock image pipeline (ViTImageProcessorPil + the same tokenizer) on the same
synthetic JPEGs read from disk, with 0, 1 and 2 DataLoader workers; then whether a training step waits on the loader.

    python -m benchmarks.bench_data                       # ~3 min on 2 shared cores
    python -m benchmarks.bench_data --images 512 --batch 64 --repeats 5 --data-dir /tmp/syn224

Both pipelines read rows the way pre-training does (`load_mimic_cxr`: the JPEG is decoded by `datasets` in the
worker), batch them in a DataLoader with persistent workers, and are timed per epoch, interleaved (Plan, stock, Plan,
stock, ...), the first epoch of each loader (worker start-up) left out; images/s is the median over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import PRESETS, VARIANTS, build_models
from plan_hf import PlanImageProcessor, PlanProcessor
from plan_hf.data.collator import PlanCollator
from plan_hf.tiny import build_tokenizer


class StockCollator:
    """transformers' stock pipeline: RGB PIL -> ViTImageProcessorPil (resize to a square, rescale, normalise), and
    the tokenizer alone (no word / sentence ids)."""

    def __init__(self, tokenizer, image_size: int, max_length: int = 128) -> None:
        from transformers import ViTImageProcessorPil

        self.image_processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size},
                                                    image_mean=0.5, image_std=0.5)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows):
        images = self.image_processor([row["image"].convert("RGB") for row in rows], return_tensors="pt")
        text = self.tokenizer([row["text"] for row in rows], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")
        return {"pixel_values": images["pixel_values"], **text}


def load_rows(data_dir: Path, num_images: int, image_size: int):
    """The synthetic set's frontal images with their reports, every split, as pre-training reads them."""
    from datasets import concatenate_datasets

    from plan_hf.data.loaders import load_mimic_cxr
    from plan_hf.data.synthetic import generate_synthetic

    if not (data_dir / "mimic-cxr-2.0.0-split.csv.gz").exists():
        generate_synthetic(data_dir, num_images, seed=0, image_size=image_size, workers=2, contact_sheet=False)
    splits = load_mimic_cxr(data_dir, split=None)
    return concatenate_datasets([splits[name] for name in splits]).select_columns(["image", "text"])


def make_loader(dataset, collator, batch: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, shuffle=False, drop_last=True, collate_fn=collator,
                      num_workers=workers, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(0))


def epoch_seconds(loader: DataLoader) -> float:
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def bench_throughput(dataset, pipelines: dict, batch: int, workers_list: list[int], repeats: int) -> list[dict]:
    rows = []
    images_per_epoch = (len(dataset) // batch) * batch
    for workers in workers_list:
        loaders = {name: make_loader(dataset, collator, batch, workers) for name, collator in pipelines.items()}
        for loader in loaders.values():  # start the workers, decode once
            epoch_seconds(loader)
        times: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(repeats):
            for name, loader in loaders.items():
                times[name].append(epoch_seconds(loader))
        row = {"workers": workers, **{name: images_per_epoch / statistics.median(t) for name, t in times.items()}}
        names = list(pipelines)
        row["ratio"] = row[names[0]] / row[names[1]]
        rows.append(row)
        print(f"workers={workers}: " + ", ".join(f"{name} {row[name]:.1f} img/s" for name in names)
              + f"  ({names[0]} / {names[1]} = {row['ratio']:.2f})", flush=True)
        del loaders
    return rows


def bench_wait(dataset, collator, vocab_size: int, image_size: int, batch: int, workers: int, steps: int) -> dict:
    """A PLAN (3 stages) training step on the small towers, fed by the DataLoader: time blocked in next(loader) vs
    the step's compute (forward, backward, AdamW)."""
    text, vision, _, _ = PRESETS["small"]
    text = dict(text, vocab_size=vocab_size, max_position_embeddings=128)
    model = build_models(text, vision, -1, 128, torch.device("cpu"),
                         {"PLAN 3 stages": VARIANTS["PLAN 3 stages"]})["PLAN 3 stages"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = make_loader(dataset, collator, batch, workers)
    waits, computes = [], []

    def batches():
        while True:
            yield from loader

    iterator = batches()
    for step in range(steps + 2):  # the first two: worker start-up and first-call overheads
        start = time.perf_counter()
        inputs = next(iterator)
        fetched = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        if step >= 2:
            waits.append(fetched - start)
            computes.append(done - fetched)
    grid = model(**inputs, return_features=True).pixels.shape[1]
    result = {"workers": workers, "batch": batch, "image_size": image_size, "pixels": grid, "steps": steps,
              "wait_median_s": statistics.median(waits), "wait_mean_s": statistics.mean(waits),
              "compute_median_s": statistics.median(computes), "compute_mean_s": statistics.mean(computes)}
    result["wait_fraction"] = sum(waits) / (sum(waits) + sum(computes))
    print(f"training step, workers={workers}, B={batch}, {image_size}px (N={grid}): waiting on data "
          f"{result['wait_median_s'] * 1e3:.0f} ms median / {result['wait_mean_s'] * 1e3:.0f} ms mean per step, "
          f"compute {result['compute_median_s'] * 1e3:.0f} ms median; {100 * result['wait_fraction']:.1f}% of the "
          f"wall time spent waiting", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="synthetic frontal images to write (if not there)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wait-steps", type=int, default=12)
    parser.add_argument("--wait-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the training process")
    parser.add_argument("--data-dir", help="synthetic set to use or create (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(args.data_dir or scratch)
        dataset = load_rows(data_dir, args.images, args.image_size)
        tokenizer = build_tokenizer(dataset["text"])
        processor = PlanProcessor(image_processor=PlanImageProcessor(size=args.image_size), tokenizer=tokenizer,
                                  max_length=128)
        pipelines = {"PlanCollator": PlanCollator(processor), "stock ViTImageProcessorPil":
                     StockCollator(tokenizer, args.image_size)}
        print(f"{len(dataset)} images from {data_dir}, batch {args.batch}, {args.image_size}px, "
              f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        results = {"throughput": bench_throughput(dataset, pipelines, args.batch, args.workers, args.repeats),
                   "wait": bench_wait(dataset, pipelines["PlanCollator"], len(tokenizer), args.image_size,
                                      args.batch, args.wait_workers, args.wait_steps)}
    if args.json:
        with open(args.json, "w") as f:
            command = "python -m benchmarks.bench_data " + " ".join(sys.argv[1:])
            json.dump({"command": command, "load_avg": os.getloadavg(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
