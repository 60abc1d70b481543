"""Sentence splitting and report parsing, on hand-written MIMIC-like reports and the real Open-i reports."""

from __future__ import annotations

import ast
import importlib.util
import re
import tarfile
from pathlib import Path

import pytest

from plan_hf.data.reports import parse_openi_xml, parse_report, report_text, split_sentences
from plan_hf.sentences_plan import sentence_spans

from tests.layouts import MIMIC_REPORT_FULL, MIMIC_REPORT_NO_TEXT, MIMIC_REPORT_NUMBERED

# ---------------------------------------------------------------------------------------------------------------
# split_sentences / sentence_spans


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1. Small left effusion. 2. No pneumothorax.", ["Small left effusion.", "No pneumothorax."]),
        ("A 1.5 cm nodule. Another 0.8 cm one.", ["A 1.5 cm nodule.", "Another 0.8 cm one."]),
        (
            "Opacities, e.g. in the RUL, i.e. pneumonia. Dr. Smith agreed. Approx. 2 cm vs. 3 cm. Seen at St. Mary's.",
            ["Opacities, e.g. in the RUL, i.e. pneumonia.", "Dr. Smith agreed.", "Approx. 2 cm vs. 3 cm.",
             "Seen at St. Mary's."],
        ),
        ("Done at 5 p.m. and compared to prior. Stable.", ["Done at 5 p.m. and compared to prior.", "Stable."]),
        ("Paged at 5 p.m. Dr. ___ was notified on ___. No change.",
         ["Paged at 5 p.m.", "Dr. ___ was notified on ___.", "No change."]),
        ("Heart size is 12. 13 views were taken.", ["Heart size is 12.", "13 views were taken."]),
        ("No effusion? Yes! (Stable.) Done.", ["No effusion?", "Yes!", "(Stable.)", "Done."]),
        ("Lines, tubes, etc. The lungs are clear.", ["Lines, tubes, etc.", "The lungs are clear."]),
        ("Lines, tubes, etc. are in place.", ["Lines, tubes, etc. are in place."]),
        ("1.Increased opacity. 2.No effusion. .", ["Increased opacity.", "No effusion."]),
        ("", []),
        ("  .  . ", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_hard_wrapped_lines_join_and_blank_lines_or_list_items_break() -> None:
    wrapped = (
        " There is no focal consolidation.  Bilateral\n nodular opacities that most likely represent nipple\n"
        " shadows. The\n heart is normal."
    )
    assert split_sentences(wrapped) == [
        "There is no focal consolidation.",
        "Bilateral nodular opacities that most likely represent nipple shadows.",
        "The heart is normal.",
    ]
    # no full stops at all: only the blank line and the list markers separate the sentences
    assert split_sentences("Lungs clear\n\nImpression here\n1. Emphysema\n2) No acute process\n- Stable nodule") == [
        "Lungs clear", "Impression here", "Emphysema", "No acute process", "Stable nodule",
    ]


@pytest.mark.parametrize(
    "text",
    [MIMIC_REPORT_FULL, MIMIC_REPORT_NUMBERED, "  1. One.\t2. Two\n\n\n3) three .  ", "No. 5 tube. ___ ___. X"],
)
def test_sentence_spans_index_the_original_text(text: str) -> None:
    spans = sentence_spans(text)
    assert [" ".join(text[start:end].split()) for start, end in spans] == split_sentences(text)
    assert all(0 <= start < end <= len(text) for start, end in spans)
    assert all(previous[1] <= following[0] for previous, following in zip(spans, spans[1:]))
    assert all(not text[start].isspace() and not text[end - 1].isspace() for start, end in spans)


def test_sentences_module_is_standalone() -> None:
    """The file is copied next to model weights: stdlib imports only, nothing of plan_hf."""
    import plan_hf.sentences_plan as module

    tree = ast.parse(Path(module.__file__).read_text())
    nodes = list(ast.walk(tree))
    imported = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in nodes)
    assert imported <= {"__future__", "re"}


# ---------------------------------------------------------------------------------------------------------------
# parse_report / report_text


def test_parse_full_mimic_report() -> None:
    sections = parse_report(MIMIC_REPORT_FULL)
    assert list(sections) == ["examination", "indication", "comparison", "findings", "impression"]
    assert sections["examination"] == "CHEST (PA AND LAT)"
    assert sections["findings"] == (
        "There is a small left pleural effusion. The heart size is normal. A 1.5 cm nodule projects over the right "
        "upper lobe."
    )
    assert report_text(sections) == sections["findings"] + "\n\n" + "Small left effusion."
    assert split_sentences(report_text(sections))[-2:] == [
        "A 1.5 cm nodule projects over the right upper lobe.", "Small left effusion.",
    ]


def test_impression_only_and_neither() -> None:
    sections = parse_report("FINAL REPORT\nINDICATION: Line.\n\nIMPRESSION:  Right IJ line ends in the SVC.")
    assert "findings" not in sections
    assert report_text(sections) == "Right IJ line ends in the SVC."
    assert report_text(sections, include=("findings",)) == ""

    neither = parse_report(MIMIC_REPORT_NO_TEXT)
    assert set(neither) == {"examination", "indication", "comparison"}
    assert report_text(neither) == ""  # the loaders count this as an empty report
    assert report_text(neither, fallback="last") == ""  # exam metadata is never training text
    with pytest.raises(ValueError, match="fallback"):
        report_text(neither, fallback="first")  # type: ignore[arg-type]


def test_numbered_impression_keeps_list_structure() -> None:
    sections = parse_report(MIMIC_REPORT_NUMBERED)
    assert sections["impression"] == "1. Emphysema.\n2. No acute process."
    assert split_sentences(report_text(sections)) == ["Lungs are hyperinflated.", "Emphysema.", "No acute process."]
    unpunctuated = parse_report("IMPRESSION:\n 1. Emphysema\n 2. Small effusion, stable since\n    the prior study\n")
    assert split_sentences(unpunctuated["impression"]) == ["Emphysema", "Small effusion, stable since the prior study"]


def test_mixed_case_inline_aliases_and_unusual_headers() -> None:
    text = (
        "WET READ: ___ ___ 1:50 PM\n  No pneumothorax.\n\n"
        "FINAL REPORT\n"
        "Clinical History: cough\n"
        "Findings: clear lungs.\n NG TUBE: tip in the stomach.\n\n"
        "PORTABLE CHEST RADIOGRAPH:  stable lines.\n\n"
        "Conclusion: normal"
    )
    sections = parse_report(text)
    assert sections == {
        "wet read": "___ ___ 1:50 PM No pneumothorax.",
        "history": "cough",
        "findings": "clear lungs. NG TUBE: tip in the stomach.",  # an upper-case phrase inside a paragraph is text
        "portable chest radiograph": "stable lines.",  # an unknown upper-case header opening a paragraph
        "impression": "normal",  # CONCLUSION is folded onto impression
    }
    assert parse_report("INDICATION: Cough. FINDINGS: Clear lungs. IMPRESSION: Normal.") == {
        "indication": "Cough.", "findings": "Clear lungs.", "impression": "Normal.",
    }
    assert parse_report("IMPRESSION\nNo acute process.")["impression"] == "No acute process."


def test_preamble_duplicates_and_empty_input() -> None:
    sections = parse_report("PA and lateral views of the chest.\nFINDINGS: Clear.\nIMPRESSION: One.\nIMPRESSION: Two.")
    assert sections["preamble"] == "PA and lateral views of the chest."
    assert sections["impression"] == "One.\n\nTwo."
    assert parse_report("") == {}
    assert parse_report("Lungs are clear.") == {"preamble": "Lungs are clear."}
    assert report_text(parse_report("Lungs are clear."), fallback="last") == "Lungs are clear."
    assert report_text({"findings": "A.", "impression": "B."}, include=("impression", "findings")) == "B.\n\nA."


# ---------------------------------------------------------------------------------------------------------------
# Open-i

OPENI_XML = b"""<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR9"/>
 <MedlineCitation><Article><Abstract>
  <AbstractText Label="COMPARISON">None.</AbstractText>
  <AbstractText Label="INDICATION">Cough</AbstractText>
  <AbstractText Label="FINDINGS"/>
  <AbstractText Label="IMPRESSION">1. No acute disease. 2. Stable 1.2 cm
      granuloma.</AbstractText>
 </Abstract></Article></MedlineCitation>
 <parentImage id="CXR9_1_IM-0001-1001"><url>/x/CXR9_1_IM-0001-1001.jpg</url></parentImage>
 <parentImage id="CXR9_1_IM-0001-2001"><url>/x/CXR9_1_IM-0001-2001.jpg</url></parentImage>
</eCitation>"""


def test_parse_openi_xml_bytes_and_path(tmp_path: Path) -> None:
    report = parse_openi_xml(OPENI_XML)
    assert report == {
        "uid": "CXR9",
        "sections": {
            "comparison": "None.",
            "indication": "Cough",
            "impression": "1. No acute disease. 2. Stable 1.2 cm granuloma.",
        },
        "images": ["CXR9_1_IM-0001-1001", "CXR9_1_IM-0001-2001"],
    }
    (tmp_path / "9.xml").write_bytes(OPENI_XML)
    assert parse_openi_xml(tmp_path / "9.xml") == report
    assert split_sentences(report_text(report["sections"])) == ["No acute disease.", "Stable 1.2 cm granuloma."]


def _openi_archive() -> Path | None:
    spec = importlib.util.find_spec("torchxrayvision")  # finds the package without importing it (needs torchvision)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "NLMCXR_reports.tgz"
    return path if path.is_file() else None


@pytest.mark.skipif(_openi_archive() is None, reason="torchxrayvision (with NLMCXR_reports.tgz) is not installed")
def test_real_indiana_university_reports() -> None:
    archive = _openi_archive()
    assert archive is not None
    reports = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".xml"):
                reports.append(parse_openi_xml(tar.extractfile(member).read()))  # type: ignore[union-attr]
    assert len(reports) == 3955
    assert all(report["uid"].startswith("CXR") for report in reports)
    assert sum(bool(report["images"]) for report in reports) > 3500

    decimal = re.compile(r"\d+\.\d+")
    with_text = 0
    for report in reports:
        sections = report["sections"]
        text = report_text(sections)
        if "findings" not in sections and "impression" not in sections:
            assert text == ""
            continue
        with_text += 1
        sentences = split_sentences(text)
        assert text and sentences, report["uid"]
        # every word survives splitting, in order (only list markers, full stops and white space may go)
        assert re.findall(r"[A-Za-z]+", " ".join(sentences)) == re.findall(r"[A-Za-z]+", text), report["uid"]
        # no decimal number is cut in two, and no sentence still starts with its list number
        for number in decimal.findall(text):
            assert any(number in sentence for sentence in sentences), (report["uid"], number)
        assert not any(re.match(r"\(?\d{1,2}[.)]\s", sentence) for sentence in sentences), report["uid"]
        spans = sentence_spans(text)
        assert [" ".join(text[start:end].split()) for start, end in spans] == sentences
    assert with_text > 3900
