"""Radiology report parsing: MIMIC-CXR free-text reports, Open-i (Indiana University) XML, and training text.

`parse_report` returns ``{section name: text}`` in document order. Section names are lower case with single spaces;
common variants are folded onto one name (`SECTION_ALIASES`: ``CONCLUSION`` and ``IMPRESSIONS`` become
``impression``, ``CLINICAL HISTORY`` becomes ``history``, ...), the same mapping the MIMIC-CXR authors' section parser
uses. Text before the first header is kept under ``"preamble"``; the ``FINAL REPORT`` title line is dropped.
Sections with no text are left out; a header seen twice has its texts joined with a blank line.

A header is recognised when it is

- a known name (`KNOWN_SECTIONS`, any case) at the start of a line, followed by ``:`` or alone on its line;
- a known name in UPPER CASE anywhere, followed by ``:`` (``"INDICATION: Cough. FINDINGS: Clear."``);
- any other UPPER-CASE phrase followed by ``:`` at the start of a paragraph (first line, or after a blank line).
  Inside a paragraph such a phrase (``"NG TUBE: tip in the stomach"``) stays body text, so findings keep it.

Section text is white-space normalised but keeps structure: hard-wrapped lines are re-joined with single spaces,
list items start a new line and paragraphs are separated by a blank line, so `split_sentences` still finds the
boundaries of list items and paragraphs that lack a full stop.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypedDict

from ..sentences_plan import sentence_spans, split_sentences

__all__ = [
    "KNOWN_SECTIONS",
    "SECTION_ALIASES",
    "OpenIReport",
    "TEXT_SEPARATOR",
    "join_text",
    "parse_openi_xml",
    "parse_report",
    "report_text",
    "sentence_spans",
    "split_sentences",
]

# Variant header → canonical section name (lower case).
SECTION_ALIASES: dict[str, str] = {
    "exam": "examination",
    "type of examination": "examination",
    "indications": "indication",
    "clinical indication": "indication",
    "reason for examination": "indication",
    "reason for exam": "indication",
    "clinical history": "history",
    "patient history": "history",
    "clinical information": "history",
    "comparisons": "comparison",
    "comparison exam": "comparison",
    "reference exam": "comparison",
    "finding": "findings",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "findings and impression": "impression",
    "impression and findings": "impression",
    "recommendation": "recommendations",
    "recommendation(s)": "recommendations",
    "provisional findings impression (pfi)": "pfi",
}
# Names recognised as headers in any case and anywhere in upper case (canonical names and their variants).
KNOWN_SECTIONS: frozenset[str] = frozenset(
    {
        "examination", "indication", "history", "technique", "comparison", "findings", "impression", "wet read",
        "notification", "recommendations", "addendum", "pfi",
    }
    | set(SECTION_ALIASES)
)
# Sections that describe the exam rather than the image: never used as fallback training text.
_NON_FINDING_SECTIONS = frozenset({"examination", "indication", "history", "technique", "comparison", "notification"})


def _alternation(names: Iterable[str]) -> str:
    # Longest first, so that "findings and impression" wins over "findings"; any run of blanks between words.
    return "|".join(re.escape(name).replace(r"\ ", r"[ \t]+") for name in sorted(names, key=len, reverse=True))


_TITLE_LINE = re.compile(r"^[ \t]*(?:final|preliminary)[ \t]+report[ \t]*$", re.IGNORECASE | re.MULTILINE)
_HEADER_PATTERNS = (
    # known name at a line start, any case, with a colon or alone on its line
    re.compile(rf"^[ \t]*(?P<name>{_alternation(KNOWN_SECTIONS)})[ \t]*(?::|$)", re.IGNORECASE | re.MULTILINE),
    # known name in upper case anywhere (inline), with a colon
    re.compile(rf"(?<![\w(])(?P<name>{_alternation(name.upper() for name in KNOWN_SECTIONS)})[ \t]*:"),
    # any upper-case phrase opening a paragraph, with a colon followed by white space or the end
    re.compile(r"(?:\A|\n[ \t]*\n)[ \t]*(?P<name>[A-Z][A-Z0-9 ()/,&'-]{0,60}[A-Z)])[ \t]*:(?=\s|\Z)"),
)
_LINE_LIST_MARKER = re.compile(r"(?:\(?\d{1,2}[.)]|[-*•])\s")


def _section_name(raw: str) -> str:
    name = " ".join(raw.lower().split())
    return SECTION_ALIASES.get(name, name)


def _clean_body(text: str) -> str:
    """Re-join hard-wrapped lines; keep list items on their own lines and paragraphs apart (see module doc)."""
    paragraphs: list[str] = []
    lines: list[str] = []
    for raw_line in text.splitlines() + [""]:
        line = " ".join(raw_line.split())
        if not line:
            if lines:
                paragraphs.append("\n".join(lines))
                lines = []
        elif lines and not _LINE_LIST_MARKER.match(line):
            lines[-1] += " " + line
        else:
            lines.append(line)
    return "\n\n".join(paragraphs)


def parse_report(text: str) -> dict[str, str]:
    """Split a free-text report into ``{section name: text}`` (see the module docstring for the rules)."""
    text = _TITLE_LINE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    headers: list[tuple[int, int, str]] = []  # (name start, header end, canonical name)
    for pattern in _HEADER_PATTERNS:
        headers.extend((m.start("name"), m.end(), _section_name(m.group("name"))) for m in pattern.finditer(text))
    # Several patterns can see the same header: keep the earliest, longest, non-overlapping ones.
    headers.sort(key=lambda header: (header[0], -header[1]))
    kept: list[tuple[int, int, str]] = []
    for header in headers:
        if not kept or header[0] >= kept[-1][1]:
            kept.append(header)

    sections: dict[str, str] = {}

    def add(name: str, body: str) -> None:
        body = _clean_body(body)
        if body:
            sections[name] = f"{sections[name]}\n\n{body}" if name in sections else body

    add("preamble", text[: kept[0][0]] if kept else text)
    for (_, body_start, name), following in zip(kept, kept[1:] + [(len(text), len(text), "")]):
        add(name, text[body_start : following[0]])
    return sections


TEXT_SEPARATOR = "\n\n"  # between a report's sections, and between the columns a training text is joined from


def join_text(parts: Iterable[Any]) -> str:
    """The text parts (sections, or a row's text columns: findings, impression) joined by `TEXT_SEPARATOR`, in
    order; a part that is missing (None, NaN, not a string) or blank is left out. ``""`` when none has text."""
    return TEXT_SEPARATOR.join(part.strip() for part in parts if isinstance(part, str) and part.strip())


def report_text(
    sections: Mapping[str, str],
    include: Iterable[str] = ("findings", "impression"),
    fallback: Literal["last"] | None = None,
) -> str:
    """Training text from parsed sections: the ``include`` sections that are present, in that order.

    When none of them is present, ``fallback=None`` (default) returns ``""`` so that loaders count the report as
    empty; ``fallback="last"`` returns the last section that describes the image (anything but examination,
    indication, history, technique, comparison and notification; ``preamble`` counts, so a report without any
    header still gives text), the practice of the MIMIC-CXR authors' section extractor.
    """
    text = join_text(sections.get(name) for name in include)
    if text:
        return text
    if fallback == "last":
        candidates = [body for name, body in sections.items() if name not in _NON_FINDING_SECTIONS and body.strip()]
        return candidates[-1] if candidates else ""
    if fallback is not None:
        raise ValueError(f"fallback must be None or 'last', got {fallback!r}")
    return ""


class OpenIReport(TypedDict):
    """One Open-i report: ``uid`` (``"CXR1"``), ``sections`` as `parse_report` gives them, ``images`` (the
    ``parentImage`` ids, e.g. ``"CXR1_1_IM-0001-3001"``, which are also the image file names without ``.png``)."""

    uid: str
    sections: dict[str, str]
    images: list[str]


def parse_openi_xml(source: str | os.PathLike[str] | bytes) -> OpenIReport:
    """Parse one Open-i / Indiana University report XML (a path or the file's bytes).

    Each ``<AbstractText Label="...">`` becomes a section under its lower-cased, alias-folded label; empty ones
    (``<AbstractText Label="FINDINGS"/>``) are left out, as in `parse_report`.
    """
    if isinstance(source, (bytes, bytearray)):
        root = ElementTree.fromstring(bytes(source))
    else:
        root = ElementTree.parse(Path(source)).getroot()
    sections: dict[str, str] = {}
    for element in root.iter("AbstractText"):
        label = element.get("Label")
        body = _clean_body("".join(element.itertext()))
        if label and body:
            name = _section_name(label)
            sections[name] = f"{sections[name]}\n\n{body}" if name in sections else body
    uid_element = root.find("uId")
    uid = uid_element.get("id", "") if uid_element is not None else ""
    images = [element.get("id", "") for element in root.iter("parentImage") if element.get("id")]
    return OpenIReport(uid=uid, sections=sections, images=images)
