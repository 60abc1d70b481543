"""Hand-computed golden values for the dense-task metrics (mAP through pycocotools, Dice) and the box utilities."""

import numpy as np
import pytest
import torch

from plan_hf.downstream.detection import box_iou, centernet_targets, decode_centernet, fast_nms
from plan_hf.downstream.metrics import MGCA_IOU_THRESHOLDS, BoxSet, coco_map, dice_per_image, mean_dice


def _shift_for_iou(side: float, iou: float) -> float:
    """Horizontal shift of a side x side square that leaves IoU `iou` with the original: inter = side * (side - dx)."""
    intersection = iou * 2 * side * side / (1 + iou)
    return side - intersection / side


def test_thresholds_are_mgca_040_to_075():
    assert MGCA_IOU_THRESHOLDS == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


def test_map_perfect_predictions_is_one():
    truths = [BoxSet.of([[10, 10, 20, 20], [50, 60, 30, 10]]), BoxSet.of([[0, 0, 5, 8]]), BoxSet.of(np.zeros((0, 4)))]
    predictions = [BoxSet.of(t.boxes, t.labels, np.full(len(t.boxes), 0.9)) for t in truths]
    result = coco_map(predictions, truths)
    assert result["map"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in result["ap_per_iou"].values())


@pytest.mark.parametrize("iou, passed", [(0.52, 3), (0.62, 5), (0.42, 1)])
def test_map_of_a_shifted_box_counts_only_the_thresholds_it_passes(iou, passed):
    truth = [BoxSet.of([[10, 10, 20, 20]])]
    prediction = [BoxSet.of([[10 + _shift_for_iou(20, iou), 10, 20, 20]], scores=[0.9])]
    result = coco_map(prediction, truth)
    assert result["map"] == pytest.approx(passed / 8)
    per_iou = list(result["ap_per_iou"].values())
    assert per_iou[:passed] == pytest.approx([1.0] * passed) and per_iou[passed:] == pytest.approx([0.0] * (8 - passed))


def test_map_ranks_a_confident_false_positive_on_a_negative_image_first():
    truths = [BoxSet.of([[10, 10, 20, 20]]), BoxSet.of(np.zeros((0, 4)))]
    true_positive = BoxSet.of([[10, 10, 20, 20]], scores=[0.8])
    # Above the true positive: precision 1/2 at recall 1, so interpolated AP is 0.5 at every threshold.
    assert coco_map([true_positive, BoxSet.of([[0, 0, 9, 9]], scores=[0.9])], truths)["map"] == pytest.approx(0.5)
    # Below it: recall 1 is reached at precision 1 first.
    assert coco_map([true_positive, BoxSet.of([[0, 0, 9, 9]], scores=[0.1])], truths)["map"] == pytest.approx(1.0)


def test_map_averages_classes_with_truth_and_handles_no_detections():
    truths = [BoxSet.of([[10, 10, 20, 20], [40, 40, 10, 10]], [0, 1])]
    # Class 1's box is found with the wrong class: class 0 AP 1, class 1 AP 0; class 2 has no truth (left out).
    predictions = [BoxSet.of([[10, 10, 20, 20], [40, 40, 10, 10]], [0, 2], [0.9, 0.8])]
    result = coco_map(predictions, truths, num_classes=3)
    assert result["map"] == pytest.approx(0.5)
    assert result["ap_per_class"][0] == pytest.approx(1.0) and result["ap_per_class"][1] == pytest.approx(0.0)
    assert np.isnan(result["ap_per_class"][2])
    assert coco_map([BoxSet.of(np.zeros((0, 4)), scores=[])], truths[:1])["map"] == 0.0


def test_dice_hand_values_and_empty_convention():
    predicted = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]], [[1, 1, 1, 1]]], dtype=bool)
    target = np.array([[[1, 0, 0, 0]], [[0, 0, 0, 0]], [[0, 1, 0, 0]], [[1, 1, 0, 0]]], dtype=bool)
    # 2*1/(2+1); empty-empty = 1; missed lesion = 0; 2*2/(4+2)
    np.testing.assert_allclose(dice_per_image(predicted, target), [2 / 3, 1.0, 0.0, 2 / 3])
    pairs = [(np.ones((2, 3)), np.ones((2, 3))), (np.zeros((4, 4)), np.eye(4))]  # different sizes per image
    assert mean_dice(pairs) == pytest.approx(0.5)


def test_box_iou_and_fast_nms():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[50 / 150, 0.0]]))
    boxes = torch.tensor([[[0.0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [50, 50, 60, 60]]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    labels = torch.tensor([[0, 0, 1, 0]])
    # The second box overlaps the first (same class, IoU 0.82): dropped; the third is another class; the fourth is
    # apart.
    assert fast_nms(boxes, scores, labels, 0.5).tolist() == [[True, False, True, True]]
    # Scores out of order: suppression follows the score, not the position.
    assert fast_nms(boxes, scores.flip(1), labels, 0.5).tolist() == [[False, True, True, True]]


def test_centernet_targets_decode_back_to_the_boxes():
    """Perfect head outputs built from the targets must decode to the input boxes: catches stride/offset/size bugs."""
    boxes = torch.tensor([[[8.0, 12.0, 40.0, 30.0], [33.0, 35.0, 61.0, 63.0]], [[2.0, 3.0, 14.0, 50.0], [0, 0, 0, 0]]])
    labels = torch.tensor([[0, 1], [1, -1]])
    stride, size = 4.0, (16, 16)
    targets = centernet_targets(boxes, labels, 2, size, stride)
    assert targets.heatmap.shape == (2, 2, 16, 16) and targets.valid.tolist() == [[True, True], [True, False]]
    assert targets.heatmap.amax(dim=(2, 3)).tolist() == [[1.0, 1.0], [0.0, 1.0]]
    logits = torch.where(targets.heatmap == 1, torch.tensor(10.0), torch.tensor(-10.0))
    sizes, offsets = torch.zeros(2, 2, 256), torch.zeros(2, 2, 256)
    for b in range(2):
        for n in range(2):
            if targets.valid[b, n]:
                sizes[b, :, targets.centers[b, n]] = targets.sizes[b, n]
                offsets[b, :, targets.centers[b, n]] = targets.offsets[b, n]
    found = decode_centernet(logits, sizes.view(2, 2, 16, 16), offsets.view(2, 2, 16, 16), stride, (64, 64),
                             top_k=5, score_threshold=0.5)
    for b, expected in enumerate([boxes[0], boxes[1, :1]]):
        kept = found.boxes[b][found.keep[b]]
        order = kept[:, 0].argsort()
        torch.testing.assert_close(kept[order], expected[expected[:, 0].argsort()], atol=1e-4, rtol=0)
    assert sorted(found.labels[0][found.keep[0]].tolist()) == [0, 1]


def test_soft_dice_loss_pools_the_batch():
    from plan_hf.downstream.segmentation import soft_dice_loss

    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2, :2] = 1  # image 1 has no lesion
    perfect = (target * 2 - 1) * 20
    assert soft_dice_loss(perfect, target).item() < 1e-3
    # Half the lesion found, nothing predicted on the empty image: pooled Dice = 2*2/(2+4), smooth=1 -> 1 - 5/7.
    half = torch.full_like(target, -20.0)
    half[0, 0, 0, :2] = 20
    assert soft_dice_loss(half, target).item() == pytest.approx(1 - 5 / 7, abs=1e-4)


def test_roc_points_match_a_hand_computed_curve():
    from plan_hf.downstream.report import roc_points

    fpr, tpr = roc_points(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.8, 0.1]))
    # thresholds 0.9 | 0.8 (a tie: one positive and one negative pass together) | 0.1
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
