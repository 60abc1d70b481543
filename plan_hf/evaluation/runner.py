"""Run an evaluation suite end to end: load the sets, run what applies, write `metrics.json`, `report.md` and PNGs.

Suites and what each runs (data: ``--data_dir DIR``):

========================  ===========================================================================================
``synthetic``             a `plan_hf.data.synthetic` folder: grounding on ``ms_cxr_synthetic.csv`` (the split), and on
                          the split's frontal images zero-shot (5-class single-positive multi-class + per-finding
                          binary) and retrieval (paired reports; class-aware on the 5-class set)
``mimic``                 MIMIC-CXR-JPG + reports: the same minus grounding
``chexpert5x200``         a CheXpert folder: 5x200 drawn from train.csv (manifest written to the output), multi-class
                          zero-shot, class-aware retrieval against the classes' prompt sentences
``ms-cxr``                MIMIC-CXR-JPG (the CSV's paths are under it) holding ``MS_CXR_Local_Alignment_v*.csv``
                          (or ``ms_cxr_csv`` elsewhere): grounding
``rsna`` / ``siim``       binary zero-shot (pneumonia / pneumothorax)
``image-text``            any image-report source of `plan_hf.data.sources` (``dataset``, ``data_dir``,
                          ``image_column``, ``text_column``): retrieval; with CheXpert-style ``label_columns`` also
                          the binary zero-shot of those findings (and the 5-class one when the five are there)
========================  ===========================================================================================

``metrics.json`` keys (NaN is written as null, an infinite CNR as the string "inf"):

- ``suite, model, split, seed, n_boot, max_samples, objectives, plan_hf_version, benchmark, seconds {stage: s},
  pictures {name: file}``; ``benchmark`` is the synthetic set's version ("synthetic-cxr v2", null for other data):
  numbers of different versions are never compared (`require_same_benchmark`)
- ``grounding {method: {macro {cnr, miou, pointing}, micro {...}, per_category {name: {count, cnr, miou, pointing}},
  ci {metric: {low, high}}, count, num_undefined, chance_pointing, same_image_map_correlation}}`` for methods
  ``local`` / ``global`` and the reference rows of `plan_hf.evaluation.references` (``position_prior``,
  ``position_prior_words``, ``grid_ceiling`` at the model's local grid, and ``supervised_ceiling`` when a trained
  ceiling is given)
- ``zero_shot.multiclass {num_images, class_counts, accuracy, macro_auc, macro_f1, per_class {name: {auc, f1}}, ci}``
- ``zero_shot.binary {num_images, macro {auc, f1_max, accuracy}, findings {name: {num_positive, num_negative, auc,
  f1_max, threshold, accuracy, ci}}}``
- ``retrieval {num_images, num_texts, i2t_recall@{1,5,10}, i2t_median_rank, t2i_..., num_duplicate_texts, ci}``
- ``class_retrieval {num_images, num_texts, texts, i2t_precision@{1,5,10}, t2i_precision@{1,5,10}, ci}``

Everything is seeded (subsamples, example choice, bootstrap); the model runs in eval mode without dropout.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..data.loaders import CHEXPERT_5X200_CLASSES
from ..prompts import prompt_sets
from .data import (
    BINARY_FINDINGS,
    ImageSet,
    binary_labels,
    chexpert_5x200_set,
    dicom_binary_set,
    find_ms_cxr_csv,
    grounding_items,
    mimic_image_set,
    single_positive_indices,
    source_image_set,
)
from ..data.sources import PairSource
from ..data.synthetic import benchmark_of
from ..grounding import grid_heatmaps
from ..modeling_plan import encode_image_tower
from .embed import embed_images, inference_mode
from .grounding import GroundingItem, HeatmapMethod, ReferenceFn, available_methods, evaluate_grounding
from .references import SupervisedCeiling, grid_ceiling, position_priors
from .plots import HeatmapPanel, RetrievalRow, plot_grounding_grid, plot_retrieval_strip, plot_roc_curves
from .report import render_report
from .retrieval import class_retrieval, paired_retrieval
from .zero_shot import ZeroShotResult, zero_shot_binary, zero_shot_multiclass


class Suite(str, Enum):
    SYNTHETIC = "synthetic"
    MIMIC = "mimic"
    CHEXPERT_5X200 = "chexpert5x200"
    MS_CXR = "ms-cxr"
    RSNA = "rsna"
    SIIM = "siim"
    IMAGE_TEXT = "image-text"


@dataclass
class EvalSettings:
    suite: Suite
    data_dir: Path
    out_dir: Path
    split: str = "test"
    max_samples: int | None = None
    batch_size: int = 32
    seed: int = 0
    n_boot: int = 1000
    grounding_methods: tuple[HeatmapMethod, ...] | None = None  # None: every method the model supports
    num_examples: int = 8
    progress: bool = True
    model_name: str = ""
    ms_cxr_csv: Path | None = None  # the MS-CXR box CSV (default: found in data_dir); paths in it are under data_dir
    reference_rows: bool = True  # position priors and the grid ceiling beside the model's grounding maps
    supervised_ceiling: Path | None = None  # a `benchmarks.supervised_ceiling` export: one more reference row
    source: PairSource | None = None  # image-text: where the pairs come from
    label_columns: tuple[str, ...] = ()  # image-text: label columns (1.0 positive) for zero-shot


def load_model(path: str, device: str = "cpu"):
    """(model, processor) through the Auto classes (plan_hf registers model_type "plan"), in eval mode on `device`."""
    import plan_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(path).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def metrics_benchmark(metrics: dict[str, Any]) -> str | None:
    """The benchmark version a metrics.json was measured on; a synthetic-suite file written before versions were
    recorded was measured on v1."""
    if "benchmark" in metrics:
        return metrics["benchmark"]
    return "synthetic-cxr v1" if metrics.get("suite") == Suite.SYNTHETIC.value else None


def require_same_benchmark(versions: dict[str, str | None]) -> str | None:
    """The one benchmark version of {what: version}; ValueError naming each entry when they differ."""
    if len(set(versions.values())) > 1:
        listed = ", ".join(f"{name}: {version or 'not a synthetic set'}" for name, version in versions.items())
        raise ValueError(f"numbers measured on different benchmark versions cannot be compared ({listed}); "
                         "evaluate (or train) them again on one set")
    return next(iter(versions.values()), None)


def to_json(value: Any) -> Any:
    """JSON-ready: numpy scalars/arrays to Python, NaN to None, infinities to "inf"/"-inf"."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Enum):
        return value.value
    return value


class _Run:
    """State of one evaluation run: the settings, the output folder, timings, pictures."""

    def __init__(self, model, processor, settings: EvalSettings):
        self.model, self.processor, self.settings = model, processor, settings
        self.out = Path(settings.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}
        self.pictures: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self.benchmark = benchmark_of(settings.data_dir)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)

    def picture(self, name: str, path: Path) -> None:
        self.pictures[name] = path.relative_to(self.out).as_posix()

    # -- protocols ---------------------------------------------------------------------------------------------------
    def feature_grid(self, item: GroundingItem, methods: list[HeatmapMethod]) -> int:
        """Side of the grid the model's maps live on: the local maps' grid, else the tower's last grid."""
        if HeatmapMethod.LOCAL in methods:
            batches = grid_heatmaps(self.model, self.processor, [item.image], [item.phrase])
            _, grids = next(batches)  # (1, h, w)
            batches.close()  # leaves inference mode
            return int(grids.shape[-1])
        pixels = self.processor.image_processor([item.image], return_tensors="pt")["pixel_values"]
        with inference_mode(self.model):
            return int(encode_image_tower(self.model.vision_model, pixel_values=pixels).grid_size[-1])

    def grounding_references(self, csv_path: Path, item: GroundingItem, methods: list[HeatmapMethod]
                             ) -> dict[str, ReferenceFn]:
        s = self.settings
        references: dict[str, ReferenceFn] = {}
        if s.reference_rows:
            references.update(position_priors(csv_path, s.data_dir))
            references["grid_ceiling"] = grid_ceiling(self.processor.image_processor, self.feature_grid(item, methods))
        if s.supervised_ceiling is not None:
            ceiling = SupervisedCeiling.load(s.supervised_ceiling)
            require_same_benchmark({f"supervised ceiling {s.supervised_ceiling}": ceiling.benchmark,
                                    f"evaluated data {s.data_dir}": self.benchmark})
            references["supervised_ceiling"] = ceiling
        return references

    def grounding(self, items: list[GroundingItem], csv_path: Path) -> None:
        s = self.settings
        supported = available_methods(self.model)
        methods = [m for m in (s.grounding_methods or supported) if m in supported]
        if not items or not methods:
            return
        with self.stage("grounding"):
            references = self.grounding_references(csv_path, items[0], methods)
            result = evaluate_grounding(self.model, self.processor, items, methods, batch_size=min(s.batch_size, 16),
                                        n_boot=s.n_boot, seed=s.seed, num_examples=s.num_examples,
                                        progress=s.progress, references=references)
        self.metrics["grounding"] = result.metrics
        # Pictures of the model's maps and of the supervised ceiling's; the priors and grid ceiling show nothing new.
        pictured = [m.value for m in methods] + [name for name in references if name == "supervised_ceiling"]
        for method in pictured:
            scores = {r["index"]: r for r in result.records[method]}
            panels = [HeatmapPanel(items[i].image, result.heatmaps[method][i], items[i].boxes, items[i].phrase,
                                   scores[i]["cnr"], scores[i]["pointing"]) for i in result.shown]
            path = plot_grounding_grid(panels, self.out / f"grounding_{method}.png",
                                       title=f"{s.model_name}: {method} heat maps, true boxes in green")
            self.picture(f"grounding_{method}", path)

    def zero_shot_multiclass(self, images: ImageSet, embeds: np.ndarray | None) -> ZeroShotResult:
        s = self.settings
        with self.stage("zero_shot"):
            result = zero_shot_multiclass(self.model, self.processor, images.images, images.labels,
                                          prompt_sets(images.label_names), batch_size=s.batch_size, n_boot=s.n_boot,
                                          seed=s.seed, image_embeds=embeds, progress=s.progress)
        self.metrics.setdefault("zero_shot", {})["multiclass"] = result.metrics
        curves = {name: (result.labels == c, result.scores[:, c], result.metrics["per_class"][name]["auc"])
                  for c, name in enumerate(result.class_names)}
        self.picture("roc_multiclass", plot_roc_curves(curves, self.out / "roc_multiclass.png",
                                                       "Zero-shot multi-class (one-vs-rest)"))
        return result

    def zero_shot_binary(self, images: ImageSet, findings: list[str], labels: np.ndarray,
                         embeds: np.ndarray | None) -> None:
        s = self.settings
        with self.stage("zero_shot"):
            result = zero_shot_binary(self.model, self.processor, images.images, labels, prompt_sets(findings),
                                      batch_size=s.batch_size, n_boot=s.n_boot, seed=s.seed, image_embeds=embeds,
                                      progress=s.progress)
        self.metrics.setdefault("zero_shot", {})["binary"] = result.metrics
        curves = {}
        for c, name in enumerate(findings):
            known = ~np.isnan(result.labels[:, c])
            curves[name] = (result.labels[known, c] == 1, result.scores[known, c],
                            result.metrics["findings"][name]["auc"])
        self.picture("roc_binary", plot_roc_curves(curves, self.out / "roc_binary.png", "Zero-shot binary findings"))

    def retrieval(self, images: ImageSet, embeds: np.ndarray | None, num_queries: int = 4) -> None:
        s = self.settings
        with self.stage("retrieval"):
            result = paired_retrieval(self.model, self.processor, images.images, images.texts,
                                      batch_size=s.batch_size, n_boot=s.n_boot, seed=s.seed, image_embeds=embeds,
                                      progress=s.progress)
        self.metrics["retrieval"] = result.metrics
        similarity = result.similarity  # (N_img, N_txt)
        queries = np.random.default_rng(s.seed).choice(len(images), size=min(num_queries, len(images)), replace=False)
        rows = []
        for j in sorted(queries.tolist()):
            order = np.argsort(-similarity[:, j], kind="stable")
            hits = result.positives[order, j]
            rows.append(RetrievalRow(query=images.texts[j], images=[images.images[i] for i in order[:5]],
                                     hits=hits[:5].tolist(), rank_of_positive=int(np.flatnonzero(hits)[0]) + 1))
        self.picture("retrieval_strip", plot_retrieval_strip(rows, self.out / "retrieval_strip.png",
                                                             "Text → image: each report's top-5 images"))

    def class_retrieval(self, images: ImageSet, texts: list[str], text_labels: list[int], description: str,
                        embeds: np.ndarray | None) -> None:
        s = self.settings
        with self.stage("retrieval"):
            result = class_retrieval(self.model, self.processor, images.images, images.labels, texts, text_labels,
                                     batch_size=s.batch_size, n_boot=s.n_boot, seed=s.seed, image_embeds=embeds,
                                     progress=s.progress)
        self.metrics["class_retrieval"] = {**result.metrics, "texts": description}

    # -- suites ------------------------------------------------------------------------------------------------------
    def mimic_style(self, root: Path) -> None:
        """Zero-shot and retrieval on a MIMIC-CXR-style split (the synthetic set is one)."""
        s = self.settings
        with self.stage("load"):
            split = mimic_image_set(root, s.split, s.max_samples, s.seed)
        self.paired(split)

    def paired(self, split: ImageSet) -> None:
        """Retrieval on image-report pairs; zero-shot on the labels they have (the 5-class task when the five
        CheXpert 5x200 classes are among them, binary on each of `BINARY_FINDINGS` there, else on every label)."""
        s = self.settings
        if len(split) == 0:
            return
        with self.stage("embed_images"):
            embeds = embed_images(self.model, self.processor, split.images, s.batch_size, progress=s.progress)
        if split.labels is None:
            self.retrieval(split, embeds)
            return
        names = list(split.label_names)
        has_five = all(name in names for name in CHEXPERT_5X200_CLASSES)
        indices, classes = single_positive_indices(split.labels, names, seed=s.seed) if has_five else ([], None)
        if len(indices):
            five = split.subset(indices)
            five.labels, five.label_names = classes, list(CHEXPERT_5X200_CLASSES)
            self.zero_shot_multiclass(five, embeds[indices])
            self.class_retrieval(five, five.texts, classes.tolist(), "each image's own report, labelled with its "
                                 "class", embeds[indices])
        findings = [name for name in BINARY_FINDINGS if name in names] or names
        self.zero_shot_binary(split, findings, binary_labels(split.labels, names, findings), embeds)
        self.retrieval(split, embeds)

    def run(self) -> dict[str, Any]:
        s = self.settings
        data = Path(s.data_dir)
        if s.suite in (Suite.SYNTHETIC, Suite.MS_CXR):
            with self.stage("load"):
                csv_path = s.ms_cxr_csv or find_ms_cxr_csv(data)
                items = grounding_items(csv_path, data, s.split, s.max_samples, s.seed)
            self.grounding(items, csv_path)
        if s.suite in (Suite.SYNTHETIC, Suite.MIMIC):
            self.mimic_style(data)
        if s.suite is Suite.CHEXPERT_5X200:
            n_per_class = 200 if s.max_samples is None else max(1, s.max_samples // len(CHEXPERT_5X200_CLASSES))
            with self.stage("load"):
                five = chexpert_5x200_set(data, self.out / "chexpert_5x200_manifest.csv", n_per_class, s.seed)
            with self.stage("embed_images"):
                embeds = embed_images(self.model, self.processor, five.images, s.batch_size, progress=s.progress)
            self.zero_shot_multiclass(five, embeds)
            prompts = prompt_sets(CHEXPERT_5X200_CLASSES)
            texts = [sentence for p in prompts.values() for sentence in p.positive]
            labels = [c for c, p in enumerate(prompts.values()) for _ in p.positive]
            self.class_retrieval(five, texts, labels, "the classes' positive prompt sentences", embeds)
        if s.suite is Suite.IMAGE_TEXT:
            with self.stage("load"):
                pairs = source_image_set(s.source, s.split, s.label_columns, s.max_samples, s.seed)
            self.paired(pairs)
        if s.suite in (Suite.RSNA, Suite.SIIM):
            with self.stage("load"):
                images = dicom_binary_set(s.suite.value, data, s.max_samples, s.seed)
            self.zero_shot_binary(images, list(images.label_names), images.labels, None)
        return self.finish()

    def finish(self) -> dict[str, Any]:
        import plan_hf
        from ..presets import objectives_of

        s = self.settings
        config = getattr(self.model, "config", None)
        try:
            objectives = objectives_of(config)
        except (AttributeError, TypeError):
            objectives = []
        header = {"suite": s.suite.value, "model": s.model_name, "split": s.split, "seed": s.seed,
                  "n_boot": s.n_boot, "max_samples": s.max_samples, "objectives": objectives,
                  "plan_hf_version": plan_hf.__version__, "benchmark": self.benchmark}
        metrics = to_json({**header, **self.metrics, "seconds": self.seconds, "pictures": self.pictures})
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        (self.out / "report.md").write_text(render_report(metrics, self.pictures))
        return metrics


def run_evaluation(model, processor, settings: EvalSettings) -> dict[str, Any]:
    """Run `settings.suite` with a loaded model; returns the metrics dict written to `settings.out_dir`."""
    torch.manual_seed(settings.seed)
    return _Run(model, processor, settings).run()


__all__ = ["EvalSettings", "Suite", "load_model", "metrics_benchmark", "require_same_benchmark", "run_evaluation",
           "to_json"]
