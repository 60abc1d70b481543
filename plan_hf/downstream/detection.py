"""Anchor-free box detection on the pre-trained vision tower: a CenterNet-style head ("Objects as Points", Zhou et
al., 2019) on the fused finest pyramid map, with box decoding and NMS written in torch (no torchvision).

Each class has a heat map whose peaks are box centres; two more maps give each centre's box size (log, in map cells)
and its sub-cell offset. Training targets are Gaussians around the centres (elliptical, sized by the box as in
TTFNet), a penalty-reduced focal loss on the heat maps and L1 on size and offset at the centres only. Decoding keeps
3x3 local maxima (CenterNet's NMS-free decoding) and then runs a class-wise Fast NMS (YOLACT), vectorised over the
batch, to drop overlapping peaks of large boxes.

Boxes inside the model are `[x0, y0, x1, y1]` in the processed (square, padded) input's pixels; the recipes convert
from and to the original image with `PlanImageProcessor.boxes_to_processed` / `boxes_to_original`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..configuration_plan import PlanConfig
from .backbone import PlanPyramidModel

# Gaussian radius as a fraction of the box (TTFNet's alpha): sigma = alpha * size / 6.
GAUSSIAN_ALPHA = 0.54
# The heat-map bias starts at logit(0.1): a zero bias predicts p=0.5 everywhere and the focal loss explodes at step 1.
HEATMAP_PRIOR = 0.1


@dataclass
class PlanDetectionOutput(ModelOutput):
    """
    Args:
        loss: heat-map focal loss + size L1 + offset L1 (with `boxes`).
        loss_heatmap, loss_size, loss_offset: the terms.
        heatmap_logits: (B, K, h, w) per-class centre logits.
        sizes: (B, 2, h, w) log(width / stride), log(height / stride) of the box centred at each cell.
        offsets: (B, 2, h, w) sub-cell (x, y) offset of the centre, in cells.
    """

    loss: torch.FloatTensor | None = None
    loss_heatmap: torch.FloatTensor | None = None
    loss_size: torch.FloatTensor | None = None
    loss_offset: torch.FloatTensor | None = None
    heatmap_logits: torch.FloatTensor | None = None
    sizes: torch.FloatTensor | None = None
    offsets: torch.FloatTensor | None = None


@dataclass
class Detections:
    """Decoded detections, a fixed `top_k` per image; `keep` marks those above the score threshold that survive NMS."""

    boxes: torch.Tensor  # (B, k, 4) x0, y0, x1, y1 in input pixels
    scores: torch.Tensor  # (B, k)
    labels: torch.Tensor  # (B, k) class index
    keep: torch.Tensor  # (B, k) bool


@dataclass
class CenterNetTargets:
    heatmap: torch.Tensor  # (B, K, h, w) in [0, 1], exactly 1 at each centre cell
    centers: torch.Tensor  # (B, N) flat index y * w + x of each box's centre cell
    sizes: torch.Tensor  # (B, N, 2) log(w / stride), log(h / stride)
    offsets: torch.Tensor  # (B, N, 2) centre / stride - centre cell, in [0, 1)
    valid: torch.Tensor  # (B, N) bool: a real, non-degenerate box


# --------------------------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------------------------
def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (..., N, 4) and (..., M, 4) xyxy boxes -> (..., N, M); 0 where both are empty."""
    area_a = (boxes_a[..., 2] - boxes_a[..., 0]).clamp(min=0) * (boxes_a[..., 3] - boxes_a[..., 1]).clamp(min=0)
    area_b = (boxes_b[..., 2] - boxes_b[..., 0]).clamp(min=0) * (boxes_b[..., 3] - boxes_b[..., 1]).clamp(min=0)
    top_left = torch.maximum(boxes_a[..., :, None, :2], boxes_b[..., None, :, :2])  # (..., N, M, 2)
    bottom_right = torch.minimum(boxes_a[..., :, None, 2:], boxes_b[..., None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)  # (..., N, M)
    union = area_a[..., :, None] + area_b[..., None, :] - intersection
    return intersection / union.clamp(min=1e-12)


def fast_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-wise Fast NMS over (B, k) candidates -> (B, k) keep mask.

    A box is dropped when a higher-scoring box of its class overlaps it by more than `iou_threshold`. Unlike greedy
    NMS, a box that was itself dropped still suppresses others (YOLACT's approximation): one matrix operation instead
    of a sequential loop, and at most a little more suppression among chains of overlapping boxes.
    """
    order = scores.argsort(dim=1, descending=True)  # (B, k)
    boxes_sorted = boxes.gather(1, order[..., None].expand_as(boxes))
    labels_sorted = labels.gather(1, order)
    iou = box_iou(boxes_sorted, boxes_sorted)  # (B, k, k)
    same_class = labels_sorted[:, :, None] == labels_sorted[:, None, :]
    higher = torch.ones_like(iou, dtype=torch.bool).triu(diagonal=1)  # [i, j]: i ranks above j
    overlap_with_better = (iou * (same_class & higher)).amax(dim=1)  # (B, k): max IoU with any better box
    keep_sorted = overlap_with_better <= iou_threshold
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


# --------------------------------------------------------------------------------------------------------------------
# Targets, loss, decoding
# --------------------------------------------------------------------------------------------------------------------
def centernet_targets(
    boxes: torch.Tensor, labels: torch.Tensor, num_classes: int, map_size: tuple[int, int], stride: float
) -> CenterNetTargets:
    """Heat-map, size and offset targets of (B, N, 4) xyxy input-pixel boxes with (B, N) labels (-1 = padding)."""
    height, width = map_size
    cells = boxes / stride  # (B, N, 4) in map cells
    box_size = (cells[..., 2:] - cells[..., :2]).clamp(min=0)  # (B, N, 2) w, h
    valid = (labels >= 0) & (box_size > 0).all(dim=-1)
    center = (cells[..., :2] + cells[..., 2:]) / 2  # (B, N, 2) x, y
    limits = center.new_tensor([width - 1, height - 1])
    center_cell = center.floor().clamp(min=0).minimum(limits)  # (B, N, 2)

    sigma = (GAUSSIAN_ALPHA * box_size / 6).clamp(min=0.5)  # (B, N, 2); >= half a cell so tiny boxes still spread
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype)
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype)
    # Peak exactly at the integer centre cell (value 1 there): the focal loss counts positives as `target == 1`.
    gx = ((xs - center_cell[..., :1]) / sigma[..., :1]) ** 2  # (B, N, w)
    gy = ((ys - center_cell[..., 1:]) / sigma[..., 1:]) ** 2  # (B, N, h)
    gaussian = torch.exp(-(gy[..., :, None] + gx[..., None, :]) / 2)  # (B, N, h, w)
    one_hot = F.one_hot(labels.clamp(min=0), num_classes).to(boxes.dtype) * valid[..., None]  # (B, N, K)
    heatmap = (gaussian[:, :, None] * one_hot[..., None, None]).amax(dim=1)  # (B, K, h, w): overlapping boxes: max
    return CenterNetTargets(
        heatmap=heatmap,
        centers=(center_cell[..., 1] * width + center_cell[..., 0]).long(),
        sizes=box_size.clamp(min=1e-3).log(),
        offsets=center - center_cell,
        valid=valid,
    )


def centernet_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0
) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of centres (at least one)."""
    positive = target == 1
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)  # log p, log(1 - p) without overflow
    p = logits.sigmoid()
    positive_term = ((1 - p) ** alpha * log_p)[positive].sum()
    # Negatives near a centre are penalised less: (1 - target)^beta.
    negative_term = (p**alpha * (1 - target) ** beta * log_not_p)[~positive].sum()
    return -(positive_term + negative_term) / positive.sum().clamp(min=1)


def _gather_cells(maps: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps at (B, N) flat cell indices -> (B, N, C)."""
    flat = maps.flatten(2)  # (B, C, h*w)
    return flat.gather(2, indices[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)


def decode_centernet(
    heatmap_logits: torch.Tensor,
    sizes: torch.Tensor,
    offsets: torch.Tensor,
    stride: float,
    image_size: tuple[int, int],
    top_k: int = 100,
    score_threshold: float = 0.05,
    nms_iou: float | None = 0.5,
) -> Detections:
    """The `top_k` heat-map peaks of each image as boxes in input pixels, with the keep mask (threshold + NMS)."""
    batch, num_classes, height, width = heatmap_logits.shape
    heat = heatmap_logits.sigmoid()
    peaks = heat == F.max_pool2d(heat, 3, stride=1, padding=1)  # local maxima replace anchor NMS
    scores, flat = (heat * peaks).flatten(1).topk(min(top_k, num_classes * height * width), dim=1)  # (B, k)
    labels, cells = flat // (height * width), flat % (height * width)
    offset = _gather_cells(offsets, cells)  # (B, k, 2)
    size = _gather_cells(sizes, cells).clamp(max=math.log(max(height, width) * 2)).exp()  # (B, k, 2) in cells
    center = torch.stack([cells % width, cells // width], dim=-1).to(offset.dtype) + offset  # (B, k, 2)
    boxes = torch.cat([center - size / 2, center + size / 2], dim=-1) * stride  # (B, k, 4)
    image_height, image_width = image_size
    boxes = boxes.clamp(min=0).minimum(boxes.new_tensor([image_width, image_height, image_width, image_height]))
    keep = scores >= score_threshold
    if nms_iou is not None:
        keep &= fast_nms(boxes, scores, labels, nms_iou)
    return Detections(boxes=boxes, scores=scores, labels=labels, keep=keep)


# --------------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------------
def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_dim, in_dim, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(in_dim, out_dim, 1))


class PlanForObjectDetection(PlanPyramidModel):
    """The pre-trained vision tower + a feature pyramid + a CenterNet head with `config.num_labels` classes.

    `from_pretrained(plan_export, num_labels=K)` keeps the PlanModel's vision tower (same `vision_model.` keys) and
    initialises the rest; `config.downstream_head_dim` (default 64) sets the neck/head width. `freeze_vision_tower()`
    trains the head alone, the tower held in eval mode.
    """

    def __init__(self, config: PlanConfig):
        super().__init__(config)
        self.heatmap_head = _head(self.head_dim, config.num_labels)
        self.size_head = _head(self.head_dim, 2)
        self.offset_head = _head(self.head_dim, 2)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self.heatmap_head[-1]:
            nn.init.constant_(module.bias, -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> PlanDetectionOutput:
        """pixel_values (B, 3, H, W); boxes (B, N, 4) xyxy in input pixels with box_labels (B, N), -1 for padding.

        Other inputs of the image processor (original_sizes, content_boxes) are accepted and ignored.
        """
        features = self.pyramid(self.vision_model, pixel_values)  # (B, D, h, w)
        out = PlanDetectionOutput(
            heatmap_logits=self.heatmap_head(features),
            sizes=self.size_head(features),
            offsets=self.offset_head(features),
        )
        if boxes is not None:
            if box_labels is None:
                box_labels = torch.zeros(boxes.shape[:2], dtype=torch.long, device=boxes.device)
            stride = pixel_values.shape[-1] / features.shape[-1]
            targets = centernet_targets(boxes.float(), box_labels, self.config.num_labels, features.shape[-2:], stride)
            valid = targets.valid.float()[..., None]  # (B, N, 1)
            count = valid.sum().clamp(min=1)
            out.loss_heatmap = centernet_focal_loss(out.heatmap_logits.float(), targets.heatmap)
            out.loss_size = (
                (_gather_cells(out.sizes.float(), targets.centers) - targets.sizes).abs() * valid
            ).sum() / (2 * count)
            out.loss_offset = (
                (_gather_cells(out.offsets.float(), targets.centers) - targets.offsets).abs() * valid
            ).sum() / (2 * count)
            out.loss = out.loss_heatmap + out.loss_size + out.loss_offset
        return out

    @torch.no_grad()
    def detect(
        self, pixel_values: torch.FloatTensor, top_k: int = 100, score_threshold: float = 0.05,
        nms_iou: float | None = 0.5,
    ) -> Detections:
        """Boxes in input pixels for a batch of processed images (eval mode expected)."""
        out = self.forward(pixel_values)
        stride = pixel_values.shape[-1] / out.heatmap_logits.shape[-1]
        return decode_centernet(
            out.heatmap_logits.float(), out.sizes.float(), out.offsets.float(), stride, tuple(pixel_values.shape[-2:]),
            top_k, score_threshold, nms_iou,
        )


__all__ = [
    "Detections",
    "PlanDetectionOutput",
    "PlanForObjectDetection",
    "box_iou",
    "centernet_focal_loss",
    "centernet_targets",
    "decode_centernet",
    "fast_nms",
]
