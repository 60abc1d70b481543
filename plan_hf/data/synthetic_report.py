"""Writing a MIMIC-style free-text report from the findings actually drawn in a synthetic image.

Every positive finding is named with a location phrase that matches where it was drawn ("right lower lobe
consolidation", "small left pleural effusion"); that exact phrase is returned as the finding's grounding label
text. Absent findings are often negated ("No pneumothorax."), and normal filler sentences are mixed in, so that
"the report mentions X" is not the same as "the report contains the word X".
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import numpy as np

from .synthetic_findings import STREAM_REPORT, FindingSpec, FindingType, Side, Zone

_WRAP_GUARD = "\x00"  # stands in for spaces inside phrases while wrapping, so no phrase is split over lines


@dataclass
class Report:
    text: str
    phrases: list[str]  # one per finding, in order: the phrase as written in the report (grounding label_text)
    negated: set[str] = field(default_factory=set)  # CheXpert labels the report explicitly negates (0.0)


def _choice(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _side_word(spec: FindingSpec) -> str:
    return "bilateral" if spec.bilateral else spec.sides[0].value


def _location(rng: np.random.Generator, spec: FindingSpec) -> tuple[str, str]:
    """(adjective form, noun-phrase form) of where a lung finding sits, e.g. ("left basilar", "the left lung base")."""
    zone = spec.zone or Zone.MIDDLE
    if spec.bilateral:
        options = {
            Zone.UPPER: [("bilateral upper lobe", "both upper lobes"), ("biapical", "both lung apices")],
            Zone.MIDDLE: [("bilateral mid lung", "both mid lungs"), ("bilateral mid lung", "the mid lung zones")],
            Zone.LOWER: [("bibasilar", "both lung bases"), ("bilateral lower lobe", "both lower lobes")],
        }[zone]
        return options[int(rng.integers(len(options)))]
    s = spec.sides[0].value
    if zone is Zone.UPPER:
        options = [(f"{s} upper lobe", f"the {s} upper lobe"), (f"{s} apical", f"the {s} lung apex"),
                   (f"{s} upper lung", f"the {s} upper lung zone")]
    elif zone is Zone.MIDDLE:
        if spec.sides[0] is Side.RIGHT:
            options = [("right middle lobe", "the right middle lobe"), ("right mid lung", "the right mid lung")]
        else:
            options = [("lingular", "the lingula"), ("left mid lung", "the left mid lung")]
    else:
        options = [(f"{s} lower lobe", f"the {s} lower lobe"), (f"{s} basilar", f"the {s} lung base"),
                   (f"{s} lower lung", f"the {s} lower lung zone")]
    return options[int(rng.integers(len(options)))]


def _phrase(rng: np.random.Generator, spec: FindingSpec) -> tuple[str, bool]:
    """(noun phrase naming the finding and its place, whether it takes the article "a")."""
    t = spec.type
    if t in (FindingType.CONSOLIDATION, FindingType.OPACITY, FindingType.NODULE, FindingType.ATELECTASIS):
        adj, noun = _location(rng, spec)
        plural = spec.bilateral
        if t is FindingType.CONSOLIDATION and spec.pneumonia:
            return _choice(rng, [f"{adj} pneumonia", f"pneumonia in {noun}"]), False
        if t is FindingType.CONSOLIDATION:
            return _choice(rng, [f"{adj} consolidation", f"consolidation in {noun}",
                                 f"{adj} airspace consolidation", f"focal consolidation in {noun}"]), False
        if t is FindingType.OPACITY:
            if plural:
                return _choice(rng, [f"{adj} opacities", f"hazy opacities in {noun}", f"{adj} airspace opacities"]), False
            return _choice(rng, [f"{adj} opacity", f"hazy opacity in {noun}", f"{adj} airspace opacity",
                                 f"ill-defined opacity in {noun}"]), True
        if t is FindingType.NODULE:
            mm = int(rng.integers(5, 9)) if spec.severity == "small" else int(rng.integers(9, 15))
            return _choice(rng, [f"{adj} nodule", f"{mm} mm nodule in {noun}", f"nodular opacity in {noun}",
                                 f"{mm} mm {adj} nodule"]), True
        return _choice(rng, [f"{adj} atelectasis", f"plate-like atelectasis in {noun}",
                             f"{adj} linear atelectasis", f"subsegmental atelectasis in {noun}"]), False
    if t is FindingType.PLEURAL_EFFUSION:
        if spec.bilateral:
            size = "small" if spec.severity == "small" else "moderate"
            options = [f"{size} bilateral pleural effusions", "bilateral pleural effusions"]
            if spec.severity == "small":
                options.append("blunting of both costophrenic angles")
            return _choice(rng, options), False
        s = spec.sides[0].value
        if spec.severity == "small":
            return _choice(rng, [f"small {s} pleural effusion", f"trace {s} pleural effusion",
                                 f"blunting of the {s} costophrenic angle"]), True
        return _choice(rng, [f"moderate {s} pleural effusion", f"{s} pleural effusion",
                             f"moderate {s}-sided pleural effusion"]), True
    if t is FindingType.PNEUMOTHORAX:
        s = spec.sides[0].value
        if spec.severity == "small":
            return _choice(rng, [f"small {s} apical pneumothorax", f"tiny {s} apical pneumothorax",
                                 f"{s} apical pneumothorax"]), True
        return _choice(rng, [f"moderate {s} pneumothorax", f"{s} apical pneumothorax",
                             f"moderate-sized {s} apical pneumothorax"]), True
    if t is FindingType.CARDIOMEGALY:
        if spec.severity == "mild":
            return _choice(rng, ["mild cardiomegaly", "cardiomegaly", "mildly enlarged cardiac silhouette"]), False
        return _choice(rng, ["moderate cardiomegaly", "enlarged cardiac silhouette", "moderately enlarged heart"]), False
    if t is FindingType.EDEMA:
        if spec.severity == "mild":
            return _choice(rng, ["mild pulmonary edema", "mild interstitial edema", "perihilar edema"]), False
        return _choice(rng, ["moderate pulmonary edema", "pulmonary edema", "bilateral perihilar edema"]), False
    return _choice(rng, ["right internal jugular central venous catheter", "right IJ central line"]), True


def _article(phrase: str, countable: bool) -> str:
    if not countable:
        return ""
    return "an " if phrase[0] in "aeiou" else "a "


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _finding_sentence(rng: np.random.Generator, spec: FindingSpec, phrase: str, countable: bool) -> tuple[str, str]:
    """(sentence, the phrase as it appears in it: capitalised when it opens the sentence)."""
    tip = ""
    if spec.type is FindingType.SUPPORT_DEVICE:
        tip = _choice(rng, ["the mid SVC", "the lower SVC", "the cavoatrial junction"])
        template = _choice(rng, ["{P} terminates in {tip}.", "There is {a}{p} with its tip in {tip}.",
                                 "{P} ends in {tip}."])
    elif spec.hedged:
        template = _choice(rng, ["Possible {p}.", "{P} cannot be excluded.", "There may be {a}{p}."])
    else:
        template = _choice(rng, ["There is {a}{p}.", "{P} is seen.", "{P} is noted.", "{P} is present.",
                                 "{P}.", "Again seen is {a}{p}."])
    if "effusions" in phrase or "opacities" in phrase:  # plural head noun: "... are noted"
        template = template.replace(" is ", " are ").replace("There is", "There are")
    written = _cap(phrase) if template.startswith("{P}") else phrase
    return template.format(P=_cap(phrase), p=phrase, a=_article(phrase, countable), tip=tip), written


def _impression_sentence(rng: np.random.Generator, spec: FindingSpec, phrase: str) -> tuple[str, str]:
    if spec.hedged:
        return f"Possible {phrase}.", phrase
    if spec.type is FindingType.CONSOLIDATION and not spec.pneumonia:
        template = _choice(rng, ["{P}.", "{P}.", "{P}, concerning for pneumonia.", "Findings consistent with {p}."])
    elif spec.type is FindingType.SUPPORT_DEVICE:
        template = _choice(rng, ["{P} in appropriate position.", "{P} as described."])
    else:
        template = _choice(rng, ["{P}.", "{P}.", "{P}.", "Findings consistent with {p}.", "Findings compatible with {p}."])
    written = _cap(phrase) if template.startswith("{P}") else phrase
    return template.format(P=_cap(phrase), p=phrase), written


_INDICATIONS = [
    "___ with cough", "___-year-old man with shortness of breath", "___-year-old woman with fever",
    "___ with chest pain, evaluate for pneumonia", "___M with dyspnea", "___F with hypoxia",
    "Evaluate for infiltrate.", "___ s/p fall, evaluate for acute process", "Preoperative evaluation.",
]
_NORMAL_IMPRESSIONS = ["No acute cardiopulmonary process.", "No acute intrathoracic abnormality.",
                       "Normal chest radiograph.", "No evidence of acute cardiopulmonary disease."]


Sentence = tuple[str, frozenset[str]]  # a sentence and the CheXpert labels it negates


def _negations(rng: np.random.Generator, present: set[FindingType]) -> list[Sentence]:
    """Negations of some absent findings (never all of them, never a present one)."""
    out: list[Sentence] = []
    no_ptx = FindingType.PNEUMOTHORAX not in present and rng.random() < 0.75
    no_eff = FindingType.PLEURAL_EFFUSION not in present and rng.random() < 0.7
    # An opacity is not a consolidation, but "no focal consolidation" next to one reads wrong: skip it then.
    no_cons = not present & {FindingType.CONSOLIDATION, FindingType.OPACITY} and rng.random() < 0.6
    if no_cons and no_eff and no_ptx and rng.random() < 0.4:
        out.append((_choice(rng, ["No focal consolidation, pleural effusion, or pneumothorax.",
                                  "There is no focal consolidation, pleural effusion or pneumothorax."]),
                    frozenset({"Consolidation", "Pleural Effusion", "Pneumothorax"})))
        no_cons = no_eff = no_ptx = False
    if no_cons:
        out.append((_choice(rng, ["No focal consolidation.", "There is no focal consolidation.",
                                  "No focal consolidation is seen."]), frozenset({"Consolidation"})))
    if no_eff and no_ptx and rng.random() < 0.6:
        out.append((_choice(rng, ["No pleural effusion or pneumothorax.",
                                  "There is no pleural effusion or pneumothorax.",
                                  "No pneumothorax or pleural effusion is seen."]),
                    frozenset({"Pleural Effusion", "Pneumothorax"})))
    else:
        if no_eff:
            out.append((_choice(rng, ["No pleural effusion.", "There is no pleural effusion."]),
                        frozenset({"Pleural Effusion"})))
        if no_ptx:
            out.append((_choice(rng, ["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."]),
                        frozenset({"Pneumothorax"})))
    if FindingType.EDEMA not in present and rng.random() < 0.4:
        out.append((_choice(rng, ["No pulmonary edema.", "There is no pulmonary edema.",
                                  "No evidence of pulmonary edema."]), frozenset({"Edema"})))
    return out


def _wrap(sentences: list[Sentence], width: int) -> str:
    text = " ".join(s for s, _ in sentences)
    lines = textwrap.wrap(text, width=width, break_long_words=False, break_on_hyphens=False)
    return "\n".join(" " + line.replace(_WRAP_GUARD, " ") for line in lines)


def write_report(seed: int, index: int, findings: list[FindingSpec], view: str) -> Report:
    """The report of image ``index`` given the findings drawn in it (in order) and its view (PA or AP)."""
    rng = np.random.default_rng([seed, index, STREAM_REPORT])
    none: frozenset[str] = frozenset()
    present = {f.type for f in findings}
    lung_findings = present & {FindingType.CONSOLIDATION, FindingType.OPACITY, FindingType.NODULE,
                               FindingType.ATELECTASIS, FindingType.EDEMA}
    normal = not any(f.type is not FindingType.SUPPORT_DEVICE for f in findings)

    # One phrase per finding, reused in both sections so each finding has a single grounding label text.
    phrases = [_phrase(rng, f) for f in findings]
    guarded = [p.replace(" ", _WRAP_GUARD) for p, _ in phrases]
    # Dictation order: heart, lungs and pleura in drawing order, then lines and tubes.
    order = sorted(range(len(findings)), key=lambda i: (findings[i].type is not FindingType.CARDIOMEGALY,
                                                        findings[i].type is FindingType.SUPPORT_DEVICE))
    body_positive: dict[int, tuple[str, str]] = {
        i: _finding_sentence(rng, findings[i], guarded[i], phrases[i][1]) for i in order
    }
    impression_positive: dict[int, tuple[str, str]] = {
        i: _impression_sentence(rng, findings[i], guarded[i]) for i in order
    }

    heart: list[Sentence] = []
    if FindingType.CARDIOMEGALY not in present:
        if rng.random() < 0.6:
            heart.append((_choice(rng, ["The cardiomediastinal silhouette is within normal limits.",
                                        "The cardiomediastinal silhouette is normal."]),
                          frozenset({"Enlarged Cardiomediastinum"})))
        if rng.random() < 0.5:
            heart.append((_choice(rng, ["Heart size is normal.", "The heart is normal in size."]),
                          frozenset({"Cardiomegaly"})))
    elif rng.random() < 0.5:
        heart.append(("The mediastinal and hilar contours are otherwise unremarkable.", none))
    negations = _negations(rng, present)
    filler: list[Sentence] = []
    pleural = present & {FindingType.PLEURAL_EFFUSION, FindingType.PNEUMOTHORAX}
    if not lung_findings and not pleural and rng.random() < 0.5:
        filler.append((_choice(rng, ["The lungs are clear.", "The lungs are well expanded and clear."]), none))
    if rng.random() < 0.6:
        filler.append((_choice(rng, ["Osseous structures are unremarkable.", "No acute osseous abnormality.",
                                     "The visualized osseous structures are intact."]), none))
    if rng.random() < 0.15:
        filler.append(("No displaced fracture is seen.", frozenset({"Fracture"})))
    intro: list[Sentence] = []
    if rng.random() < 0.35:
        intro.append(("PA and lateral views of the chest provided." if view == "PA"
                      else "Frontal view of the chest was obtained.", none))

    cardiac = [i for i in order if findings[i].type is FindingType.CARDIOMEGALY]
    others = [i for i in order if findings[i].type is not FindingType.CARDIOMEGALY]
    body = (intro + [(body_positive[i][0], none) for i in cardiac] + heart
            + [(body_positive[i][0], none) for i in others] + negations + filler)
    # The impression names the findings (a central line only sometimes) or says the study is normal.
    layout = int(rng.choice(3, p=[0.8, 0.1, 0.1]))  # 0: both sections, 1: FINDINGS only, 2: IMPRESSION only
    in_impression = [i for i in order if layout == 2 or findings[i].type is not FindingType.SUPPORT_DEVICE
                     or rng.random() < 0.5]
    impression = [(impression_positive[i][0], none) for i in in_impression]
    if layout == 2:
        impression += negations[:2]  # an impression-only report still negates a thing or two
    if normal:
        impression.append((_choice(rng, _NORMAL_IMPRESSIONS), none))

    if view == "PA":
        exam = _choice(rng, ["CHEST (PA AND LAT)", "CHEST (PA AND LAT)", "CHEST (PA ONLY)"])
    else:
        exam = _choice(rng, ["CHEST (PORTABLE AP)", "CHEST (AP ONLY)"])
    width = int(rng.integers(68, 79))
    lines = [
        "                                 FINAL REPORT",
        f" EXAMINATION:  {exam}",
        " ",
        f" {'INDICATION' if rng.random() < 0.85 else 'HISTORY'}:  {_choice(rng, _INDICATIONS)}",
        " ",
    ]
    if rng.random() < 0.7:
        lines += [f" TECHNIQUE:  {'Chest PA and lateral' if view == 'PA' else 'Portable AP chest radiograph'}", " "]
    lines += [f" COMPARISON:  {_choice(rng, ['None.', '___', 'Chest radiograph from ___.'])}", " "]
    kept: list[Sentence] = []
    if layout != 2:
        lines += [" FINDINGS:", " ", _wrap(body, width), " "]
        kept += body
    if layout != 1:
        lines += [" IMPRESSION:", " ", _wrap(impression, width), " "]
        kept += impression
    source = impression_positive if layout == 2 else body_positive
    return Report(
        text="\n".join(lines).rstrip() + "\n",
        phrases=[source[i][1].replace(_WRAP_GUARD, " ") for i in range(len(findings))],
        negated=set().union(*(labels for _, labels in kept)),
    )
