"""Turning files on disk into training and evaluation data: report parsing, loaders of the published layouts into
`datasets`, the bad-row policy, the model-batch collator, and the synthetic CXR benchmark."""

from .bad_rows import BadRowReason, LoadReport, validate_images
from .collator import PlanCollator
from .labels import CHEXPERT_5X200_CLASSES, CHEXPERT_LABELS, MS_CXR_CATEGORIES
from .loaders import (
    build_chexpert_5x200,
    load_chexpert,
    load_image_text,
    load_mimic_cxr,
    load_ms_cxr,
    load_rsna,
    load_siim,
)
from .reports import parse_openi_xml, parse_report, report_text, sentence_spans, split_sentences
from .rle import rle_decode, rle_encode
from .sources import PairSource, PairStream, load_pairs, stream_pairs

__all__ = [
    "BadRowReason",
    "CHEXPERT_5X200_CLASSES",
    "CHEXPERT_LABELS",
    "LoadReport",
    "MS_CXR_CATEGORIES",
    "PairSource",
    "PairStream",
    "PlanCollator",
    "build_chexpert_5x200",
    "load_chexpert",
    "load_image_text",
    "load_mimic_cxr",
    "load_ms_cxr",
    "load_pairs",
    "load_rsna",
    "load_siim",
    "parse_openi_xml",
    "parse_report",
    "report_text",
    "rle_decode",
    "rle_encode",
    "sentence_spans",
    "split_sentences",
    "stream_pairs",
    "validate_images",
]
