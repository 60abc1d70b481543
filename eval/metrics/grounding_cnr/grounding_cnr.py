"""`evaluate` module: contrast-to-noise ratio of phrase-grounding heat maps against boxes (MS-CXR protocol)."""

import datasets
import evaluate
import numpy as np

from plan_hf.metrics import aggregate_by_category, cnr

_CITATION = """\
@inproceedings{boecking2022making,
  title={Making the Most of Text Semantics to Improve Biomedical Vision--Language Processing},
  author={Boecking, Benedikt and Usuyama, Naoto and Bannur, Shruthi and others},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2022}
}
"""

_DESCRIPTION = """\
Contrast-to-noise ratio (CNR) of a phrase-grounding heat map: |mean_in - mean_out| / sqrt(var_in + var_out), where
"in" is the union of the phrase's boxes and "out" the rest of the image (population variances). NaN pixels (outside
the region the model saw) are ignored. Wraps `plan_hf.metrics.cnr`; see its docstring for box rasterisation.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D float arrays): one heat map per phrase, (height, width), in image pixel coordinates;
        NaN marks pixels outside the image content. Maps may differ in size.
    references (`list` of `list` of 4 floats): each phrase's boxes as (x, y, w, h), x, y the top-left corner.
    categories (`list` of `str`, *optional*): each phrase's finding category; adds the macro average over
        categories and per-category means.
Returns:
    cnr (`float`): mean CNR over phrases with a defined CNR (inf if any phrase separates perfectly).
    num_undefined (`int`): phrases whose CNR is undefined (NaN: no valid pixel inside or outside the boxes).
    macro_cnr (`float`), per_category_cnr (`dict`): only with `categories`.
Examples:
    >>> import numpy as np
    >>> cnr_metric = evaluate.load("eval/metrics/grounding_cnr")
    >>> heatmap = np.zeros((4, 4)); heatmap[1:3, 1:3] = [[1.0, 3.0], [1.0, 3.0]]
    >>> cnr_metric.compute(predictions=[heatmap], references=[[[1, 1, 2, 2]]])["cnr"]
    2.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GroundingCNR(evaluate.Metric):
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

    def _compute(self, predictions, references, categories=None):
        scores = [cnr(np.asarray(heatmap, dtype=np.float64), boxes) for heatmap, boxes in zip(predictions, references)]
        labels = ["all"] * len(scores) if categories is None else list(categories)
        if len(labels) != len(scores):
            raise ValueError(f"got {len(labels)} categories for {len(scores)} predictions")
        summary = aggregate_by_category(
            [{"category": c, "cnr": s} for c, s in zip(labels, scores)], keys=("cnr",)
        )
        result = {"cnr": summary["micro"]["cnr"], "num_undefined": summary["num_undefined"]["cnr"]}
        if categories is not None:
            result["macro_cnr"] = summary["macro"]["cnr"]
            result["per_category_cnr"] = {c: v["cnr"] for c, v in summary["per_category"].items()}
        return result
