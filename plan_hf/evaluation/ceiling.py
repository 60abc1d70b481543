"""The supervised ceiling of a grounding table: a segmentation model trained on the synthetic benchmark's own lesion
masks, one output channel per MS-CXR phrase category, its maps scored on the grounding phrases like a model's heat
maps (`plan_hf.evaluation.references.SupervisedCeiling` loads it for `eval.run`).

Training is the fine-tuning protocol of `plan_hf.downstream.finetune` (`PlanForSegmentation`, Trainer, soft Dice +
0.1 BCE) on every training image of the set, with channel k the union of the masks of the image's findings of
category k. `python -m benchmarks.supervised_ceiling` and `plan-demo` call it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..data.labels import MS_CXR_CATEGORIES
from ..data.synthetic import benchmark_of
from ..downstream.data import SegmentationCollator, load_segmentation_data
from ..downstream.finetune import FinetuneConfig, build_image_processor, build_model, train
from .data import find_ms_cxr_csv, grounding_items
from .grounding import evaluate_grounding
from .references import CEILING_FILE, SupervisedCeiling, position_priors

LESION_SHARE = 0.02  # about the share of an image one finding category covers


def train_ceiling(data: Path, out: Path, steps: int, model: str = "random", config: str | None = "tiny-resnet",
                  image_size: int = 224, batch_size: int = 16, learning_rate: float = 1e-3, seed: int = 0,
                  head_dim: int = 64) -> tuple[SupervisedCeiling, dict[str, Any]]:
    """Train the per-category segmentation model on `data`'s training split and save it to ``out/model``."""
    benchmark = benchmark_of(data)
    if benchmark is None:
        raise ValueError(f"{data} is not a plan_hf.data.synthetic set: the ceiling is trained on its lesion masks")
    cfg = FinetuneConfig(task="segmentation", model=model, config=config if model == "random" else None,
                         dataset="synthetic", data=str(data), out=str(out), max_steps=steps, batch_size=batch_size,
                         learning_rate=learning_rate, image_size=image_size, seed=seed, head_dim=head_dim,
                         save_model=False)
    categories = list(MS_CXR_CATEGORIES)
    sets = load_segmentation_data("synthetic", data, categories=categories)
    processor = build_image_processor(cfg)
    network = build_model(cfg, len(categories), categories)
    if not (Path(model) / CEILING_FILE).is_file():  # a new head (an existing ceiling's is trained further)
        # Start every channel at the lesions' pixel share (RetinaNet's prior initialisation): from the default 0.5
        # the Dice term stays flat for hundreds of steps while the background is pushed down first.
        torch.nn.init.constant_(network.mask_head[-1].bias, math.log(LESION_SHARE / (1 - LESION_SHARE)))
    _, training = train(network, sets.train, SegmentationCollator(processor), cfg)
    export = out / "model"
    network.save_pretrained(export)
    processor.save_pretrained(export)
    (export / CEILING_FILE).write_text(json.dumps({"benchmark": benchmark, "categories": categories,
                                                   "steps": steps, "model": model, "config": cfg.config}, indent=2))
    return SupervisedCeiling(network, processor, benchmark), {"benchmark": benchmark, "num_train": len(sets.train),
                                                              **training}


def score(ceiling: SupervisedCeiling | None, data: Path, split: str = "test", n_boot: int = 1000) -> dict[str, Any]:
    """Grounding metrics of the ceiling (when given) and of the position priors on `split`'s phrases."""
    csv_path = find_ms_cxr_csv(data)
    items = grounding_items(csv_path, data, split)
    references = {"supervised_ceiling": ceiling} if ceiling is not None else {}
    references.update(position_priors(csv_path, data))
    return evaluate_grounding(None, None, items, methods=(), references=references, n_boot=n_boot,
                              progress=False).metrics


__all__ = ["LESION_SHARE", "score", "train_ceiling"]
