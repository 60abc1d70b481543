"""`evaluate` module: pointing game of phrase-grounding heat maps against boxes (MS-CXR protocol)."""

import datasets
import evaluate
import numpy as np

from plan_hf.metrics import aggregate_by_category, pointing_game

_CITATION = """\
@article{zhang2018top,
  title={Top-Down Neural Attention by Excitation Backprop},
  author={Zhang, Jianming and Bargal, Sarah Adel and Lin, Zhe and Brandt, Jonathan and Shen, Xiaohui
          and Sclaroff, Stan},
  journal={International Journal of Computer Vision},
  volume={126},
  pages={1084--1102},
  year={2018}
}
"""

_DESCRIPTION = """\
Pointing game: a phrase scores 1 when the maximum of its heat map (NaN pixels ignored) lies inside one of its
boxes, else 0. When several pixels share the maximum, the phrase scores the fraction of them inside the boxes
(the expected hit of picking one at random), so a flat map earns the boxes' share of the image, not a free hit.
Wraps `plan_hf.metrics.pointing_game`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D float arrays): one heat map per phrase, (height, width); NaN marks pixels outside
        the image content. Maps may differ in size.
    references (`list` of `list` of 4 floats): each phrase's boxes as (x, y, w, h), x, y the top-left corner.
    categories (`list` of `str`, *optional*): each phrase's finding category; adds the macro average over
        categories and per-category means.
Returns:
    pointing_game (`float`): mean hit rate over phrases with ground truth.
    num_undefined (`int`): phrases with no ground-truth pixel (no boxes, or boxes off the valid image).
    macro_pointing_game (`float`), per_category_pointing_game (`dict`): only with `categories`.
Examples:
    >>> import numpy as np
    >>> pointing_metric = evaluate.load("eval/metrics/pointing_game")
    >>> heatmap = np.zeros((4, 4)); heatmap[2, 1] = 1.0
    >>> pointing_metric.compute(predictions=[heatmap], references=[[[1, 1, 2, 2]]])["pointing_game"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PointingGame(evaluate.Metric):
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
        scores = [
            pointing_game(np.asarray(heatmap, dtype=np.float64), boxes)
            for heatmap, boxes in zip(predictions, references)
        ]
        labels = ["all"] * len(scores) if categories is None else list(categories)
        if len(labels) != len(scores):
            raise ValueError(f"got {len(labels)} categories for {len(scores)} predictions")
        summary = aggregate_by_category(
            [{"category": c, "pointing_game": s} for c, s in zip(labels, scores)], keys=("pointing_game",)
        )
        result = {
            "pointing_game": summary["micro"]["pointing_game"],
            "num_undefined": summary["num_undefined"]["pointing_game"],
        }
        if categories is not None:
            result["macro_pointing_game"] = summary["macro"]["pointing_game"]
            result["per_category_pointing_game"] = {c: v["pointing_game"] for c, v in summary["per_category"].items()}
        return result
