"""Pre-training augmentation: seeded, never flipped, crops in range, content boxes true, evaluation untouched."""

import numpy as np
import pytest
import torch
from PIL import Image

from plan_hf.data.augment import Augmentation
from plan_hf.data.collator import PlanCollator

from .conftest import REPORTS, synthetic_xray

SIDE = 64
STILL = dict(max_rotation_degrees=0, max_translation=0, max_brightness=0, contrast_range=(1, 1))  # crop only


def ramps(boxes: torch.Tensor) -> torch.Tensor:
    """(B, 2, S, S): channel 0 = x / S, channel 1 = y / S of each pixel centre, on the real image only (0 on the
    padding). Bilinear sampling reproduces a linear ramp exactly, so the output reads back where each pixel came
    from."""
    centres = (torch.arange(SIDE, dtype=torch.float32) + 0.5) / SIDE
    x, y = centres.expand(SIDE, SIDE), centres[:, None].expand(SIDE, SIDE)
    out = torch.stack([x, y]).repeat(len(boxes), 1, 1, 1)
    for image, (top, left, height, width) in zip(out, boxes.tolist()):
        real = torch.zeros(SIDE, SIDE, dtype=torch.bool)
        real[top:top + height, left:left + width] = True
        image *= real
    return out


def boxes_of(batch_size: int) -> torch.Tensor:
    """Portrait, landscape and square images inside the padded square (top, left, height, width)."""
    kinds = torch.tensor([[0, 8, 64, 48], [12, 0, 40, 64], [0, 0, 64, 64]])
    return kinds[torch.arange(batch_size) % 3]


def test_seeded_draws_reproduce_and_differ_by_seed():
    pixels, boxes = torch.rand(6, 3, SIDE, SIDE), boxes_of(6)
    first = Augmentation()(pixels, boxes, torch.Generator().manual_seed(1), 0.5, 0.5)
    again = Augmentation()(pixels, boxes, torch.Generator().manual_seed(1), 0.5, 0.5)
    other = Augmentation()(pixels, boxes, torch.Generator().manual_seed(2), 0.5, 0.5)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first[0], other[0])


def test_crops_keep_the_scale_and_ratio_ranges_and_stay_on_the_image():
    boxes = boxes_of(60)
    out, new_boxes = Augmentation(**STILL)(ramps(boxes), boxes, torch.Generator().manual_seed(0))
    out = out * SIDE  # pixels
    assert torch.equal(new_boxes, boxes)  # a crop fills the image's box again
    scales, ratios = [], []
    for image, (top, left, height, width) in zip(out, boxes.tolist()):
        x = image[0, top:top + height, left:left + width]  # the source x of every output pixel
        y = image[1, top:top + height, left:left + width]
        # one pixel's step apart: the crop's side is (last - first) * side / (side - 1)
        crop_width = (x[:, -1] - x[:, 0]).mean() * width / (width - 1)
        crop_height = (y[-1] - y[0]).mean() * height / (height - 1)
        assert x.min() >= left and x.max() <= left + width and y.min() >= top and y.max() <= top + height
        scales.append(crop_width * crop_height / (width * height))
        ratios.append((crop_width / crop_height) / (width / height))
    scales, ratios = torch.stack(scales), torch.stack(ratios)
    assert scales.min() >= 0.6 - 1e-3 and scales.max() <= 1 + 1e-3
    assert ratios.min() >= 0.9 - 1e-3 and ratios.max() <= 1.1 + 1e-3
    assert scales.max() - scales.min() > 0.25  # the range is used, not one fixed zoom


def test_never_flips_and_rotates_only_a_little():
    boxes = boxes_of(60)
    out, _ = Augmentation(max_rotation_degrees=10)(ramps(boxes), boxes, torch.Generator().manual_seed(0))
    for image, (top, left, height, width) in zip(out, boxes.tolist()):
        centre = image[:, top + height // 2 - 4:top + height // 2 + 4, left + width // 2 - 4:left + width // 2 + 4]
        dx_dcol = (centre[0, :, -1] - centre[0, :, 0]).mean()  # source x along an output row
        dy_drow = (centre[1, -1] - centre[1, 0]).mean()  # source y down an output column
        dx_drow = (centre[0, -1] - centre[0, 0]).mean()
        assert dx_dcol > 0 and dy_drow > 0  # left stays left, top stays top
        assert abs(torch.atan2(dx_drow, dx_dcol)) <= torch.deg2rad(torch.tensor(10.0)) + 1e-3


def test_a_left_marked_image_keeps_its_mark_on_the_left(processor):
    image = np.full((SIDE, SIDE), 100, dtype=np.uint8)
    image[24:40, 6:18] = 255  # a bright mark on the image's left
    batch = processor(text=REPORTS[:1] * 32, images=[image] * 32, return_tensors="pt")
    out, _ = Augmentation()(batch["pixel_values"], batch["content_boxes"], torch.Generator().manual_seed(0), 0.5, 0.5)
    grey = out[:, 0].flatten(1)  # (B, S * S)
    threshold = (grey.median(dim=1).values + grey.max(dim=1).values) / 2  # between the background and the mark
    mark = (grey > threshold[:, None]).float().view(-1, SIDE, SIDE)  # (B, H, W)
    assert (mark.sum(dim=(1, 2)) > 20).all()
    columns = (mark.sum(1) * (torch.arange(SIDE) + 0.5)).sum(1) / mark.sum(dim=(1, 2))  # the mark's mean column
    assert (columns < SIDE * 0.4).all()  # a flip would put it at ~0.8 of the side


def test_content_boxes_bound_the_real_image_and_the_padding_stays_black():
    boxes = boxes_of(30)
    real = (ramps(boxes)[:, :1] > 0).float() * 0.8  # 0.8 on the real image, 0 on the padding
    augmentation = Augmentation(max_rotation_degrees=10, max_translation=0.1, max_brightness=0.1)
    out, new_boxes = augmentation(real * 2 - 1, boxes, torch.Generator().manual_seed(0), 0.5, 0.5)
    image = out[:, 0] * 0.5 + 0.5  # back to [0, 1]
    assert not torch.equal(new_boxes, boxes)  # shifted and rotated
    for picture, (top, left, height, width) in zip(image, new_boxes.tolist()):
        inside = torch.zeros_like(picture, dtype=torch.bool)
        inside[top:top + height, left:left + width] = True
        assert (picture[~inside] == 0).all()  # nothing real outside the box, the padding exactly black
        assert (picture[top] > 0).any() and (picture[top + height - 1] > 0).any()  # and the box is tight
        assert (picture[:, left] > 0).any() and (picture[:, left + width - 1] > 0).any()


def test_bad_ranges_name_the_field():
    with pytest.raises(ValueError, match="Augmentation.crop_scale"):
        Augmentation(crop_scale=(0.5, 1.2))
    with pytest.raises(ValueError, match="Augmentation.max_translation"):
        Augmentation(max_translation=0.6)


def test_collator_augments_for_training_only(processor):
    rows = [{"image": Image.fromarray(synthetic_xray(i, height=70, width=60)), "text": REPORTS[i]} for i in range(4)]
    evaluation = PlanCollator(processor)
    first, again = evaluation(rows), evaluation(rows)
    expected = processor(text=REPORTS[:4], images=[r["image"] for r in rows], return_tensors="pt")
    for name, value in first.items():  # evaluation batches are the processor's, every time
        torch.testing.assert_close(value, again[name], rtol=0, atol=0)
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    training = PlanCollator(processor, augment=True, seed=0)
    augmented = training(rows)
    assert not torch.allclose(augmented["pixel_values"], first["pixel_values"])
    assert augmented["content_boxes"].shape == first["content_boxes"].shape
    assert not torch.equal(augmented["content_boxes"], first["content_boxes"])
    torch.testing.assert_close(augmented["input_ids"], first["input_ids"])  # text untouched
