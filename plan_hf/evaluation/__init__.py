"""Evaluation protocols as library functions: phrase grounding (MS-CXR), zero-shot classification, image-text
retrieval, their pictures and reports, and the suite runner behind `python -m eval.run`."""

from .grounding import GroundingItem, GroundingResult, HeatmapMethod, evaluate_grounding
from .retrieval import class_retrieval, class_retrieval_evaluation, paired_retrieval, retrieval_evaluation
from .runner import EvalSettings, Suite, load_model, run_evaluation
from .zero_shot import ZeroShotResult, class_embeddings, zero_shot_binary, zero_shot_multiclass

__all__ = [
    "EvalSettings",
    "GroundingItem",
    "GroundingResult",
    "HeatmapMethod",
    "Suite",
    "ZeroShotResult",
    "class_embeddings",
    "class_retrieval",
    "class_retrieval_evaluation",
    "evaluate_grounding",
    "load_model",
    "paired_retrieval",
    "retrieval_evaluation",
    "run_evaluation",
    "zero_shot_binary",
    "zero_shot_multiclass",
]
