"""Golden values, computed by hand in the comments, for `plan_hf.metrics`."""

import math

import numpy as np
import pytest

from plan_hf.metrics import (
    accuracy_at,
    aggregate_by_category,
    bootstrap_ci,
    boxes_to_mask,
    class_precision_at_k,
    cnr,
    f1_max,
    grounding_iou,
    grounding_miou,
    multiclass_metrics,
    multilabel_metrics,
    normalize_heatmap,
    pointing_game,
    retrieval_metrics,
    roc_auc,
)

BOX = [[1, 1, 2, 2]]  # rows 1-2, columns 1-2 of a 4x4 map

# Inside the box: 4, 2, 2, 4 -> mean 3, population variance 1.
# Outside (12 pixels): six 0s and six 2s -> mean 1, variance 1.
# CNR = |3 - 1| / sqrt(1 + 1) = sqrt(2).
CNR_MAP = np.array(
    [
        [0, 2, 0, 2],
        [2, 4, 2, 0],
        [0, 2, 4, 2],
        [2, 0, 2, 0],
    ],
    dtype=float,
)

# Integers 0..10 so that the min-max normalised map is exactly k / 10.
# Box pixels: 10, 5, 3, 4 (normalised 1.0, 0.5, 0.3, 0.4).
MIOU_MAP = np.array(
    [
        [0, 1, 2, 0],
        [1, 10, 5, 0],
        [0, 3, 4, 0],
        [0, 0, 0, 0],
    ],
    dtype=float,
)


# --- boxes_to_mask -------------------------------------------------------------------------------------------


def test_integer_box_covers_exactly_its_pixels():
    expected = np.zeros((4, 4), bool)
    expected[1:3, 1:3] = True
    np.testing.assert_array_equal(boxes_to_mask(BOX, 4, 4), expected)


def test_fractional_box_covers_every_pixel_it_overlaps():
    # x = 1.7, w = 0.6 -> columns floor(1.7) = 1 .. ceil(2.3) - 1 = 2 (a pixel-centre rule would keep none: centres
    # 1.5 and 2.5 lie outside [1.7, 2.3)); y = 1.2, h = 0.5 -> row floor(1.2) = 1 .. ceil(1.7) - 1 = 1.
    expected = np.zeros((4, 4), bool)
    expected[1, 1:3] = True
    np.testing.assert_array_equal(boxes_to_mask([[1.7, 1.2, 0.6, 0.5]], 4, 4), expected)


def test_box_over_the_image_edge_is_clipped():
    # x = 2, w = 5 -> columns 2..6, clipped to 2..3; y = -1, h = 2 -> rows -1..0, clipped to 0.
    expected = np.zeros((4, 4), bool)
    expected[0, 2:4] = True
    np.testing.assert_array_equal(boxes_to_mask([[2, -1, 5, 2]], 4, 4), expected)


def test_union_of_overlapping_boxes_and_degenerate_boxes():
    # (0,0,2,2) covers rows/cols 0-1, (1,1,2,1) covers row 1, cols 1-2: union = 4 + 2 - 1 = 5 pixels.
    # A box fully off the image and a zero-width box add nothing.
    boxes = [[0, 0, 2, 2], [1, 1, 2, 1], [5, 5, 2, 2], [1.5, 0, 0, 3]]
    mask = boxes_to_mask(boxes, 4, 4)
    assert mask.sum() == 5
    assert mask[1, 2] and not mask[2, 1]


def test_empty_box_list_gives_empty_mask_and_negative_size_raises():
    assert not boxes_to_mask([], 3, 5).any() and boxes_to_mask([], 3, 5).shape == (3, 5)
    with pytest.raises(ValueError, match="width and height"):
        boxes_to_mask([[0, 0, -1, 2]], 4, 4)


# --- CNR -----------------------------------------------------------------------------------------------------


def test_cnr_by_hand():
    assert cnr(CNR_MAP, BOX) == pytest.approx(math.sqrt(2), abs=1e-12)


def test_signed_cnr_by_hand_tells_a_map_that_avoids_the_box():
    from plan_hf.metrics import signed_cnr

    # Box (2, -1, 5, 2): inside mean 1, var 1; outside mean 11/7, var 89/49 (see the next test): the map is lower
    # inside, so the field's CNR is positive and the signed one negative, of the same size.
    expected = (1 - 11 / 7) / math.sqrt(1 + 89 / 49)
    assert signed_cnr(CNR_MAP, [[2, -1, 5, 2]]) == pytest.approx(expected, abs=1e-12) and expected < 0
    assert cnr(CNR_MAP, [[2, -1, 5, 2]]) == pytest.approx(-expected, abs=1e-12)
    assert signed_cnr(CNR_MAP, BOX) == pytest.approx(cnr(CNR_MAP, BOX), abs=1e-12)  # higher inside: the same
    assert signed_cnr(-CNR_MAP, BOX) == pytest.approx(-cnr(CNR_MAP, BOX), abs=1e-12)


def test_cnr_is_invariant_to_affine_rescaling():
    assert cnr(3.0 * CNR_MAP + 7.0, BOX) == pytest.approx(math.sqrt(2), abs=1e-12)


def test_cnr_with_a_box_over_the_edge():
    # Box (2, -1, 5, 2) covers row 0, columns 2-3: values 0, 2 -> mean 1, var 1.
    # Outside (14 px): row 0 cols 0-1 = 0, 2; rows 1-3 = 2,4,2,0, 0,2,4,2, 2,0,2,0 -> sum 22, mean 22/14 = 11/7;
    # sum of squares 4 + (4+16+4+0) + (0+4+16+4) + (4+0+4+0) = 60, var = 60/14 - (11/7)^2 = 210/49 - 121/49 = 89/49.
    expected = abs(1 - 11 / 7) / math.sqrt(1 + 89 / 49)
    assert cnr(CNR_MAP, [[2, -1, 5, 2]]) == pytest.approx(expected, abs=1e-12)


def test_constant_map_has_zero_cnr_despite_rounding():
    # 0.1 is not exact in binary: a naive mean/var gives contrast ~1e-17 over noise ~1e-17, i.e. CNR ~1.
    assert cnr(np.full((4, 4), 0.1), BOX) == 0.0


def test_noise_free_separation_has_infinite_cnr():
    heatmap = np.full((4, 4), 0.1)
    heatmap[1:3, 1:3] = 0.7
    assert cnr(heatmap, BOX) == math.inf


def test_cnr_undefined_without_inside_or_outside():
    assert math.isnan(cnr(CNR_MAP, []))
    assert math.isnan(cnr(CNR_MAP, [[10, 10, 2, 2]]))  # off the image
    assert math.isnan(cnr(CNR_MAP, [[0, 0, 4, 4]]))  # nothing outside


def test_infinite_pixels_are_rejected():
    heatmap = CNR_MAP.copy()
    heatmap[0, 0] = np.inf
    with pytest.raises(ValueError, match="inf"):
        cnr(heatmap, BOX)


def _pad_with_nan(crop: np.ndarray) -> np.ndarray:
    """The crop at rows 1..4, columns 2..5 of a 6x7 map that is NaN elsewhere."""
    padded = np.full((6, 7), np.nan)
    padded[1:5, 2:6] = crop
    return padded


@pytest.mark.parametrize(
    "crop_box, padded_box",
    [
        ([1, 1, 2, 2], [3, 2, 2, 2]),  # shifted by (+2, +1)
        ([2, 0, 2, 2], [4, 1, 3, 2]),  # the padded box reaches into the NaN column 6
        ([0, 0, 1, 4], [1, 0, 2, 6]),  # reaches into NaN on three sides
    ],
)
def test_nan_outside_the_crop_scores_like_the_crop(crop_box, padded_box):
    for heatmap in (CNR_MAP, MIOU_MAP):
        padded = _pad_with_nan(heatmap)
        assert cnr(padded, [padded_box]) == pytest.approx(cnr(heatmap, [crop_box]), abs=1e-12)
        assert grounding_iou(padded, [padded_box]) == pytest.approx(grounding_iou(heatmap, [crop_box]), abs=1e-12)
        assert pointing_game(padded, [padded_box]) == pointing_game(heatmap, [crop_box])


def test_box_only_over_nan_is_undefined():
    padded = _pad_with_nan(CNR_MAP)
    assert math.isnan(cnr(padded, [[0, 0, 2, 6]]))
    assert math.isnan(grounding_miou(padded, [[0, 0, 2, 6]]))
    assert math.isnan(pointing_game(padded, [[0, 0, 2, 6]]))


# --- mIoU ----------------------------------------------------------------------------------------------------


def test_iou_per_threshold_by_hand():
    # Foreground (normalised >= t) vs the 4 box pixels (10, 5, 3, 4):
    # t=0.1: values >= 1 -> 1,2,1,10,5,3,4 = 7 px, all 4 box px in it -> 4/7
    # t=0.2: values >= 2 -> 2,10,5,3,4 = 5 px -> 4/5
    # t=0.3: values >= 3 -> 10,5,3,4 = the box -> 1 (3/10 == 0.3 exactly: the ">=" rule decides this one)
    # t=0.4: values >= 4 -> 10,5,4 -> 3/4
    # t=0.5: values >= 5 -> 10,5 -> 2/4
    ious = grounding_iou(MIOU_MAP, BOX)
    assert list(ious) == [0.1, 0.2, 0.3, 0.4, 0.5]
    np.testing.assert_allclose(list(ious.values()), [4 / 7, 4 / 5, 1.0, 3 / 4, 1 / 2], atol=1e-12)
    assert grounding_miou(MIOU_MAP, BOX) == pytest.approx((4 / 7 + 0.8 + 1.0 + 0.75 + 0.5) / 5, abs=1e-12)


def test_iou_normalises_min_max():
    # (v + 10 - 10) / (20 - 10) = v / 10 exactly: shifting the map changes nothing; neither does scaling by 2.
    assert grounding_iou(MIOU_MAP + 10.0, BOX) == grounding_iou(MIOU_MAP, BOX)
    assert grounding_iou(2.0 * MIOU_MAP, BOX) == grounding_iou(MIOU_MAP, BOX)


def test_iou_custom_thresholds():
    # t=0.6: only 10 -> 1/4; t=1.0: the max pixel itself is foreground -> 1/4.
    assert grounding_iou(MIOU_MAP, BOX, thresholds=(0.6, 1.0)) == pytest.approx({0.6: 0.25, 1.0: 0.25})


def test_constant_map_normalises_to_zeros_and_has_zero_iou():
    np.testing.assert_array_equal(normalize_heatmap(np.full((2, 3), 5.0)), np.zeros((2, 3)))
    assert grounding_miou(np.full((4, 4), 5.0), BOX) == 0.0


def test_miou_undefined_without_boxes():
    assert all(math.isnan(v) for v in grounding_iou(MIOU_MAP, []).values())
    assert math.isnan(grounding_miou(MIOU_MAP, []))


# --- pointing game -------------------------------------------------------------------------------------------


def test_pointing_game_hit_and_miss():
    heatmap = np.zeros((4, 4))
    heatmap[2, 1] = 1.0  # inside the box
    assert pointing_game(heatmap, BOX) == 1.0
    heatmap[3, 3] = 2.0  # new maximum outside
    assert pointing_game(heatmap, BOX) == 0.0
    heatmap[3, 3] = np.nan  # NaN is not a maximum
    assert pointing_game(heatmap, BOX) == 1.0


def test_pointing_game_ties_score_the_share_inside():
    heatmap = np.zeros((4, 4))
    heatmap[0, 0] = heatmap[1, 1] = 1.0  # one of two maxima inside (first in row-major order is outside)
    assert pointing_game(heatmap, BOX) == 0.5
    heatmap[2, 2] = 1.0  # two of three inside
    assert pointing_game(heatmap, BOX) == pytest.approx(2 / 3)
    # Constant map: 4 of 16 pixels are in the box.
    assert pointing_game(np.ones((4, 4)), BOX) == 0.25


def test_pointing_game_undefined_without_boxes():
    assert math.isnan(pointing_game(CNR_MAP, []))


# --- aggregation ---------------------------------------------------------------------------------------------


def test_aggregate_by_category_by_hand():
    records = [
        {"category": "A", "cnr": 1.0, "pointing": 1.0},
        {"category": "A", "cnr": 2.0, "pointing": 0.0},
        {"category": "A", "cnr": 3.0, "pointing": 0.0},
        {"category": "B", "cnr": 6.0, "pointing": 1.0},
        {"category": "B", "cnr": math.nan, "pointing": 1.0},
    ]
    out = aggregate_by_category(records, keys=("cnr", "pointing"))
    # A: cnr (1+2+3)/3 = 2, pointing 1/3; B: cnr 6 (NaN left out), pointing 1.
    assert out["per_category"] == {
        "A": {"count": 3, "cnr": 2.0, "pointing": pytest.approx(1 / 3)},
        "B": {"count": 2, "cnr": 6.0, "pointing": 1.0},
    }
    # macro: cnr (2+6)/2 = 4, pointing (1/3+1)/2 = 2/3; micro: cnr (1+2+3+6)/4 = 3, pointing 3/5.
    assert out["macro"] == {"cnr": 4.0, "pointing": pytest.approx(2 / 3)}
    assert out["micro"] == {"cnr": 3.0, "pointing": pytest.approx(0.6)}
    assert out["count"] == 5
    assert out["num_undefined"] == {"cnr": 1, "pointing": 0}


# --- classification ------------------------------------------------------------------------------------------


def test_roc_auc_by_hand_with_ties():
    # Positives 0.35, 0.8, 0.4; negatives 0.1, 0.4, 0.4. Pairs won (tie = 1/2):
    # 0.35: 1 (beats 0.1); 0.8: 3; 0.4: 1 + 0.5 + 0.5 = 2. AUC = 6/9.
    y = [0, 0, 1, 1, 0, 1]
    s = [0.1, 0.4, 0.35, 0.8, 0.4, 0.4]
    assert roc_auc(y, s) == pytest.approx(2 / 3)


def test_roc_auc_matches_sklearn_with_many_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=200)
    s = rng.integers(0, 6, size=200) + 0.5 * y  # six score levels: many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_roc_auc_single_class_is_nan():
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.5, 0.9]))


def test_f1_max_keeps_tie_groups_together():
    # P = 2. Cuts: t=0.9 TP1 FP0 -> 2/(1+0+2) = 2/3; t=0.5 TP2 FP1 -> 4/5; t=0.1 TP2 FP2 -> 4/6.
    # Splitting the 0.5 tie after the positive would give an unreachable F1 of 1.
    assert f1_max([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx((0.8, 0.5))


def test_f1_max_ties_in_f1_return_the_highest_threshold():
    # P = 2. t=0.9 -> 2/3; t=0.6 -> 2/4; t=0.5 -> 2/5; t=0.1 TP2 FP2 -> 4/6 = 2/3, tied with t=0.9.
    assert f1_max([1, 0, 0, 1], [0.9, 0.6, 0.5, 0.1]) == pytest.approx((2 / 3, 0.9))


def test_f1_max_without_positives_is_nan():
    f1, threshold = f1_max([0, 0], [0.2, 0.3])
    assert math.isnan(f1) and math.isnan(threshold)


def test_accuracy_at_counts_the_threshold_as_positive():
    # score >= 0.9 -> [1, 0, 0, 0], all correct (">" would miss the first: 3/4).
    assert accuracy_at([1, 0, 0, 0], [0.9, 0.5, 0.5, 0.1], 0.9) == 1.0


def test_multiclass_metrics_by_hand():
    logits = np.array([[2, 1, 0], [0, 3, 1], [1, 0, 2], [0, 1, 4]], dtype=float)
    y = np.array([0, 1, 1, 2])
    out = multiclass_metrics(y, logits, class_names=["a", "b", "c"])
    # argmax = [0, 1, 2, 2]: 3 of 4 right.
    assert out["accuracy"] == 0.75
    # F1: a tp1 -> 1; b tp1 fn1 -> 2/3; c tp1 fp1 -> 2/3; macro 7/9.
    assert out["macro_f1"] == pytest.approx(7 / 9)
    assert [v["f1"] for v in out["per_class"].values()] == pytest.approx([1, 2 / 3, 2 / 3])
    # Softmax p_b per row: 0.245, 0.844, 0.090, 0.047. Positives rows 1, 2: 0.844 beats both negatives, 0.090
    # beats only 0.047 -> 3/4. (Raw logits 1, 3, 0, 1 would give 2/4.) p_a and p_c rank their positive first -> 1.
    assert [v["auc"] for v in out["per_class"].values()] == pytest.approx([1.0, 0.75, 1.0])
    assert out["macro_auc"] == pytest.approx(11 / 12)


def test_multiclass_macro_f1_matches_sklearn_with_an_absent_class():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 5))
    logits[:, 4] -= 10  # class 4 is never predicted
    y = rng.integers(0, 4, size=50)  # nor present
    out = multiclass_metrics(y, logits)
    assert out["macro_f1"] == pytest.approx(f1_score(y, logits.argmax(1), average="macro"), abs=1e-12)
    assert math.isnan(out["per_class"]["4"]["auc"])


def test_multilabel_metrics_by_hand():
    # Class "a": y = 1,1,0,0,0; s = .9,.5,.5,.1,.2. F1max 0.8 at 0.5 (cuts .9: 2/3, .5: 4/5, .2: 4/6, .1: 4/7).
    # AUC: 0.9 beats 3 negatives; 0.5 ties 0.5, beats 0.1 and 0.2 -> 2.5; (3 + 2.5)/6 = 11/12.
    # Accuracy at 0.5: predictions 1,1,1,0,0 -> 4/5.
    # Class "b" has no positive: AUC, F1max, its threshold and the accuracy there are undefined.
    y = np.array([[1, 0], [1, 0], [0, 0], [0, 0], [0, 0]])
    s = np.array([[0.9, 0.1], [0.5, 0.6], [0.5, 0.7], [0.1, 0.3], [0.2, 0.4]])
    out = multilabel_metrics(y, s, class_names=["a", "b"])
    assert out["per_class"]["a"] == pytest.approx({"auc": 11 / 12, "f1_max": 0.8, "threshold": 0.5, "accuracy": 0.8})
    assert all(math.isnan(v) for v in out["per_class"]["b"].values())
    assert out["macro"] == pytest.approx({"auc": 11 / 12, "f1_max": 0.8, "accuracy": 0.8})
    # At a fixed 0.5: "b" predicts 0,1,1,0,0 -> 3/5; macro accuracy (0.8 + 0.6)/2.
    fixed = multilabel_metrics(y, s, class_names=["a", "b"], threshold=0.5)
    assert fixed["per_class"]["b"]["accuracy"] == pytest.approx(0.6)
    assert fixed["macro"]["accuracy"] == pytest.approx(0.7)


def _auc_fixture() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(123)
    y = np.r_[np.zeros(30), np.ones(30)].astype(int)
    return y, y + rng.normal(0.0, 1.0, size=60)


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate():
    y, s = _auc_fixture()
    first = bootstrap_ci(roc_auc, y, s, n_boot=300, seed=7)
    assert first == bootstrap_ci(roc_auc, y, s, n_boot=300, seed=7)
    assert first != bootstrap_ci(roc_auc, y, s, n_boot=300, seed=8)
    assert first["estimate"] == roc_auc(y, s)
    assert first["low"] < first["estimate"] < first["high"]
    assert first["num_skipped"] == 0 and first["n_boot"] == 300
    narrower = bootstrap_ci(roc_auc, y, s, n_boot=300, seed=7, alpha=0.5)
    assert first["low"] < narrower["low"] < narrower["high"] < first["high"]


def test_bootstrap_ci_skips_and_counts_undefined_resamples():
    # With 3 rows, about 1/3 of resamples hold a single class, where AUC is undefined.
    y, s = np.array([0, 1, 1]), np.array([0.2, 0.9, 0.1])
    values: list[float] = []

    def recording_auc(y_b: np.ndarray, s_b: np.ndarray) -> float:
        value = roc_auc(y_b, s_b)
        if y_b is not y:  # not the point estimate on the original arrays
            values.append(value)
        return value

    out = bootstrap_ci(recording_auc, y, s, n_boot=200, seed=0)
    resampled = np.array(values)
    assert resampled.size == 200
    assert out["num_skipped"] == int(np.isnan(resampled).sum()) > 0
    kept = resampled[~np.isnan(resampled)]
    assert out["low"] == pytest.approx(np.quantile(kept, 0.025))
    assert out["high"] == pytest.approx(np.quantile(kept, 0.975))


def test_bootstrap_ci_rejects_misaligned_arrays():
    with pytest.raises(ValueError, match="same number of rows"):
        bootstrap_ci(roc_auc, np.array([0, 1]), np.array([0.1, 0.2, 0.3]))


# --- retrieval -----------------------------------------------------------------------------------------------

# 3 images x 4 texts; texts 0, 1 describe image 0, text 2 image 1, text 3 image 2.
SIM = np.array(
    [
        [0.2, 0.6, 0.6, 0.1],
        [0.5, 0.4, 0.3, 0.9],
        [0.1, 0.2, 0.3, 0.7],
    ]
)
TXT_TO_IMG = np.array([0, 0, 1, 2])


def test_retrieval_metrics_by_hand_with_ties_and_several_captions():
    # i2t: image 0's best caption (t1, 0.6) ties with negative t2 -> rank 2; image 1's t2 (0.3) is beaten by
    # 0.5, 0.4, 0.9 -> rank 4; image 2's t3 (0.7) is first -> rank 1. Ranks [2, 4, 1].
    # t2i: t0 (0.2) beaten by image 1 (0.5) -> 2; t1 (0.6) first -> 1; t2 (0.3) beaten by 0.6 and tied 0.3 -> 3;
    # t3 (0.7) beaten by 0.9 -> 2. Ranks [2, 1, 3, 2].
    out = retrieval_metrics(SIM, TXT_TO_IMG, ks=(1, 2, 5))
    assert out == pytest.approx(
        {
            "i2t_recall@1": 1 / 3,
            "i2t_recall@2": 2 / 3,
            "i2t_recall@5": 1.0,
            "i2t_median_rank": 2.0,
            "t2i_recall@1": 1 / 4,
            "t2i_recall@2": 3 / 4,
            "t2i_recall@5": 1.0,
            "t2i_median_rank": 2.0,
        }
    )


def test_retrieval_positives_as_matrix_or_identity():
    matrix = np.zeros(SIM.shape, bool)
    matrix[TXT_TO_IMG, np.arange(4)] = True
    assert retrieval_metrics(SIM, matrix) == retrieval_metrics(SIM, TXT_TO_IMG)
    # Square, text i describes image i. i2t ranks: 0.9 ties 0.9 -> 2; 0.5 < 0.7 -> 2; 0.8 first -> 1.
    # t2i ranks: 0.9 first -> 1; 0.5 < 0.9 -> 2; 0.8 first -> 1. Medians 2 and 1.
    square = np.array([[0.9, 0.9, 0.1], [0.2, 0.5, 0.7], [0.3, 0.3, 0.8]])
    out = retrieval_metrics(square, ks=(1,))
    assert out == pytest.approx(
        {"i2t_recall@1": 1 / 3, "i2t_median_rank": 2.0, "t2i_recall@1": 2 / 3, "t2i_median_rank": 1.0}
    )


def test_retrieval_query_without_positive_raises():
    with pytest.raises(ValueError, match="no positive"):
        retrieval_metrics(SIM, np.array([0, 0, 1, 1]))  # image 2 has no caption


def test_class_precision_at_k_by_hand():
    sim = np.array(
        [
            [0.9, 0.8, 0.8, 0.1],
            [0.5, 0.5, 0.2, 0.5],
            [0.3, 0.1, 0.7, 0.6],
            [0.4, 0.4, 0.4, 0.4],
        ]
    )
    img_labels = np.array([0, 0, 1, 1])
    txt_labels = np.array([0, 1, 1, 0])
    out = class_precision_at_k(sim, img_labels, txt_labels, ks=(1, 2, 3))
    # i2t (hits: same label; ties filled with misses first):
    #  img0 hits t0,t3: t0 | tie {t1,t2} both misses -> P@1 1, P@2 1/2, P@3 1/3
    #  img1 hits t0,t3: all of t0,t1,t3 tied at 0.5 (1 miss) -> P@1 0, P@2 1/2, P@3 2/3
    #  img2 hits t1,t2: t2, t3, t0, t1 -> P@1 1, P@2 1/2, P@3 1/3
    #  img3 hits t1,t2: all tied (2 misses) -> P@1 0, P@2 0, P@3 1/3
    # t2i:
    #  t0 hits img0,img1: img0, img1, img3, img2 -> 1, 1, 2/3
    #  t1 hits img2,img3: img0, img1, img3, img2 -> 0, 0, 1/3
    #  t2 hits img2,img3: img0, img2, img3, img1 -> 0, 1/2, 2/3
    #  t3 hits img0,img1: img2, img1, img3, img0 -> 0, 1/2, 1/3
    assert out == pytest.approx(
        {
            "i2t_precision@1": 2 / 4,
            "i2t_precision@2": 1.5 / 4,
            "i2t_precision@3": (1 / 3 + 2 / 3 + 1 / 3 + 1 / 3) / 4,
            "t2i_precision@1": 1 / 4,
            "t2i_precision@2": 2 / 4,
            "t2i_precision@3": 2 / 4,
        }
    )


def test_class_precision_k_beyond_candidates_raises():
    with pytest.raises(ValueError, match="k=5"):
        class_precision_at_k(np.eye(3), [0, 1, 2], [0, 1, 2], ks=(5,))


def test_side_agreement_by_hand():
    from plan_hf.metrics import side_agreement

    heatmap = np.zeros((4, 6))
    heatmap[1, 1] = 3.0  # mass on the left half (columns 0-2)
    heatmap[2, 4] = 1.0
    left_box, right_box = [0, 0, 2, 2], [4, 1, 2, 2]
    assert side_agreement(heatmap, [left_box]) == 1.0
    assert side_agreement(heatmap, [right_box]) == 0.0
    assert side_agreement(heatmap, [[3, 0, 2, 2]]) == 0.0  # x in [3, 5): the right half, which has less mass
    assert math.isnan(side_agreement(heatmap, [left_box, right_box]))  # bilateral
    assert math.isnan(side_agreement(heatmap, [[2, 0, 2, 2]]))  # straddles the midline
    assert math.isnan(side_agreement(heatmap, []))
    assert side_agreement(np.full((4, 6), 0.2), [left_box]) == 0.5  # a constant map: a tie
    # Negative values are shifted to a minimum of 0; NaN (outside the image) is ignored; an odd width drops the
    # middle column (column 2 of 5 here holds the maximum and counts for neither side).
    shifted = np.array([[-1.0, -1.0, 5.0, -0.5, np.nan]])
    assert side_agreement(shifted, [[3, 0, 2, 1]]) == 1.0  # right: 0.5 > left: 0
