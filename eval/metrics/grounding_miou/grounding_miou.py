"""`evaluate` module: mean IoU of thresholded phrase-grounding heat maps against boxes (MS-CXR protocol)."""

import datasets
import evaluate
import numpy as np

from plan_hf.metrics import DEFAULT_IOU_THRESHOLDS, aggregate_by_category, grounding_iou

_CITATION = """\
@inproceedings{boecking2022making,
  title={Making the Most of Text Semantics to Improve Biomedical Vision--Language Processing},
  author={Boecking, Benedikt and Usuyama, Naoto and Bannur, Shruthi and others},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2022}
}
"""

_DESCRIPTION = """\
Phrase-grounding mIoU: each heat map is min-max normalised to [0, 1] over its valid (non-NaN) pixels (a constant
map becomes all zeros), binarised at each threshold (foreground: value >= threshold), compared with the union of
the phrase's boxes by IoU, and the IoUs are averaged over thresholds. Wraps `plan_hf.metrics.grounding_iou`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D float arrays): one heat map per phrase, (height, width); NaN marks pixels outside
        the image content. Maps may differ in size.
    references (`list` of `list` of 4 floats): each phrase's boxes as (x, y, w, h), x, y the top-left corner.
    thresholds (`list` of `float`, *optional*): defaults to (0.1, 0.2, 0.3, 0.4, 0.5).
    categories (`list` of `str`, *optional*): each phrase's finding category; adds the macro average over
        categories and per-category means.
Returns:
    miou (`float`): mean over phrases of the mean IoU over thresholds (phrases without ground truth left out).
    iou@<t> (`float`): mean over phrases of the IoU at threshold t, for each threshold.
    num_undefined (`int`): phrases with no ground-truth pixel (no boxes, or boxes off the valid image).
    macro_miou (`float`), per_category_miou (`dict`): only with `categories`.
Examples:
    >>> import numpy as np
    >>> miou_metric = evaluate.load("eval/metrics/grounding_miou")
    >>> heatmap = np.zeros((4, 4)); heatmap[1:3, 1:3] = 1.0
    >>> miou_metric.compute(predictions=[heatmap], references=[[[1, 1, 2, 2]]])["miou"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GroundingMiou(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # float64 so that compute() reproduces the plain function exactly; a nested Sequence (not Array2D,
            # whose dimensions after the first are fixed) because heat maps follow each image's own size.
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("float64"), length=4)),
                }
            ),
            reference_urls=["https://physionet.org/content/ms-cxr/"],
        )

    def _compute(self, predictions, references, thresholds=DEFAULT_IOU_THRESHOLDS, categories=None):
        per_phrase = [
            grounding_iou(np.asarray(heatmap, dtype=np.float64), boxes, thresholds)
            for heatmap, boxes in zip(predictions, references)
        ]
        labels = ["all"] * len(per_phrase) if categories is None else list(categories)
        if len(labels) != len(per_phrase):
            raise ValueError(f"got {len(labels)} categories for {len(per_phrase)} predictions")
        keys = ["miou"] + [f"iou@{t:g}" for t in thresholds]
        records = [
            {"category": c, "miou": float(np.mean(list(ious.values()))), **{f"iou@{t:g}": v for t, v in ious.items()}}
            for c, ious in zip(labels, per_phrase)
        ]
        summary = aggregate_by_category(records, keys=keys)
        result = {key: summary["micro"][key] for key in keys}
        result["num_undefined"] = summary["num_undefined"]["miou"]
        if categories is not None:
            result["macro_miou"] = summary["macro"]["miou"]
            result["per_category_miou"] = {c: v["miou"] for c, v in summary["per_category"].items()}
        return result
