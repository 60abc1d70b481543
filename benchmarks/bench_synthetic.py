"""Generation speed of the synthetic CXR benchmark, and its label balance at that size.

    python -m benchmarks.bench_synthetic                       # 5,000 images at 224 px on 2 workers
    python -m benchmarks.bench_synthetic --num-images 500 --workers 1

Prints images/s (wall clock, imports excluded) and the CPU seconds spent per image in the parent and the workers
together, which is the number to trust on a shared, noisy machine. Also checks the 5x200 requirement: at 5,000
images each of the five classes has at least 200 images positive for it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

from plan_hf.data.synthetic import generate_synthetic
from plan_hf.data.synthetic_findings import FIVE_CLASSES


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one, removed afterwards)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_synthetic_") as tmp:
        out = args.out or os.path.join(tmp, "synthetic")
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        summary = generate_synthetic(out, args.num_images, seed=args.seed, image_size=args.image_size,
                                     workers=args.workers)
        wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    single = summary["single_positive_5x200"]
    result = {
        "num_images": args.num_images,
        "image_size": args.image_size,
        "workers": args.workers,
        "wall_seconds": round(wall, 1),
        "images_per_second": round(args.num_images / wall, 1),
        "cpu_ms_per_image": round(1000 * cpu / args.num_images, 1),
        "single_positive_5x200": single,
        "normal_fraction": summary["normal_fraction"],
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))
    if args.num_images >= 5000:
        short = {name: single[name] for name in FIVE_CLASSES if single[name] < 200}
        print("5x200 check:", "ok" if not short else f"too few single-positive images: {short}")


if __name__ == "__main__":
    main()
