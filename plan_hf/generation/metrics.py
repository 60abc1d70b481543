"""Report-generation metrics as the captioning and radiology report-generation literature computes them: BLEU-1..4,
METEOR and ROUGE-L from `pycocoevalcap` (the MS-COCO caption evaluation code that R2Gen, CMN and PLACE-style papers
report with).

- BLEU: corpus-level (clipped n-gram counts and lengths summed over the test set), brevity penalty against the
  closest reference length, tiny smoothing constants in each n-gram precision (an identical pair scores 1 - ~1e-9).
- METEOR 1.5: the jar bundled in pycocoevalcap (needs a `java` on PATH; its English paraphrase table ships with the
  package, so nothing is downloaded -- unlike NLTK's METEOR, which needs the WordNet corpus from the network).
  Corpus-level score from the pooled alignment statistics, not the mean of per-report scores.
- ROUGE-L: LCS-based F-measure with beta = 1.2, averaged over reports.

Texts are normalised the same way on both sides before scoring (`normalize_report`): lower case, words and numbers
only, punctuation dropped -- what the COCO PTB tokenizer does, without its Java start-up.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
METRIC_KEYS = (*BLEU_KEYS, "METEOR", "ROUGE-L")
PIP_PACKAGES = ("pycocoevalcap>=1.2",)

_TOKEN = re.compile(r"[a-z0-9]+")
_meteor_lock = threading.Lock()
_meteor: Any = None  # one METEOR Java process per Python process: its start-up (paraphrase table) takes ~10 s


def normalize_report(text: str) -> str:
    """Lower-cased words and numbers joined by single spaces ("Heart size is normal.\\n" -> "heart size is normal")."""
    return " ".join(_TOKEN.findall(text.lower()))


def pycocoevalcap_available() -> bool:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return False
    return True


def meteor_unavailable_reason() -> str | None:
    """Why METEOR cannot be computed here (None when it can)."""
    if not pycocoevalcap_available():
        return "pycocoevalcap is not installed (pip install 'pycocoevalcap>=1.2')"
    if shutil.which("java") is None:
        return "METEOR runs pycocoevalcap's meteor-1.5.jar and needs `java` on PATH (Java 8+)"
    return None


def _meteor_scorer():
    global _meteor
    if _meteor is None or _meteor.meteor_p.poll() is not None:  # first use, or the Java process died
        from pycocoevalcap.meteor.meteor import Meteor

        _meteor = Meteor()
    return _meteor


def warm_up_meteor() -> bool:
    """Start the METEOR Java process now, without waiting for it (it loads its paraphrase table, ~15 s of CPU, while
    the caller trains or generates); False when METEOR is unavailable here."""
    if meteor_unavailable_reason() is not None:
        return False
    with _meteor_lock:
        _meteor_scorer()  # Popen returns at once; the first score waits until the jar is ready
    return True


def _as_reference_lists(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def report_generation_metrics(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    meteor: bool = True,
) -> dict[str, float | None]:
    """BLEU-1..4, METEOR and ROUGE-L of generated reports against one (or several) reference report(s) each.

    METEOR is None (with a warning) when `meteor=False` or Java is missing; the other metrics need only Python.
    """
    if not pycocoevalcap_available():
        raise ImportError("report_generation_metrics needs pycocoevalcap: pip install 'pycocoevalcap>=1.2' "
                          "(or pip install 'plan-hf[generation]')")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    reference_lists = _as_reference_lists(references)
    if len(predictions) != len(reference_lists):
        raise ValueError(f"{len(predictions)} predictions but {len(reference_lists)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    # pycocoevalcap's format: {id: [hypothesis]} and {id: [reference, ...]}, all pre-tokenized, space-separated.
    hypotheses = {i: [normalize_report(p)] for i, p in enumerate(predictions)}
    truths = {i: [normalize_report(r) for r in refs] for i, refs in enumerate(reference_lists)}

    bleu, _ = Bleu(4).compute_score(truths, hypotheses, verbose=0)
    rouge, _ = Rouge().compute_score(truths, hypotheses)
    scores: dict[str, float | None] = {key: float(value) for key, value in zip(BLEU_KEYS, bleu)}
    scores["METEOR"] = None
    reason = meteor_unavailable_reason() if meteor else "METEOR switched off"
    if reason is None:
        # METEOR's stdio protocol reads one line per report: an empty hypothesis would still be one line, but a
        # "|||" would split it, and normalize_report has already removed every non-alphanumeric character.
        with _meteor_lock:
            value, _ = _meteor_scorer().compute_score(truths, hypotheses)
        scores["METEOR"] = float(value)
    else:
        logger.warning("METEOR not computed: %s", reason)
    scores["ROUGE-L"] = float(rouge)
    return scores


__all__ = [
    "BLEU_KEYS",
    "METRIC_KEYS",
    "PIP_PACKAGES",
    "meteor_unavailable_reason",
    "normalize_report",
    "pycocoevalcap_available",
    "report_generation_metrics",
    "warm_up_meteor",
]
