"""Detection and segmentation on the pre-trained tower: learnable toys, pre-trained weights kept, recipes end to end."""

import json

import numpy as np
import pytest
import torch

from plan_hf import PlanImageProcessor, PlanModel
from plan_hf.downstream.data import (
    DetectionCollator,
    SegmentationCollator,
    boxes_xyxy_to_xywh,
    load_detection_data,
    load_segmentation_data,
    mask_to_processed,
)
from plan_hf.downstream.detection import PlanForObjectDetection
from plan_hf.downstream.finetune import Task
from plan_hf.downstream.metrics import BoxSet, coco_map, dice_per_image
from plan_hf.downstream.segmentation import PlanForSegmentation
from plan_hf.tiny import tiny_plan_config


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from plan_hf.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, num_images=40, seed=0, image_size=64, workers=1, contact_sheet=False)
    return root


def squares(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 3, 64, 64) noise images with one bright square each, and its (count, 1, 4) xyxy box."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.3, (count, 64, 64)).astype(np.float32)
    boxes = np.zeros((count, 1, 4), np.float32)
    for i in range(count):
        side = int(rng.integers(12, 25))
        x, y = (int(v) for v in rng.integers(0, 64 - side, 2))
        images[i, y : y + side, x : x + side] += 1.5
        boxes[i, 0] = [x, y, x + side, y + side]
    return torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(boxes)


def _fit(model, step_fn, steps: int, lr: float = 2e-3) -> tuple[float, float]:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr)
    losses = []
    for _ in range(steps):
        loss = step_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return float(np.mean(losses[:3])), float(np.mean(losses[-3:]))


# --------------------------------------------------------------------------------------------------------------------
def test_detector_learns_a_toy_and_its_map_is_high():
    torch.manual_seed(0)
    model = PlanForObjectDetection(tiny_plan_config(num_labels=1, downstream_head_dim=32))
    images, boxes = squares(64, seed=0)
    generator = torch.Generator().manual_seed(0)

    def step():
        pick = torch.randint(0, 64, (8,), generator=generator)
        return model(images[pick], boxes[pick], torch.zeros(8, 1, dtype=torch.long)).loss

    first, last = _fit(model, step, steps=40)
    assert last < 0.4 * first, (first, last)
    model.eval()
    test_images, test_boxes = squares(16, seed=1)
    found = model.detect(test_images)
    predictions = [BoxSet.of(boxes_xyxy_to_xywh(found.boxes[i][found.keep[i]].numpy()), None,
                             found.scores[i][found.keep[i]].numpy()) for i in range(16)]
    truths = [BoxSet.of(boxes_xyxy_to_xywh(b.numpy())) for b in test_boxes]
    assert coco_map(predictions, truths)["map"] > 0.4  # ~0.7 measured; an untrained head scores ~0


@pytest.mark.parametrize("vision", ["resnet", "vit"])
def test_segmenter_learns_a_toy(vision):
    torch.manual_seed(0)
    model = PlanForSegmentation(tiny_plan_config(vision=vision, num_labels=1, downstream_head_dim=32))
    images, boxes = squares(48, seed=2)
    masks = torch.zeros(48, 64, 64)
    for i, (x0, y0, x1, y1) in enumerate(boxes[:, 0].long().tolist()):
        masks[i, y0:y1, x0:x1] = 1
    generator = torch.Generator().manual_seed(0)

    def step():
        pick = torch.randint(0, 40, (8,), generator=generator)
        return model(images[pick], masks[pick]).loss

    first, last = _fit(model, step, steps=30, lr=5e-3)
    assert last < 0.8 * first, (first, last)
    model.eval()
    with torch.no_grad():
        predicted = model(images[40:]).logits[:, 0].sigmoid().numpy() > 0.5
    assert dice_per_image(predicted, masks[40:].numpy()).mean() > 0.6  # held-out squares; ~0.85 measured


@pytest.mark.parametrize("model_class", [PlanForObjectDetection, PlanForSegmentation])
def test_dense_models_keep_the_pretrained_tower_and_a_frozen_tower_stays_put(export_dir, model_class):
    base = PlanModel.from_pretrained(export_dir)
    config = base.config
    config.num_labels, config.downstream_head_dim = 1, 16
    model = model_class.from_pretrained(export_dir, config=config)
    reference = base.vision_model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.vision_model.state_dict().items())
    if model_class is PlanForObjectDetection:  # the heat-map prior, not the generic zero bias
        assert model.heatmap_head[-1].bias.item() == pytest.approx(-np.log(9.0))
    model.freeze_vision_tower()
    model.train()
    images, boxes = squares(4, seed=3)
    if model_class is PlanForObjectDetection:
        targets = {"boxes": boxes, "box_labels": torch.zeros(4, 1, dtype=torch.long)}
    else:
        targets = {"masks": torch.zeros(4, 64, 64)}
    model(images, **targets).loss.backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert all(torch.equal(v, reference[k]) for k, v in model.vision_model.state_dict().items())  # BN stats too


def test_collators_map_targets_onto_the_padded_square():
    processor = PlanImageProcessor(size=64)
    image = np.zeros((128, 64), dtype=np.uint8)  # tall: resized to 64x32, padded left and right by 16
    mask = np.zeros((128, 64), dtype=bool)
    mask[0:64, 0:32] = True
    batch = DetectionCollator(processor)([{"image": image, "boxes": [[0, 0, 32, 64]], "box_labels": [0]},
                                          {"image": image, "boxes": [], "box_labels": []}])
    torch.testing.assert_close(batch["boxes"][0, 0], torch.tensor([16.0, 0.0, 32.0, 32.0]))
    assert batch["box_labels"].tolist() == [[0], [-1]]
    seg = SegmentationCollator(processor)([{"image": image, "mask": mask}])
    expected = np.zeros((64, 64), dtype=np.float32)
    expected[0:32, 16:32] = 1
    np.testing.assert_array_equal(seg["masks"][0].numpy(), expected)
    np.testing.assert_array_equal(mask_to_processed(mask, (0, 16, 64, 32), 64), expected)


def test_synthetic_task_data_reads_boxes_and_masks(synthetic_root):
    detection = load_detection_data("synthetic", synthetic_root)
    records = [json.loads(line) for line in (synthetic_root / "findings.jsonl").read_text().splitlines()]
    by_id = {r["dicom_id"]: r for r in records}
    row = next(r for r in detection.train.with_format(None) if r["boxes"])
    expected = [b for f in by_id[row["dicom_id"]]["findings"] if f["type"] != "support_device" for b in f["boxes"]]
    np.testing.assert_allclose(row["boxes"], expected)
    assert set(detection.ids("train")).isdisjoint(detection.ids("test"))
    segmentation = load_segmentation_data("synthetic", synthetic_root, finding_types=["cardiomegaly"])
    example = next(e for e in segmentation.train if by_id[e["dicom_id"]]["findings"]
                   and by_id[e["dicom_id"]]["findings"][0]["type"] == "cardiomegaly")
    assert example["mask"].shape == (example["image"].height, example["image"].width) and example["mask"].any()


@pytest.mark.parametrize("task", [Task.DETECTION, Task.SEGMENTATION])
def test_dense_recipes_run_end_to_end_on_the_synthetic_set(task, export_dir, synthetic_root, tmp_path):
    from training.finetune_detection import main as detection_main
    from training.finetune_segmentation import main as segmentation_main

    main = detection_main if task is Task.DETECTION else segmentation_main
    out = tmp_path / task.value
    main(["--model_name_or_path", str(export_dir), "--dataset", "synthetic", "--data_dir", str(synthetic_root),
          "--fraction", "0.5", "--max_steps", "2", "--micro_batch_size", "4", "--head_dim", "16",
          "--output_dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    expected = {"map", "ap_per_iou", "ap_per_class"} if task is Task.DETECTION else {"dice", "dice_with_lesion"}
    assert expected <= set(metrics["metrics"]) and metrics["training"]["steps"] == 2
    if task is Task.DETECTION:
        assert list(metrics["metrics"]["ap_per_iou"]) == [f"{t:.2f}" for t in np.arange(0.40, 0.76, 0.05)]
    else:
        assert 0.0 <= metrics["metrics"]["dice"] <= 1.0
    manifest = json.loads((out / "subset.json").read_text())
    assert len(manifest["train_ids"]) == round(0.5 * manifest["num_train_total"])
    assert (out / ("detections.png" if task is Task.DETECTION else "masks.png")).stat().st_size > 0
    model_class = PlanForObjectDetection if task is Task.DETECTION else PlanForSegmentation
    reloaded = model_class.from_pretrained(out / "model")
    assert reloaded.config.num_labels == 1
