"""Zero-shot prompt sets: for each finding, positive and negative sentences built from templates x descriptions.

A class's prompts are every ``template.format(description)`` of its templates and descriptions, written the way
radiology reports (MIMIC-CXR, and the synthetic benchmark's report writer) phrase a finding: "There is a small left
pleural effusion.", "No pneumothorax.". How they are aggregated (`plan_hf.evaluation.zero_shot`):

* each prompt is embedded (text tower, projection, L2-normalised); a class embedding is the mean of its prompts'
  normalised embeddings, normalised again (the CLIP prompt ensemble);
* multi-class (CheXpert 5x200): logits ``s * v . e_c`` over the classes' *positive* embeddings, ``s`` the model's
  logit scale; the prediction is their argmax and the class scores their softmax;
* binary (RSNA pneumonia, SIIM pneumothorax, each synthetic finding): ``P(positive) = softmax(s * [v . e_pos,
  v . e_neg])[0]``, the softmax over the positive and the negative prompt set of that finding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

POSITIVE_TEMPLATES: tuple[str, ...] = (
    "{}.",
    "There is {}.",
    "{} is seen.",
    "{} is present.",
    "Findings consistent with {}.",
)
NEGATIVE_TEMPLATES: tuple[str, ...] = (
    "No {}.",
    "There is no {}.",
    "No evidence of {}.",
    "No {} is seen.",
)
# Sentences of a normal study, added to every negative set: "no X" is most often said by saying nothing about X.
NORMAL_SENTENCES: tuple[str, ...] = (
    "The lungs are clear.",
    "No acute cardiopulmonary process.",
)

# How reports name a finding when it is present (the first entry is the plain name).
POSITIVE_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis", "bibasilar atelectasis", "left basilar atelectasis", "right lower lobe atelectasis",
                    "plate-like atelectasis", "subsegmental atelectasis"),
    "Cardiomegaly": ("cardiomegaly", "mild cardiomegaly", "moderate cardiomegaly", "enlarged cardiac silhouette",
                     "moderately enlarged heart"),
    "Consolidation": ("consolidation", "focal consolidation", "right lower lobe consolidation",
                      "left lower lobe consolidation", "airspace consolidation"),
    "Edema": ("pulmonary edema", "mild pulmonary edema", "moderate pulmonary edema", "interstitial edema",
              "perihilar edema"),
    "Pleural Effusion": ("pleural effusion", "small left pleural effusion", "right pleural effusion",
                         "bilateral pleural effusions", "blunting of the costophrenic angle"),
    "Pneumothorax": ("pneumothorax", "right apical pneumothorax", "left apical pneumothorax", "small pneumothorax",
                     "moderate pneumothorax"),
    "Pneumonia": ("pneumonia", "right lower lobe pneumonia", "left lower lobe pneumonia", "multifocal pneumonia",
                  "consolidation concerning for pneumonia"),
    "Lung Opacity": ("opacity", "airspace opacity", "hazy opacity", "bilateral opacities", "ill-defined opacity"),
    "Lung Lesion": ("nodule", "pulmonary nodule", "nodular opacity", "lung mass"),
}
# How reports negate it (a negation names the finding plainly, without a place or a size).
NEGATIVE_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis",),
    "Cardiomegaly": ("cardiomegaly", "enlargement of the cardiac silhouette"),
    "Consolidation": ("consolidation", "focal consolidation"),
    "Edema": ("pulmonary edema", "edema"),
    "Pleural Effusion": ("pleural effusion",),
    "Pneumothorax": ("pneumothorax",),
    "Pneumonia": ("pneumonia", "focal consolidation to suggest pneumonia"),
    "Lung Opacity": ("opacity", "focal opacity"),
    "Lung Lesion": ("nodule", "suspicious pulmonary nodule"),
}


@dataclass(frozen=True)
class ClassPrompts:
    """The positive and negative sentences of one finding."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def expand_templates(templates: Iterable[str], descriptions: Iterable[str]) -> tuple[str, ...]:
    """Every template filled with every description, sentence-cased, duplicates dropped (order kept)."""
    descriptions = list(descriptions)
    sentences = (_capitalise(template.format(description)) for template in templates for description in descriptions)
    return tuple(dict.fromkeys(sentences))


def class_prompts(name: str, positive_templates: Sequence[str] = POSITIVE_TEMPLATES,
                  negative_templates: Sequence[str] = NEGATIVE_TEMPLATES,
                  normal_sentences: Sequence[str] = NORMAL_SENTENCES) -> ClassPrompts:
    """The prompt set of finding `name` (a CheXpert label with descriptions here)."""
    if name not in POSITIVE_DESCRIPTIONS:
        raise ValueError(f"no prompt descriptions for {name!r}; known: {sorted(POSITIVE_DESCRIPTIONS)}")
    return ClassPrompts(
        name=name,
        positive=expand_templates(positive_templates, POSITIVE_DESCRIPTIONS[name]),
        negative=expand_templates(negative_templates, NEGATIVE_DESCRIPTIONS[name]) + tuple(normal_sentences),
    )


def prompt_sets(names: Iterable[str]) -> dict[str, ClassPrompts]:
    """`class_prompts` of each name, in order."""
    return {name: class_prompts(name) for name in names}


__all__ = [
    "ClassPrompts",
    "NEGATIVE_DESCRIPTIONS",
    "NEGATIVE_TEMPLATES",
    "NORMAL_SENTENCES",
    "POSITIVE_DESCRIPTIONS",
    "POSITIVE_TEMPLATES",
    "class_prompts",
    "expand_templates",
    "prompt_sets",
]
