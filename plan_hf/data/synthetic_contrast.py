"""How visible each synthetic finding is at the resolution a model sees: the contrast-to-noise ratio (CNR) of the
finding's mask against the lung around it, measured on the written image after the resize a `PlanImageProcessor`
of that size applies (longest side to ``size``, bilinear with antialiasing).

    python -m plan_hf.data.synthetic_contrast --data DIR [--size 224] [--max-images N]

CNR = |mean inside - mean around| / sqrt(var inside + var around) (`plan_hf.metrics.region_cnr`), grey values in
[0, 1]. "Around" is the lung (the lung-field bit of the mask PNG) within `RING_PX` pixels of the finding, other
findings left out; ribs, vessels and film grain in both regions are the noise, as they are for a reader. For
cardiomegaly the "lesion" is the heart and its surroundings the adjacent lung: its CNR says the heart border is
visible, while the finding itself is the heart's width. A CNR of 1 or more is taken as clearly visible.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from ..image_processing_plan import _resize, compute_content_box
from ..metrics.grounding import region_cnr

LUNG_MASK_BIT = 128  # bit 7 of masks/<dicom_id>.png: the lung fields as drawn (findings use bits 0..3)
RING_PX = 8  # width of the surrounding-lung ring, in pixels of the evaluated image
VISIBLE_CNR = 1.0


def finding_cnrs(pixels: np.ndarray, mask: np.ndarray, bits: Sequence[int], size: int,
                 ring: int = RING_PX) -> list[float]:
    """CNR of each finding (``bits``: its mask bit) in one image, at the evaluated ``size``; NaN for a finding
    that has no pixels or no surrounding lung left after the resize.

    pixels: (H, W) uint8 image; mask: (H, W) uint8 bit mask holding `LUNG_MASK_BIT`.
    """
    _, _, height, width = compute_content_box(pixels.shape, size)
    image = _resize(pixels.astype(np.float32) / 255.0, height, width)

    def plane(bit: int) -> np.ndarray:  # a bit plane resized like the image: pixels at least half covered
        return _resize(((mask & bit) > 0).astype(np.float32), height, width) >= 0.5

    lung = plane(LUNG_MASK_BIT)
    lesions = [plane(bit) for bit in bits]
    background = lung & ~np.logical_or.reduce(lesions, axis=0) if lesions else lung
    values = []
    for lesion in lesions:
        near = ndimage.distance_transform_edt(~lesion) <= ring if lesion.any() else lesion
        values.append(region_cnr(image, lesion, near & background))
    return values


def summarise_cnrs(values_by_type: Mapping[str, Sequence[float]], size: int) -> dict[str, Any]:
    """Per finding type: count, mean, median, 10th percentile and share >= `VISIBLE_CNR` of its CNRs (NaN left
    out and counted as ``undefined``)."""
    per_type = {}
    for kind in sorted(values_by_type):
        values = np.asarray(values_by_type[kind], dtype=np.float64)
        defined = values[np.isfinite(values)]
        if not defined.size:
            per_type[kind] = {"count": 0, "undefined": int(values.size)}
            continue
        per_type[kind] = {
            "count": int(defined.size),
            "mean": round(float(defined.mean()), 3),
            "median": round(float(np.median(defined)), 3),
            "p10": round(float(np.percentile(defined, 10)), 3),
            "share_visible": round(float((defined >= VISIBLE_CNR).mean()), 3),
            "undefined": int(values.size - defined.size),
        }
    return {"size": size, "ring_px": RING_PX, "visible_cnr": VISIBLE_CNR, "per_type": per_type}


def contrast_markdown(summary: Mapping[str, Any]) -> str:
    """The per-type table of `summarise_cnrs` as markdown."""
    lines = [f"Contrast-to-noise ratio of each finding against the lung within {summary['ring_px']} px, at "
             f"{summary['size']} px (longest side); visible: CNR >= {summary['visible_cnr']}.", "",
             "| finding | count | mean CNR | median | 10th percentile | share visible |", "|---|---|---|---|---|---|"]
    for kind, row in summary["per_type"].items():
        if row["count"]:
            lines.append(f"| {kind} | {row['count']} | {row['mean']:.2f} | {row['median']:.2f} | {row['p10']:.2f} | "
                         f"{row['share_visible']:.2f} |")
        else:
            lines.append(f"| {kind} | 0 | n/a | n/a | n/a | n/a |")
    return "\n".join(lines) + "\n"


def measure_contrast(root: str | Path, size: int | None = None, max_images: int | None = None) -> dict[str, Any]:
    """`summarise_cnrs` of a written synthetic set, read back from its images and masks (the first `max_images`
    frontal images, or all). ``size`` defaults to the set's ``--image-size``."""
    from .synthetic import read_metadata

    root = Path(root)
    metadata = read_metadata(root)
    if metadata.get("lung_mask_bit") != LUNG_MASK_BIT:
        raise ValueError(f"{root}: the masks hold no lung-field bit ({metadata['name']} was written before it "
                         "existed); generate the set again with this version to measure contrast")
    size = size or int(metadata["arguments"]["image_size"])
    by_type: dict[str, list[float]] = defaultdict(list)
    with open(root / "findings.jsonl", encoding="utf-8") as handle:
        for count, line in enumerate(handle):
            if max_images is not None and count >= max_images:
                break
            record = json.loads(line)
            if not record["findings"]:
                continue
            pixels = np.asarray(Image.open(root / record["path"]).convert("L"))
            mask = np.asarray(Image.open(root / record["mask_path"]))
            cnrs = finding_cnrs(pixels, mask, [f["mask_bit"] for f in record["findings"]], size)
            for finding, value in zip(record["findings"], cnrs):
                by_type[finding["type"]].append(value)
    return summarise_cnrs(by_type, size)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="a plan_hf.data.synthetic folder")
    parser.add_argument("--size", type=int, default=None, help="evaluated longest side (default: the set's size)")
    parser.add_argument("--max-images", type=int, default=None)
    args = parser.parse_args(argv)
    summary = measure_contrast(args.data, args.size, args.max_images)
    print(contrast_markdown(summary))
    return summary


if __name__ == "__main__":
    main()


__all__ = ["LUNG_MASK_BIT", "RING_PX", "VISIBLE_CNR", "contrast_markdown", "finding_cnrs", "measure_contrast",
           "summarise_cnrs"]
