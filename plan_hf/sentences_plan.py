"""Rule-based sentence splitting for radiology reports.

The processor turns token offsets into ``sentence_ids`` with :func:`sentence_spans`; the data code builds training
text with :func:`split_sentences`. This file uses the standard library only and imports nothing of ``plan_hf``:
``save_pretrained`` copies it next to the weights for ``trust_remote_code`` loading.

Rules (every one of them is there because reports break general-purpose splitters):

- A sentence ends at ``.``, ``!`` or ``?`` (a run of them, plus closing quotes/brackets) followed by white space or
  the end of the text. A full stop *inside* a token never ends one: decimals (``1.5 cm``), ``3.5x2.1``, ``lt.abd``.
- Known abbreviations never end a sentence (``e.g.``, ``i.e.``, ``Dr.``, ``approx.``, ``vs.``, ``St.``, ``pt.``,
  single initials, ``No.`` before a number); ``etc.``, ``a.m.`` and ``p.m.`` end one only when the next word starts
  with a capital letter (``at 5 p.m. and compared`` stays whole, ``at 5 p.m. Dr. X was paged`` splits).
- Reports are hard-wrapped (MIMIC-CXR wraps at ~78 characters), so a single line break is just white space. A blank
  line, and a line that starts with a list marker, always start a new sentence even without a full stop.
- List markers (``1.``, ``2)``, ``(3)``, ``-``, ``*``, ``•``) at the start of a sentence are **dropped**:
  ``"1. Small left effusion. 2. No pneumothorax."`` gives ``["Small left effusion.", "No pneumothorax."]``.
- De-identification blanks (``___``, ``XXXX``) are ordinary words and stay intact.
- Pieces with no letter, digit or underscore (a stray ``.``) are dropped; white space inside a sentence is
  collapsed to single spaces.

``split_sentences(text) == [" ".join(text[s:e].split()) for s, e in sentence_spans(text)]`` always holds.
"""

from __future__ import annotations

import re

__all__ = ["split_sentences", "sentence_spans"]

# Abbreviations (lower case, without their final full stop) after which a full stop never ends a sentence.
_NEVER_FINAL = frozenset(
    {
        "e.g", "i.e", "eg", "ie", "cf", "vs", "v", "approx", "dr", "drs", "mr", "mrs", "ms", "prof", "st", "fig",
        "pt", "pts", "lt", "rt", "hx", "dx", "sx", "tx", "yo", "y.o", "appt", "dept", "incl", "esp", "resp",
    }
)
# Abbreviations that often end a sentence: a full stop after them ends one only before a capitalised word.
_FINAL_IF_CAPITAL = frozenset({"etc", "a.m", "p.m", "am", "pm"})

# A sentence terminator: a run of . ! ? plus closing quotes/brackets, then white space or the end of the text.
_TERMINATOR = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
# A list marker opening a sentence: "1." "12)" "(3)" "-" "*" "•" before white space, or "1." glued to a capital
# ("1.Increased opacity", seen in Open-i); never "1.5".
_LIST_MARKER = re.compile(r"(?:\(?\d{1,2}[.)]|[-*•])(?=\s)|\d{1,2}\.(?=[A-Z])")
# A bare number before a full stop at the start of a sentence: that full stop belongs to a list marker.
_MARKER_NUMBER = re.compile(r"\(?\d{1,2}")
# Places that always start a new sentence: a blank line, or a line break followed by a list marker.
_HARD_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*|\n[ \t\r\f\v]*(?=(?:\(?\d{1,2}[.)]|[-*•])\s)")
_WORD_CHAR = re.compile(r"\w")
_NON_SPACE = re.compile(r"\S")


def _ends_sentence(text: str, start: int, term_start: int, term_end: int, seg_end: int) -> bool:
    """Decide whether the terminator at ``text[term_start:term_end]`` closes the sentence that began at ``start``."""
    if text[term_start] != ".":  # "!" and "?" are unambiguous
        return True
    before = text[start:term_start].split()
    if not before:
        return True
    if len(before) == 1 and _MARKER_NUMBER.fullmatch(before[0]):
        return False  # "2." opening a sentence is a list marker, not a sentence
    token = before[-1].lstrip("(\"'[").lower()
    following = _NON_SPACE.search(text, term_end, seg_end)
    next_char = following.group(0) if following else ""
    if token in _NEVER_FINAL:
        return False
    if len(token) == 1 and token.isalpha():  # an initial: "Dr. J. Smith"
        return False
    if token == "no" and next_char.isdigit():  # "No. 5"
        return False
    if token in _FINAL_IF_CAPITAL:
        return next_char.isupper()
    return True


def _strip_piece(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Trim white space and leading list markers; ``None`` when nothing worth a sentence is left."""
    while True:
        while start < end and text[start].isspace():
            start += 1
        marker = _LIST_MARKER.match(text, start, end)
        if marker is None:
            break
        start = marker.end()
    while end > start and text[end - 1].isspace():
        end -= 1
    if start >= end or not _WORD_CHAR.search(text, start, end):
        return None
    return start, end


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of each sentence in the **original** ``text`` (see the module rules)."""
    spans: list[tuple[int, int]] = []
    segment_starts = [0] + [m.end() for m in _HARD_BREAK.finditer(text)]
    segment_ends = [m.start() for m in _HARD_BREAK.finditer(text)] + [len(text)]
    for seg_start, seg_end in zip(segment_starts, segment_ends):
        piece_start = seg_start
        for term in _TERMINATOR.finditer(text, seg_start, seg_end):
            if _ends_sentence(text, piece_start, term.start(), term.end(), seg_end):
                piece = _strip_piece(text, piece_start, term.end())
                if piece is not None:
                    spans.append(piece)
                piece_start = term.end()
        piece = _strip_piece(text, piece_start, seg_end)
        if piece is not None:
            spans.append(piece)
    return spans


def split_sentences(text: str) -> list[str]:
    """Split a report (or one of its sections) into sentences, white space normalised (see the module rules)."""
    return [" ".join(text[start:end].split()) for start, end in sentence_spans(text)]
