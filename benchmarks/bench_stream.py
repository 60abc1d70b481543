"""A streamed source's pairs per second with the images decoded in turn (``num_workers: 0``) and ahead by threads
(``num_workers: N``: `PairStream`'s ``decode_threads``), on JPEGs the size of MIMIC-CXR-JPG's.

    python -m benchmarks.bench_stream                      # ~2 min on 2 shared cores
    python -m benchmarks.bench_stream --images 96 --side 2500 --threads 0 2 4 --repeats 5

The rows are a `save_to_disk` folder of image paths and reports, streamed as pre-training streams them (a seeded
shuffle buffer, one process); each setting reads one whole epoch per repeat, the settings interleaved (0, 2, 4, 0, 2,
4, ...) because the machine is shared; pairs/s is the median over the repeats, and each setting's ratio is taken
against the in-turn decoding of the same repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage


def write_rows(folder: Path, images: int, side: int) -> Path:
    """`images` grey JPEGs of `side` px (smooth shading and noise, as a radiograph compresses) and their reports, as
    a save_to_disk folder of paths."""
    from datasets import Dataset, Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(images):
        shade = 0.4 + 0.3 * np.sin(3 * xx + i) * np.cos(2 * yy) + 0.05 * rng.standard_normal((side, side))
        path = folder / "images" / f"{i}.jpg"
        PILImage.fromarray((np.clip(shade, 0, 1) * 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    rows = folder / "rows"
    Dataset.from_dict({"image": paths, "text": [f"Report {i}. No acute finding." for i in range(images)]}) \
        .cast_column("image", Image()).save_to_disk(rows)
    return rows


def epoch_seconds(rows: Path, threads: int) -> tuple[float, int]:
    from plan_hf.data.sources import PairSource, stream_pairs

    stream = stream_pairs(PairSource("disk", rows), seed=0, buffer_size=16, decode_threads=threads)
    start = time.perf_counter()
    count = 0
    for pair in stream.pairs(0):
        pair["image"].load()  # (decoded already: a no-op, kept so that no setting could defer the work)
        count += 1
    return time.perf_counter() - start, count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--side", type=int, default=2048, help="JPEG side in pixels (MIMIC-CXR-JPG: ~2500-3000)")
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    settings = sorted(set([0, *args.threads]))
    with tempfile.TemporaryDirectory() as tmp:
        rows = write_rows(Path(tmp), args.images, args.side)
        epoch_seconds(rows, 0)  # warm the page cache
        times: dict[int, list[float]] = {t: [] for t in settings}
        ratios: dict[int, list[float]] = {t: [] for t in settings}
        for _ in range(args.repeats):
            this = {}
            for threads in settings:
                seconds, count = epoch_seconds(rows, threads)
                assert count == args.images, (count, args.images)
                this[threads] = seconds
                times[threads].append(seconds)
            for threads in settings:
                ratios[threads].append(this[0] / this[threads])
    result = {
        "images": args.images, "side": args.side, "repeats": args.repeats, "cores": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "settings": {str(t): {"pairs_per_second": args.images / statistics.median(times[t]),
                              "speedup_vs_in_turn": statistics.median(ratios[t]),
                              "speedup_range": [min(ratios[t]), max(ratios[t])]} for t in settings},
    }
    print("| num_workers (decode threads) | pairs/s | speed-up vs in turn (median, range) |")
    print("|---|---|---|")
    for t in settings:
        row = result["settings"][str(t)]
        print(f"| {t} | {row['pairs_per_second']:.1f} | {row['speedup_vs_in_turn']:.2f} "
              f"({row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}) |")
    print(f"{args.images} JPEGs of {args.side} px, {args.repeats} interleaved repeats, load {result['load_average']:.1f}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
