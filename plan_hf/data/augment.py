"""Standard image-text pre-training augmentation (as GLoRIA / MGCA use), on a processed batch, in torch.

Per image: a random resized crop of the real image (not the padding around it), a small rotation and translation,
and brightness / contrast jitter. Never a horizontal flip: laterality matters on a chest X-ray (the heart is on the
left; "left pleural effusion" must stay left). It runs on `PlanImageProcessor`'s output, so it is one batched
`grid_sample` after the resize, and it keeps `content_boxes` (where the real image lies inside the padded square)
true: they are recomputed from the warp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """The ranges each image's transform is drawn from (uniformly).

    Args:
        crop_scale: the crop's area as a fraction of the real image's.
        crop_ratio: the crop's aspect ratio relative to the real image's (its width / height over the image's);
            the crop is stretched back onto the image's box, so this is a slight anisotropic zoom.
        max_rotation_degrees: rotation about the image's centre, in [-max, max].
        max_translation: shift along each axis, as a fraction of the image's side, in [-max, max].
        max_brightness: added to [0, 1] intensities, in [-max, max].
        contrast_range: factor on the deviation from the image's mean intensity.
    """

    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    max_rotation_degrees: float = 7.0
    max_translation: float = 0.05
    max_brightness: float = 0.1
    contrast_range: tuple[float, float] = (0.8, 1.2)

    def __post_init__(self) -> None:
        checks = {
            "crop_scale": 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "crop_ratio": 0 < self.crop_ratio[0] <= self.crop_ratio[1],
            "max_rotation_degrees": 0 <= self.max_rotation_degrees <= 45,
            "max_translation": 0 <= self.max_translation <= 0.25,
            "max_brightness": 0 <= self.max_brightness < 1,
            "contrast_range": 0 < self.contrast_range[0] <= self.contrast_range[1],
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"Augmentation.{field}: out of range, got {getattr(self, field)!r}")

    def __call__(self, pixel_values: torch.Tensor, content_boxes: torch.Tensor | None, generator: torch.Generator,
                 image_mean: float | Sequence[float] = 0.0, image_std: float | Sequence[float] = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (B, C, H, W), normalised with image_mean / image_std, black (0) padding; content_boxes
        (B, 4) as (top, left, height, width), None for images without padding -> the augmented pixel_values and
        the boxes of the real image in them (int64), where the padding and every pixel the warp leaves empty are
        black again."""
        batch, channels, height, width = pixel_values.shape
        device = pixel_values.device
        mean = torch.as_tensor(image_mean, dtype=torch.float32, device=device).reshape(-1, 1, 1)  # (C or 1, 1, 1)
        std = torch.as_tensor(image_std, dtype=torch.float32, device=device).reshape(-1, 1, 1)
        raw = pixel_values.float() * std + mean  # [0, 1] intensities, (B, C, H, W)
        if content_boxes is None:
            content_boxes = torch.tensor([[0, 0, height, width]]).expand(batch, 4)
        top, left, box_height, box_width = content_boxes.to(device, torch.float32).unbind(-1)  # (B,) each

        draws = torch.rand(batch, 9, generator=generator).to(device)  # on the CPU: the same draws on any device
        scale = _between(draws[:, 0], self.crop_scale)
        ratio = torch.exp(_between(draws[:, 1], tuple(math.log(r) for r in self.crop_ratio)))
        crop_height = box_height * (scale / ratio).sqrt().clamp(max=1)  # (B,)
        crop_width = box_width * (scale * ratio).sqrt().clamp(max=1)
        crop_top = top + (box_height - crop_height) * draws[:, 2]
        crop_left = left + (box_width - crop_width) * draws[:, 3]
        angle = torch.deg2rad(_between(draws[:, 4], (-self.max_rotation_degrees, self.max_rotation_degrees)))
        shift_y = _between(draws[:, 5], (-self.max_translation, self.max_translation)) * box_height
        shift_x = _between(draws[:, 6], (-self.max_translation, self.max_translation)) * box_width

        # Each output pixel centre o goes back to the crop: q = c + R(-angle) (o - c - shift) undoes the rotation and
        # shift about the box centre c; q in the box stretches linearly onto the crop. No flip: x keeps its sign.
        rows = torch.arange(height, device=device, dtype=torch.float32) + 0.5  # (H,)
        cols = torch.arange(width, device=device, dtype=torch.float32) + 0.5  # (W,)
        centre_y, centre_x = top + box_height / 2, left + box_width / 2  # (B,)
        dy = rows[None, :, None] - (centre_y + shift_y)[:, None, None]  # (B, H, 1)
        dx = cols[None, None, :] - (centre_x + shift_x)[:, None, None]  # (B, 1, W)
        cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
        q_y = centre_y[:, None, None] + cos * dy - sin * dx  # (B, H, W)
        q_x = centre_x[:, None, None] + sin * dy + cos * dx
        valid = ((q_y >= top[:, None, None]) & (q_y < (top + box_height)[:, None, None])
                 & (q_x >= left[:, None, None]) & (q_x < (left + box_width)[:, None, None]))  # (B, H, W)
        source_y = crop_top[:, None, None] + (q_y - top[:, None, None]) * (crop_height / box_height)[:, None, None]
        source_x = crop_left[:, None, None] + (q_x - left[:, None, None]) * (crop_width / box_width)[:, None, None]
        grid = torch.stack([2 * source_x / width - 1, 2 * source_y / height - 1], dim=-1)  # (B, H, W, 2), x first
        warped = F.grid_sample(raw, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        inside = valid[:, None].to(warped.dtype)  # (B, 1, H, W)

        # Brightness / contrast on the real image only: the padding stays black.
        contrast = _between(draws[:, 7], self.contrast_range)[:, None, None, None]  # (B, 1, 1, 1)
        brightness = _between(draws[:, 8], (-self.max_brightness, self.max_brightness))[:, None, None, None]
        image_mean_intensity = (warped * inside).sum(dim=(1, 2, 3), keepdim=True) / (
            inside.sum(dim=(1, 2, 3), keepdim=True) * channels).clamp(min=1)
        jittered = ((warped - image_mean_intensity) * contrast + image_mean_intensity + brightness).clamp(0, 1)
        augmented = (jittered * inside - mean) / std
        return augmented.to(pixel_values.dtype), _bounding_boxes(valid)

    def augment_batch(self, batch: Mapping[str, torch.Tensor], image_processor, generator: torch.Generator
                      ) -> dict[str, torch.Tensor]:
        """The `pixel_values` (and `content_boxes`, when the batch has them) of a processor batch, augmented."""
        normalised = getattr(image_processor, "do_normalize", True)
        pixel_values, boxes = self(batch["pixel_values"], batch.get("content_boxes"), generator,
                                   image_processor.image_mean if normalised else 0.0,
                                   image_processor.image_std if normalised else 1.0)
        return {"pixel_values": pixel_values, **({"content_boxes": boxes} if "content_boxes" in batch else {})}


def _between(unit: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """Uniform draws in [0, 1) -> uniform in [low, high)."""
    low, high = bounds
    return low + (high - low) * unit


def _bounding_boxes(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool -> (B, 4) int64 (top, left, height, width) of each mask's True pixels (the whole image when
    none: with no real image, no cell is better than another)."""
    batch, height, width = mask.shape
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # (B, H), (B, W)
    top = rows.int().argmax(dim=1)  # the first True
    bottom = height - rows.flip(1).int().argmax(dim=1)  # one past the last True
    left = cols.int().argmax(dim=1)
    right = width - cols.flip(1).int().argmax(dim=1)
    return torch.stack([top, left, bottom - top, right - left], dim=1).long()


__all__ = ["Augmentation"]
