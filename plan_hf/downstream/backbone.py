"""Multi-scale feature maps from a pre-trained vision tower, fused top-down into one fine map for dense heads.

A CNN tower (ResNet, ConvNeXt, MobileNetV2, ...) gives maps at strides 4, 8, 16 and 32 through
`output_hidden_states`; the pyramid takes the deepest map at each stride (a ResNet's four stage outputs, MobileNetV2's
last block of each resolution and its 1x1 head), found by a shape probe of the tower (`vision_tower_grids`). A ViT has one map at its patch stride; ViTDet's *simple feature pyramid* (Li et al., 2022)
makes the four scales from it (x4 and x2 by transposed convolutions, x1, x1/2 by max-pooling), because a plain ViT has
no earlier stages to take fine maps from. Both are then fused FPN-style (lateral 1x1, top-down upsample + add) into
the finest level, which the detection and segmentation heads read: one small neck for both tasks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_plan import (
    PlanForImageClassification,
    PlanPreTrainedModel,
    VisionGrid,
    _build_tower,
    _grid_source,
    _make_stages_checkpointable,
    _tokens_to_grid,
    vision_tower_grids,
)

PYRAMID_STRIDES = (4, 8, 16, 32)


def cnn_pyramid_grids(vision_config) -> list[VisionGrid] | None:
    """The deepest feature map of a CNN tower at each of `PYRAMID_STRIDES`, finest first; None for a tower without
    maps at all four strides (a ViT: one map at its patch stride)."""
    deepest = {grid.stride: grid for grid in vision_tower_grids(vision_config)}  # later (deeper) maps overwrite
    if not all(stride in deepest for stride in PYRAMID_STRIDES):
        return None
    return [deepest[stride] for stride in PYRAMID_STRIDES]


def pyramid_channels(vision_config) -> list[int]:
    """Channels of the four maps `FeaturePyramid.tower_maps` gives, finest first."""
    grids = cnn_pyramid_grids(vision_config)
    if grids is not None:
        return [grid.channels for grid in grids]
    if hasattr(vision_config, "hidden_size"):
        width = vision_config.hidden_size
        return [max(width // 4, 1), max(width // 2, 1), width, width]
    strides = sorted({grid.stride for grid in vision_tower_grids(vision_config)})
    raise ValueError(f"vision_config of model_type={vision_config.model_type!r}: need a CNN with feature maps at "
                     f"strides {list(PYRAMID_STRIDES)} or a ViT; its maps have strides {strides}")


def _group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: fine-tuning batches are small (and a 1% subset may hold a handful of images).
    return nn.GroupNorm(num_groups=next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0), num_channels=channels)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one (B, C, h, w) map at the patch stride p: maps at strides p/4, p/2, p, 2p."""

    def __init__(self, width: int):
        super().__init__()
        half, quarter = max(width // 2, 1), max(width // 4, 1)
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(width, half, 2, stride=2), _group_norm(half), nn.GELU(),
            nn.ConvTranspose2d(half, quarter, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(width, half, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, grid: torch.Tensor) -> list[torch.Tensor]:
        return [self.up4(grid), self.up2(grid), grid, self.down2(grid)]


class FeaturePyramid(nn.Module):
    """Tower output -> one fused (B, dim, H/s, W/s) map at the finest pyramid stride s (4 for CNNs and ViT/16)."""

    def __init__(self, vision_config, dim: int = 128):
        super().__init__()
        grids = cnn_pyramid_grids(vision_config)
        self.layers = None if grids is None else [grid.layer for grid in grids]  # hidden-state indices, finest first
        channels = pyramid_channels(vision_config)
        self.simple_pyramid = None if grids is not None else SimpleFeaturePyramid(vision_config.hidden_size)
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)
        self.output = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), _group_norm(dim), nn.ReLU(inplace=True))

    def tower_maps(self, vision_model: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The tower's four maps, finest first, each (B, C_i, H_i, W_i)."""
        if self.layers is not None:
            output = vision_model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
            return [_grid_source(output, layer) for layer in self.layers]
        output = vision_model(pixel_values=pixel_values, return_dict=True)
        tokens, (height, width) = _tokens_to_grid(output.last_hidden_state)  # (B, N, C), class token dropped
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)  # (B, C, h, w)
        return self.simple_pyramid(grid)

    def forward(self, vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        maps = self.tower_maps(vision_model, pixel_values)
        fused = self.lateral[-1](maps[-1])
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(maps[:-1])):
            # Sizes can differ by one from an exact 2x (odd inputs); interpolate to the finer map's own size.
            fused = lateral(feature) + F.interpolate(fused, size=feature.shape[-2:], mode="nearest")
        return self.output(fused)  # (B, dim, H/s, W/s)


class PlanPyramidModel(PlanPreTrainedModel):
    """What the dense downstream models share: the pre-trained vision tower (same `vision_model.` keys as a PlanModel,
    so `from_pretrained(plan_export)` keeps it) and a `FeaturePyramid` of width `config.downstream_head_dim` (default
    64). Subclasses add their heads after `super().__init__(config)`, then call `post_init()`.
    `freeze_vision_tower()` trains the heads alone, the tower held in eval mode.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    accepts_loss_kwargs = False  # a per-batch mean loss: Trainer divides it for gradient accumulation

    def __init__(self, config):
        super().__init__(config)
        self.vision_model = _build_tower(config.vision_config)
        _make_stages_checkpointable(self.vision_model)
        self.pyramid = FeaturePyramid(config.vision_config, self.head_dim)

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "downstream_head_dim", 64)

    freeze_vision_tower = PlanForImageClassification.freeze_vision_tower
    train = PlanForImageClassification.train


__all__ = ["PYRAMID_STRIDES", "FeaturePyramid", "PlanPyramidModel", "SimpleFeaturePyramid", "cnn_pyramid_grids",
           "pyramid_channels"]
