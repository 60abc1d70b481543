"""The synthetic CXR benchmark: deterministic chest-radiograph-like images with findings drawn at known places,
a report written from them, and the published MIMIC-CXR / MS-CXR layouts around them, so that every loader and
evaluation of this package runs unchanged on it. It is the ground truth for the quality benchmarks.

    python -m plan_hf.data.synthetic --out DIR --num-images 5000 --seed 0 [--image-size 224] [--workers 2]

On-disk layout under ``DIR`` (every file byte-identical for the same arguments, whatever ``--workers``):

- ``files/p1X/p1XXXXXXX/sXXXXXXXX/<dicom_id>.jpg``: 8-bit grayscale JPEG, one PA/AP frontal per study (plus a plain
  lateral for ~5% of studies); height in [S, 1.25 S], width in [0.92 S, 1.08 S] for ``--image-size`` S.
- ``files/p1X/p1XXXXXXX/sXXXXXXXX.txt``: the report (``FINAL REPORT`` header, EXAMINATION, INDICATION, ...,
  ``FINDINGS:`` and/or ``IMPRESSION:``).
- ``mimic-cxr-2.0.0-split.csv.gz``: ``dicom_id,study_id,subject_id,split`` (train/validate/test ~80/10/10 by subject).
- ``mimic-cxr-2.0.0-metadata.csv.gz``: ``dicom_id,subject_id,study_id,PerformedProcedureStepDescription,
  ViewPosition,Rows,Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,
  PatientOrientationCodeSequence_CodeMeaning`` (ViewPosition PA, AP or LATERAL).
- ``mimic-cxr-2.0.0-chexpert.csv.gz``: ``subject_id,study_id`` + the 14 CheXpert labels (1.0 present, -1.0 hedged
  "possible ...", 0.0 negated in the report, blank otherwise).
- ``ms_cxr_synthetic.csv``: MS-CXR 1.1.0 columns ``dicom_id,category_name,label_text,path,x,y,w,h,image_width,
  image_height,split``; one row per box (bilateral findings: one row per side, same label_text); boxes in original
  pixels, (x, y) top-left; split train/val/test as MS-CXR spells it; MS-CXR's eight categories only (nodules and
  lines are left out here but are in ``findings.jsonl``).
- ``masks/<dicom_id>.png``: uint8 bit mask, same size as the image: pixel bit ``k`` is set where finding ``k`` (its
  index in ``findings.jsonl``) lies, so overlapping findings keep both (``mask_bit`` = 2**k); bit 7
  (``LUNG_MASK_BIT`` = 128) marks the lung fields.
- ``findings.jsonl``: one line per frontal image: ``dicom_id, subject_id, study_id, path, mask_path, split, view,
  width, height, cardiothoracic_ratio, chexpert, findings`` with each finding's ``type, category, sides, zone,
  severity, hedged, label_text, boxes, box_sides, mask_bit, cnr`` (``cnr``: its contrast-to-noise ratio against the
  surrounding lung at ``--image-size``, `plan_hf.data.synthetic_contrast`).
- ``benchmark.json``: the benchmark's name and version (``"synthetic-cxr v2"``; a set without this file is v1), the
  generator's arguments, the label and finding counts and the per-finding-type contrast table;
  ``finding_contrast.md``: that table for reading.
- ``contact_sheet.png``: the first 16 images with their boxes, to look at.

Sides are the patient's: the patient's right is the image's left (PA convention). ``--difficulty`` divides the
contrast of every finding (default 1.0; 2.0 halves it; support devices stay bright).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import io
import json
import math
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .synthetic_findings import (
    CHEXPERT_LABELS,
    FIVE_CLASSES,
    MS_CXR_CATEGORIES,
    FindingSpec,
    FindingType,
    positive_labels,
    sample_findings,
    single_positive_class,
)
from .synthetic_contrast import LUNG_MASK_BIT, contrast_markdown, finding_cnrs, summarise_cnrs
from .synthetic_render import render_frontal, render_lateral
from .synthetic_report import write_report

# The benchmark's name and version go into benchmark.json and every evaluation of it, so that numbers measured on
# different versions are never compared. v1: the anatomy at a fixed place, no metadata file. v2: patient position
# and inspiration vary per image, every finding type visible at the written size, lung fields in the masks.
BENCHMARK = "synthetic-cxr"
BENCHMARK_VERSION = 2
METADATA_FILE = "benchmark.json"

JPEG_QUALITY = 95
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MS_CXR_SPLIT = {"train": "train", "validate": "val", "test": "test"}
_PLAN_STREAM = [0, 0, 7]  # 4-element seed sequence: never equal to a per-image [seed, index, stream]


@dataclass(frozen=True)
class StudyPlan:
    """Identity and bookkeeping of one study; pixels and words depend on (seed, index) only."""

    index: int
    subject_id: int
    study_id: int
    dicom_id: str
    lateral_dicom_id: str | None
    split: str
    view: str  # PA or AP
    study_date: int  # YYYYMMDD, shifted into the future as MIMIC does
    study_time: str  # HHMMSS.fff

    @property
    def study_dir(self) -> str:
        return f"files/p{str(self.subject_id)[:2]}/p{self.subject_id}/s{self.study_id}"


def plan_studies(seed: int, num_images: int, lateral_fraction: float = 0.05) -> list[StudyPlan]:
    """Subjects (1-3 studies each), ids, dates, views and a by-subject train/validate/test split."""
    rng = np.random.default_rng([seed, *_PLAN_STREAM])
    counts: list[int] = []
    while sum(counts) < num_images:
        counts.append(min(int(rng.choice([1, 2, 3], p=[0.75, 0.17, 0.08])), num_images - sum(counts)))
    num_subjects = len(counts)
    subject_ids = rng.choice(9_000_000, size=num_subjects, replace=False) + 10_000_000
    study_ids = rng.choice(10_000_000, size=num_images, replace=False) + 50_000_000
    words = rng.integers(0, 2**32, size=(num_images, 2, 5), dtype=np.uint64)
    has_lateral = rng.random(num_images) < lateral_fraction
    views = np.where(rng.random(num_images) < 0.75, "PA", "AP")
    # Exact fractions over a shuffled subject list: every split is non-empty from 10 subjects on.
    order = rng.permutation(num_subjects)
    n_train = int(round(SPLIT_FRACTIONS[0] * num_subjects))
    n_val = int(round(SPLIT_FRACTIONS[1] * num_subjects))
    split_of = np.empty(num_subjects, dtype=object)
    split_of[order[:n_train]] = "train"
    split_of[order[n_train : n_train + n_val]] = "validate"
    split_of[order[n_train + n_val :]] = "test"

    plans: list[StudyPlan] = []
    index = 0
    for subject, count in enumerate(counts):
        date = dt.date(2110, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 80)))
        for _ in range(count):
            date += dt.timedelta(days=int(rng.integers(1, 400)))
            seconds = int(rng.integers(0, 86_400))
            plans.append(
                StudyPlan(
                    index=index,
                    subject_id=int(subject_ids[subject]),
                    study_id=int(study_ids[index]),
                    dicom_id="-".join(f"{int(w):08x}" for w in words[index, 0]),
                    lateral_dicom_id="-".join(f"{int(w):08x}" for w in words[index, 1]) if has_lateral[index] else None,
                    split=str(split_of[subject]),
                    view=str(views[index]),
                    study_date=int(date.strftime("%Y%m%d")),
                    study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}.{int(rng.integers(0, 1000)):03d}",
                )
            )
            index += 1
    return plans


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY)


def _chexpert_row(findings: list[FindingSpec], negated: set[str]) -> dict[str, float | None]:
    values: dict[str, float | None] = {name: None for name in CHEXPERT_LABELS}
    for name in negated:
        values[name] = 0.0
    for name, value in positive_labels(findings).items():
        values[name] = value  # a present finding overrides a negation of a related label
    return values


def _render_study(job: tuple[str, int, StudyPlan, int, float]) -> dict[str, Any]:
    """Draw, report and write one study; returns its record for the CSVs. Runs in worker processes."""
    out_dir, seed, plan, image_size, difficulty = job
    root = Path(out_dir)
    specs = sample_findings(seed, plan.index)
    rendered = render_frontal(seed, plan.index, specs, image_size, difficulty)
    drawn = [d.spec for d in rendered.findings]  # what is visible (a lesion pushed off the image is not reported)
    report = write_report(seed, plan.index, drawn, plan.view)

    image_path = f"{plan.study_dir}/{plan.dicom_id}.jpg"
    _save_jpeg(rendered.pixels, root / image_path)
    (root / f"{plan.study_dir}.txt").write_text(report.text, encoding="utf-8")
    height, width = rendered.pixels.shape
    mask = np.where(rendered.lung, np.uint8(LUNG_MASK_BIT), np.uint8(0))
    for k, d in enumerate(rendered.findings):
        for m in d.masks:
            mask |= (m.astype(np.uint8) << k).astype(np.uint8)
    # Contrast as a model sees it: the written (JPEG) image, resized to the evaluated size.
    with Image.open(root / image_path) as written:
        cnrs = finding_cnrs(np.asarray(written), mask, [1 << k for k in range(len(rendered.findings))], image_size)
    findings_out = []
    for k, (d, phrase, cnr) in enumerate(zip(rendered.findings, report.phrases, cnrs)):
        findings_out.append(
            {
                "type": d.spec.type.value,
                "category": d.spec.ms_cxr_category(),
                "chexpert_labels": list(d.spec.chexpert_labels()),
                "sides": [s.value for s in d.spec.sides],
                "zone": d.spec.zone.value if d.spec.zone else None,
                "severity": d.spec.severity,
                "hedged": d.spec.hedged,
                "label_text": phrase,
                "boxes": [list(b) for b in d.boxes],
                "box_sides": [s.value if s else None for s in d.sides],
                "mask_bit": 1 << k,
                "cnr": None if math.isnan(cnr) else round(cnr, 3),
            }
        )
    mask_path = f"masks/{plan.dicom_id}.png"
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(root / mask_path, format="PNG", compress_level=6)

    lateral_shape = None
    if plan.lateral_dicom_id is not None:
        lateral = render_lateral(seed, plan.index, image_size)
        _save_jpeg(lateral, root / f"{plan.study_dir}/{plan.lateral_dicom_id}.jpg")
        lateral_shape = lateral.shape
    return {
        "plan": plan,
        "width": width,
        "height": height,
        "lateral_shape": lateral_shape,
        "ctr": round(rendered.cardiothoracic_ratio, 4),
        "chexpert": _chexpert_row(drawn, report.negated),
        "findings": findings_out,
        "cnrs": cnrs,  # unrounded, for the set's contrast table
        "path": image_path,
        "mask_path": mask_path,
    }


def _write_csv_gz(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    # mtime=0 and a fixed inner name: the archive bytes depend on the content only.
    with open(path, "wb") as raw, gzip.GzipFile(filename=path.name[:-3], mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(buffer.getvalue().encode("utf-8"))


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _write_tables(root: Path, records: list[dict[str, Any]]) -> None:
    split_rows, meta_rows, chexpert_rows, grounding_rows = [], [], [], []
    for r in records:
        p: StudyPlan = r["plan"]
        views = [(p.dicom_id, p.view, r["height"], r["width"])]
        if p.lateral_dicom_id is not None:
            views.append((p.lateral_dicom_id, "LATERAL", *r["lateral_shape"]))
        procedure = "CHEST (PA AND LAT)" if p.view == "PA" else "CHEST (PORTABLE AP)"
        for dicom_id, view, rows, cols in views:
            split_rows.append([dicom_id, p.study_id, p.subject_id, p.split])
            view_meaning = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}[view]
            orientation = "Erect" if p.view == "PA" else "Recumbent"
            meta_rows.append([dicom_id, p.subject_id, p.study_id, procedure, view, rows, cols, p.study_date,
                              p.study_time, procedure, view_meaning, orientation])
        chexpert_rows.append([p.subject_id, p.study_id] + [_fmt(r["chexpert"][n]) for n in CHEXPERT_LABELS])
        for f in r["findings"]:
            if f["category"] not in MS_CXR_CATEGORIES:
                continue
            for x, y, w, h in f["boxes"]:
                grounding_rows.append([p.dicom_id, f["category"], f["label_text"], r["path"], x, y, w, h,
                                       r["width"], r["height"], MS_CXR_SPLIT[p.split]])
    _write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    _write_csv_gz(
        root / "mimic-cxr-2.0.0-metadata.csv.gz",
        ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
         "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
         "PatientOrientationCodeSequence_CodeMeaning"],
        meta_rows,
    )
    _write_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_LABELS], chexpert_rows)
    with open(root / "ms_cxr_synthetic.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width",
                         "image_height", "split"])
        writer.writerows(grounding_rows)
    with open(root / "findings.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            p = r["plan"]
            line = {
                "dicom_id": p.dicom_id, "subject_id": p.subject_id, "study_id": p.study_id, "path": r["path"],
                "mask_path": r["mask_path"], "split": p.split, "view": p.view, "width": r["width"],
                "height": r["height"], "cardiothoracic_ratio": r["ctr"],
                "chexpert": {k: v for k, v in r["chexpert"].items() if v is not None}, "findings": r["findings"],
            }
            fh.write(json.dumps(line) + "\n")


_COLOURS = {
    FindingType.CONSOLIDATION.value: (255, 60, 60), FindingType.OPACITY.value: (255, 160, 0),
    FindingType.PLEURAL_EFFUSION.value: (0, 170, 255), FindingType.PNEUMOTHORAX.value: (255, 0, 255),
    FindingType.CARDIOMEGALY.value: (255, 255, 0), FindingType.NODULE.value: (0, 255, 120),
    FindingType.ATELECTASIS.value: (160, 110, 255), FindingType.EDEMA.value: (0, 230, 230),
    FindingType.SUPPORT_DEVICE.value: (200, 200, 200),
}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def write_contact_sheet(root: Path, records: list[dict[str, Any]], path: Path, columns: int = 4, cell: int = 300) -> None:
    """A grid of images with their boxes in colour and the finding names, for a person to look at."""
    shown = records[: columns * columns]
    rows = (len(shown) + columns - 1) // columns
    text_h = 64
    sheet = Image.new("RGB", (columns * cell, max(rows, 1) * (cell + text_h)), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    for n, r in enumerate(shown):
        image = Image.open(root / r["path"]).convert("RGB")
        scale = min(cell / image.width, cell / image.height)
        image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BILINEAR)
        x0, y0 = (n % columns) * cell + (cell - image.width) // 2, (n // columns) * (cell + text_h)
        sheet.paste(image, (x0, y0))
        lines = [f"{r['plan'].split}  CTR {r['ctr']:.2f}"] if r["findings"] else [f"{r['plan'].split}  normal  CTR {r['ctr']:.2f}"]
        for f in r["findings"]:
            colour = _COLOURS[f["type"]]
            for x, y, w, h in f["boxes"]:
                draw.rectangle([x0 + x * scale, y0 + y * scale, x0 + (x + w) * scale, y0 + (y + h) * scale],
                               outline=colour, width=2)
            lines.append(("possible " if f["hedged"] else "") + f["label_text"])
        for k, line in enumerate(lines[:5]):
            colour = (230, 230, 230) if k == 0 else _COLOURS[r["findings"][k - 1]["type"]]
            draw.text(((n % columns) * cell + 4, y0 + cell + 2 + 12 * k), line[:52], fill=colour, font=font)
    sheet.save(path, format="PNG")


def _summary(records: list[dict[str, Any]], image_size: int) -> dict[str, Any]:
    """Counts of the written set (labels, findings, splits) and its per-finding-type contrast table."""
    positives = Counter()
    single = Counter({c: 0 for c in FIVE_CLASSES})
    for r in records:
        labels = {k: v for k, v in r["chexpert"].items() if v is not None}
        positives.update(k for k, v in labels.items() if v == 1.0)
        cls = single_positive_class(labels)
        if cls is not None:
            single[cls] += 1
    finding_counts = Counter(f["type"] for r in records for f in r["findings"])
    cnrs: dict[str, list[float]] = {}
    for r in records:
        for f, value in zip(r["findings"], r["cnrs"]):
            cnrs.setdefault(f["type"], []).append(value)
    num = len(records)
    return {
        "num_images": num,
        "num_lateral_images": sum(r["plan"].lateral_dicom_id is not None for r in records),
        "num_subjects": len({r["plan"].subject_id for r in records}),
        "split_images": dict(Counter(r["plan"].split for r in records)),
        "normal_fraction": round(sum(r["chexpert"]["No Finding"] == 1.0 for r in records) / max(num, 1), 4),
        "findings": dict(sorted(finding_counts.items())),
        "chexpert_positive": {k: positives.get(k, 0) for k in CHEXPERT_LABELS},
        "single_positive_5x200": dict(single),
        "grounding_boxes": sum(
            len(f["boxes"]) for r in records for f in r["findings"] if f["category"] in MS_CXR_CATEGORIES
        ),
        "finding_contrast": summarise_cnrs(cnrs, image_size),
    }


def benchmark_name(version: int = BENCHMARK_VERSION) -> str:
    return f"{BENCHMARK} v{version}"


def read_metadata(root: str | Path) -> dict[str, Any]:
    """A written synthetic set's ``benchmark.json``; for a set written before it existed (it has ``findings.jsonl``
    but no metadata file) ``{"name": "synthetic-cxr v1", "version": 1}``. FileNotFoundError when ``root`` is not a
    synthetic set."""
    root = Path(root)
    if (root / METADATA_FILE).is_file():
        return json.loads((root / METADATA_FILE).read_text(encoding="utf-8"))
    if (root / "findings.jsonl").is_file():
        return {"benchmark": BENCHMARK, "version": 1, "name": benchmark_name(1)}
    raise FileNotFoundError(f"{root} is not a plan_hf.data.synthetic set (no {METADATA_FILE}, no findings.jsonl)")


def benchmark_of(root: str | Path) -> str | None:
    """The synthetic benchmark version a data folder holds ("synthetic-cxr v2"), or None for any other data."""
    try:
        return str(read_metadata(root)["name"])
    except FileNotFoundError:
        return None


def generate_synthetic(
    out_dir: str | Path,
    num_images: int,
    seed: int = 0,
    image_size: int = 224,
    workers: int = 2,
    difficulty: float = 1.0,
    lateral_fraction: float = 0.05,
    contact_sheet: bool = True,
) -> dict[str, Any]:
    """Write the synthetic benchmark under ``out_dir`` (layout in the module docstring); returns a summary.

    ``num_images`` counts frontal images (one per study); laterals come on top. Output bytes depend only on
    (``num_images``, ``seed``, ``image_size``, ``difficulty``, ``lateral_fraction``), never on ``workers``.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if difficulty <= 0:
        raise ValueError(f"difficulty must be > 0, got {difficulty}")
    start = time.perf_counter()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    plans = plan_studies(seed, num_images, lateral_fraction)
    jobs = [(str(root), seed, plan, image_size, difficulty) for plan in plans]
    if workers <= 1:
        records = [_render_study(job) for job in jobs]
    else:
        # fork where there is one: a spawned worker would re-import the package, and with it torch and
        # transformers (seconds each). Workers only use numpy and PIL, so torch's thread pools are never touched.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            records = list(pool.imap(_render_study, jobs, chunksize=max(1, min(32, num_images // (4 * workers)))))
    _write_tables(root, records)
    if contact_sheet:
        write_contact_sheet(root, records, root / "contact_sheet.png")
    summary = _summary(records, image_size)
    arguments = {"num_images": num_images, "seed": seed, "image_size": image_size, "difficulty": difficulty,
                 "lateral_fraction": lateral_fraction}
    metadata = {"benchmark": BENCHMARK, "version": BENCHMARK_VERSION, "name": benchmark_name(),
                "arguments": arguments, "lung_mask_bit": LUNG_MASK_BIT, **summary}
    (root / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    (root / "finding_contrast.md").write_text(contrast_markdown(summary["finding_contrast"]), encoding="utf-8")
    seconds = time.perf_counter() - start
    return {"benchmark": benchmark_name(), **summary, "seconds": round(seconds, 2),
            "images_per_second": round(num_images / seconds, 1) if seconds > 0 else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-images", type=int, required=True, help="number of frontal images (one per study)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224, help="nominal size S: height in [S, 1.25S]")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--difficulty", type=float, default=1.0, help="divides every finding's contrast (default 1.0)")
    parser.add_argument("--lateral-fraction", type=float, default=0.05, help="studies that also get a lateral view")
    parser.add_argument("--no-contact-sheet", action="store_true")
    args = parser.parse_args(argv)
    summary = generate_synthetic(
        args.out, args.num_images, seed=args.seed, image_size=args.image_size, workers=args.workers,
        difficulty=args.difficulty, lateral_fraction=args.lateral_fraction, contact_sheet=not args.no_contact_sheet,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "finding_contrast"}, indent=2))
    print(contrast_markdown(summary["finding_contrast"]))
    return summary


if __name__ == "__main__":
    main()
