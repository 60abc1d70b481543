"""PlanModel (a dual encoder trained with the global, local and PLACE objectives of docs/method.md) and
PlanForImageClassification, as transformers `PreTrainedModel`s wrapping any text and vision towers."""

from __future__ import annotations

import functools
import inspect
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.mobilenet_v2.modeling_mobilenet_v2 import MobileNetV2InvertedResidual
from transformers.models.resnet.modeling_resnet import ResNetStage
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import ModelOutput, can_return_tuple

from .alignment_plan import (
    PathologyObservationExtractor,
    PatchCorrelationPredictor,
    PixelUpdate,
    PlanLocalAlignment,
    build_local_alignment,
)
from .configuration_plan import PlanConfig
from .losses_plan import global_contrastive_loss, mgca_word_weights, pool_by_ids

# Weight names of the 0.1 format (PLAN's parameters sat on the model itself) -> where they live now.
LEGACY_WEIGHT_NAMES = {
    r"^similarity_log_scale$": "local_alignment.similarity_log_scale",
    r"^word_gate\.": "local_alignment.word_gate.",
    r"^pixel_update\.": "local_alignment.pixel_update.",
}


@dataclass
class PlanOutput(ModelOutput):
    """
    Args:
        loss: total loss L = lambda_g L_global + lambda_l(step) sum_t alpha_t L_local^t + lambda_pcma L_pcma
            + lambda_corr L_corr (docs/method.md §7).
        logits_per_image: (num_images, num_texts) scaled cosine similarities of the global embeddings.
        logits_per_text: (num_texts, num_images), the transpose.
        image_embeds: (num_images, projection_dim) L2-normalised global image embeddings v.
        text_embeds: (num_texts, projection_dim) L2-normalised global report embeddings t.
        loss_global, loss_local, loss_pcma, loss_corr: each term before its weight (None when off).
        loss_local_stages: PLAN's local loss of each refinement stage, a tuple of T scalars.
        word_weights: (B, M) omega, the local objective's word weights.
        regions_attention: (B, M, N) the local objective's last word regions A' of each word on its own image.
        pathology_observations: (B, K, d_local) the V-PORs of each image (PCMA on).
        text_model_output, vision_model_output: the towers' outputs (their hidden states and attentions when asked).
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    loss_global: torch.FloatTensor | None = None
    loss_local: torch.FloatTensor | None = None
    loss_pcma: torch.FloatTensor | None = None
    loss_corr: torch.FloatTensor | None = None
    loss_local_stages: tuple[torch.FloatTensor, ...] | None = None
    word_weights: torch.FloatTensor | None = None
    regions_attention: torch.FloatTensor | None = None
    pathology_observations: torch.FloatTensor | None = None
    text_model_output: Any = None
    vision_model_output: Any = None

    def to_tuple(self) -> tuple[Any]:
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


@dataclass
class PlanGroundingOutput(ModelOutput):
    """
    Args:
        heatmaps: (B, h, w) each phrase's last-stage soft region on its image, sum_m omega_m A'_m (sums to 1).
        word_heatmaps: (B, M, h, w) each word's last-stage soft region A'_m.
        word_mask: (B, M) which words exist.
        word_weights: (B, M) omega.
    """

    heatmaps: torch.FloatTensor | None = None
    word_heatmaps: torch.FloatTensor | None = None
    word_mask: torch.BoolTensor | None = None
    word_weights: torch.FloatTensor | None = None


@dataclass
class PlanFeatures:
    """What the towers and projections give for a batch; the losses are computed from these alone."""

    text_embeds: torch.Tensor  # t, (B, d), L2-normalised
    image_embeds: torch.Tensor  # v, (B, d), L2-normalised
    grid_size: tuple[int, int]
    words: torch.Tensor | None = None  # w, (B, M, d_local), L2-normalised
    word_mask: torch.Tensor | None = None  # (B, M)
    word_sentences: torch.Tensor | None = None  # (B, M) long, the sentence of each word (when sentence_ids are given)
    word_weights: torch.Tensor | None = None  # (B, M) the text tower's [CLS] attention per word (MGCA)
    pixels: torch.Tensor | None = None  # p, (B, N, d_local), L2-normalised
    pixel_mask: torch.Tensor | None = None  # (B, N) bool, False on grid cells over the padding (config.mask_padding)
    sentences: torch.Tensor | None = None  # T-PORs, (B, S, d_local), L2-normalised (PCMA)
    sentence_mask: torch.Tensor | None = None  # (B, S)
    text_model_output: Any = None
    vision_model_output: Any = None

    TENSOR_FIELDS = ("text_embeds", "image_embeds", "words", "word_mask", "word_sentences", "word_weights", "pixels",
                     "pixel_mask", "sentences", "sentence_mask")
    PADDED_FIELDS = ("words", "word_mask", "word_sentences", "word_weights", "sentences", "sentence_mask")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.TENSOR_FIELDS if getattr(self, k) is not None}

    @classmethod
    def concatenate(cls, parts: list["PlanFeatures"]) -> "PlanFeatures":
        """Join micro-batches' features; word and sentence axes are padded to the longest (padding is masked)."""
        merged = {}
        for key in parts[0].tensors():
            values = [getattr(p, key) for p in parts]
            if key in cls.PADDED_FIELDS:
                width = max(v.shape[1] for v in values)
                values = [F.pad(v, (0, 0, 0, width - v.shape[1]) if v.dim() == 3 else (0, width - v.shape[1]))
                          for v in values]
            merged[key] = torch.cat(values)
        return cls(grid_size=parts[0].grid_size, **merged)


@dataclass
class ImageFeatures:
    pooled: torch.Tensor  # (B, C_global)
    grid: torch.Tensor  # (B, N, C_local)
    grid_size: tuple[int, int]
    tower_output: Any


# --------------------------------------------------------------------------------------------------------------------
# Tower plumbing: any AutoModel vision tower (CNN or ViT) gives a pooled vector and a pixel grid
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionGrid:
    """One feature map of a vision tower that can serve as PLAN's pixel grid."""

    layer: int  # the `local_vision_feature_layer` that selects it (negative: counted from the last)
    channels: int
    stride: int  # input pixels per grid cell


def _tokens_to_grid(hidden: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, C, h, w) feature maps or (B, [prefix +] h*w, C) tokens -> (B, N, C), (h, w)."""
    if hidden.dim() == 4:
        batch, channels, height, width = hidden.shape
        return hidden.flatten(2).transpose(1, 2), (height, width)  # (B, N, C)
    side = math.isqrt(hidden.shape[1])
    prefix = hidden.shape[1] - side * side  # class / register tokens come first (ViT)
    return hidden[:, prefix:], (side, side)


def _grid_source(tower_output, local_layer: int) -> torch.Tensor:
    """The feature map `local_layer` names: -1 is the tower's last_hidden_state (after a ViT's final norm, after a
    MobileNetV2's 1x1 head), any other index an entry of hidden_states."""
    if local_layer == -1:
        return tower_output.last_hidden_state
    hidden_states = tower_output.hidden_states or ()
    if not -len(hidden_states) <= local_layer < len(hidden_states):
        raise ValueError(f"local_vision_feature_layer={local_layer}: the vision tower has {len(hidden_states)} "
                         f"hidden_states (valid: -1 for last_hidden_state, or -{len(hidden_states)} .. "
                         f"{len(hidden_states) - 1})")
    return hidden_states[local_layer]


def _pooled(tower_output) -> torch.Tensor:
    """The tower's global vector (B, C): its pooler output, else the mean of its last feature map."""
    pooled = getattr(tower_output, "pooler_output", None)
    if pooled is None:
        last = tower_output.last_hidden_state
        pooled = last.mean(dim=(2, 3)) if last.dim() == 4 else last.mean(dim=1)
    return pooled.flatten(1)  # ResNet pools to (B, C, 1, 1)


def _probe_image_size(vision_config) -> tuple[int, int]:
    # A ViT's position embeddings fix its input size; a CNN takes any, and 224 px gives every stage an exact stride.
    size = getattr(vision_config, "image_size", None) or 224
    return (size, size) if isinstance(size, int) else tuple(size)


@functools.lru_cache(maxsize=64)
def _probe_tower(config_class: type, config_json: str) -> tuple[tuple[int, int], Any]:
    """((H, W), output) of one forward of the tower built on the meta device: every shape, no weights, no compute."""
    config = config_class.from_dict(json.loads(config_json))
    height, width = _probe_image_size(config)
    with torch.device("meta"), torch.no_grad():
        tower = _build_tower(config).eval()
        dtype = next(tower.parameters()).dtype
        pixel_values = torch.empty(1, getattr(config, "num_channels", 3), height, width, dtype=dtype)
        output = tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
    return (height, width), output


def _probe(vision_config) -> tuple[tuple[int, int], Any]:
    return _probe_tower(type(vision_config), vision_config.to_json_string())


def vision_feature_dims(vision_config, local_layer: int) -> tuple[int, int]:
    """(global dim, local dim) of a vision tower's pooled output and of the grid `local_layer` selects."""
    _, output = _probe(vision_config)
    return _pooled(output).shape[-1], _tokens_to_grid(_grid_source(output, local_layer))[0].shape[-1]


def vision_tower_grids(vision_config) -> list[VisionGrid]:
    """Every feature map the tower offers as a pixel grid, shallowest first; the last is last_hidden_state (-1)."""
    (height, _), output = _probe(vision_config)
    grids = []
    for layer in range(-max(len(output.hidden_states or ()), 1), 0):
        grid, (grid_height, _) = _tokens_to_grid(_grid_source(output, layer))  # (1, N, C)
        grids.append(VisionGrid(layer=layer, channels=grid.shape[-1], stride=round(height / grid_height)))
    return grids


def vision_feature_layer_for_stride(vision_config, stride: int = 16) -> int:
    """The `local_vision_feature_layer` of the deepest feature map at `stride` input pixels per cell: stride 16
    gives a 14 x 14 grid at 224 px (ResNet / ConvNeXt: -2, MobileNetV2: its last 96-channel block, -5; ViT-B/16: -1)."""
    grids = vision_tower_grids(vision_config)
    matching = [grid.layer for grid in grids if grid.stride == stride]
    if not matching:
        raise ValueError(f"the {vision_config.model_type} vision tower has no feature map at stride {stride}; "
                         f"its strides are {sorted({grid.stride for grid in grids})}")
    return matching[-1]


def content_grid_mask(content_boxes: torch.Tensor, input_size: tuple[int, int], grid_size: tuple[int, int]
                      ) -> torch.Tensor:
    """Which cells of an (h, w) feature grid lie on the image rather than on the padding around it.

    content_boxes (B, 4) as (top, left, height, width) in input pixels (the image processor's output); input_size
    (H, W) of pixel_values. A cell counts as image when its centre falls inside the content box. Returns (B, h * w)
    bool; an image whose content covers no cell centre keeps every cell (nothing is better than something).
    """
    (input_height, input_width), (height, width) = input_size, grid_size
    boxes = content_boxes.to(torch.float32)
    top, left, box_height, box_width = boxes.unbind(-1)  # (B,) each
    rows = (torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5) * (input_height / height)  # (h,)
    cols = (torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5) * (input_width / width)  # (w,)
    inside_rows = (rows >= top[:, None]) & (rows < (top + box_height)[:, None])  # (B, h)
    inside_cols = (cols >= left[:, None]) & (cols < (left + box_width)[:, None])  # (B, w)
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :]).flatten(1)  # (B, h * w)
    return mask | ~mask.any(dim=1, keepdim=True)


def encode_image_tower(vision_model: nn.Module, pixel_values: torch.Tensor, local_layer: int = -1,
                       output_hidden_states: bool | None = None, output_attentions: bool | None = None) -> ImageFeatures:
    # flags left unset are left out: the tower then reads its own config (5.x ViT takes an explicit None as "off")
    flags = _output_flags(True if local_layer != -1 else output_hidden_states, output_attentions)
    output = vision_model(pixel_values=pixel_values, return_dict=True, **flags)
    grid, grid_size = _tokens_to_grid(_grid_source(output, local_layer))
    return ImageFeatures(pooled=_pooled(output), grid=grid, grid_size=grid_size, tower_output=output)


def _build_tower(config, **preferred_kwargs) -> PreTrainedModel:
    model_class = AutoModel._model_mapping[type(config)]
    accepted = inspect.signature(model_class.__init__).parameters
    kwargs = {k: v for k, v in preferred_kwargs.items() if k in accepted}
    return AutoModel.from_config(config, **kwargs)


class CheckpointedResNetStage(GradientCheckpointingLayer, ResNetStage):
    """A transformers ResNet stage as a gradient-checkpointing layer (ResNet has no support of its own): its
    `forward` is recomputed in the backward once `gradient_checkpointing_enable()` is on. Stages become one by
    re-classing (`_make_stages_checkpointable`), so their weights and weight names stay as they are."""


class CheckpointedMobileNetV2Block(GradientCheckpointingLayer, MobileNetV2InvertedResidual):
    """A MobileNetV2 inverted-residual block as a gradient-checkpointing layer, as `CheckpointedResNetStage`."""


_CHECKPOINTED = {ResNetStage: CheckpointedResNetStage, MobileNetV2InvertedResidual: CheckpointedMobileNetV2Block}


def _make_stages_checkpointable(tower: nn.Module) -> None:
    """Give CNN towers without transformers' checkpointing support (ResNet's stages, MobileNetV2's blocks)
    per-stage activation checkpointing; towers with their own support keep theirs."""
    if getattr(tower, "supports_gradient_checkpointing", False):
        return
    for module in tower.modules():
        if type(module) in _CHECKPOINTED:
            module.__class__ = _CHECKPOINTED[type(module)]


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------
class PlanPreTrainedModel(PreTrainedModel):
    config_class = PlanConfig
    config: PlanConfig
    base_model_prefix = "plan"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PlanModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
        elif isinstance(module, PlanLocalAlignment):
            init.constant_(module.similarity_log_scale, math.log(1.0 / self.config.local_similarity_temperature))
        elif isinstance(module, PixelUpdate):
            init.zeros_(module.gate)
        elif isinstance(module, PathologyObservationExtractor):
            init.normal_(module.queries, std=self.config.initializer_range)
        elif isinstance(module, PatchCorrelationPredictor):
            init.normal_(module.mask_token, std=self.config.initializer_range)
            init.normal_(module.null_word, std=self.config.initializer_range)

    @classmethod
    def from_pretrained(cls, *args, key_mapping: dict[str, str] | None = None, **kwargs):
        """`PreTrainedModel.from_pretrained`, reading checkpoints of the 0.1 format too (`LEGACY_WEIGHT_NAMES`).

        The model saves under this version's names whatever it was loaded from."""
        loaded = super().from_pretrained(*args, key_mapping={**LEGACY_WEIGHT_NAMES, **(key_mapping or {})}, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._weight_conversions = None  # else save_pretrained would write the old names back
        return loaded


class PlanModel(PlanPreTrainedModel):
    """Dual encoder: global InfoNCE, a local word-pixel objective (PLAN's by default) and PLACE's terms when on.

    Each objective is one module with its parameters: `local_alignment` (`PlanLocalAlignment`),
    `pathology_extractor` (PCMA) and `correlation_predictor`; the towers and projections give the features they read
    (`encode`), and `loss_from_features` adds the terms up.
    """

    def __init__(self, config: PlanConfig, text_model: PreTrainedModel | None = None,
                 vision_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.text_model = text_model if text_model is not None else _build_tower(
            config.text_config, add_pooling_layer=False
        )
        self.vision_model = vision_model if vision_model is not None else _build_tower(config.vision_config)
        _make_stages_checkpointable(self.vision_model)
        text_dim = config.text_config.hidden_size
        vision_dim, local_vision_dim = vision_feature_dims(config.vision_config, config.local_vision_feature_layer)
        d_local = config.local_projection_dim

        self.text_projection = nn.Linear(text_dim, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(vision_dim, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.word_projection = nn.Linear(text_dim, d_local)
        self.pixel_projection = nn.Linear(local_vision_dim, d_local)
        # Every model can ground a phrase; the local objective's trained parts exist only when it trains them.
        self.local_alignment = build_local_alignment(config)
        if config.local_objective == "mgca":  # its word weights read the text tower's attentions: sdpa returns none
            self.text_model.set_attn_implementation("eager")
        self.pathology_extractor = PathologyObservationExtractor(config) if config.uses_pcma else None
        self.correlation_predictor = PatchCorrelationPredictor(config) if config.uses_correlation else None
        self.post_init()

    # ---------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_text_vision_pretrained(cls, text_name_or_path: str, vision_name_or_path: str, **config_kwargs) -> "PlanModel":
        """Build a PlanModel from two pretrained towers (Hub names or local folders); new layers are initialised."""
        tower_kwargs = {k: config_kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only") if k in config_kwargs}
        text_config = AutoConfig.from_pretrained(text_name_or_path, **tower_kwargs)
        vision_config = AutoConfig.from_pretrained(vision_name_or_path, **tower_kwargs)
        config = PlanConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **config_kwargs)
        text_model = AutoModel.from_pretrained(text_name_or_path, config=config.text_config, **tower_kwargs,
                                               **({"add_pooling_layer": False} if "add_pooling_layer" in
                                                  inspect.signature(AutoModel._model_mapping[type(config.text_config)].__init__).parameters else {}))
        vision_model = AutoModel.from_pretrained(vision_name_or_path, config=config.vision_config, **tower_kwargs)
        return cls(config, text_model=text_model, vision_model=vision_model)

    def save_pretrained(self, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; saved as remote code (`register_for_auto_class`), the folder also names
        PlanModel for the zero-shot image classification Auto class, so the stock pipeline loads it by repo id."""
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}),
                                    "AutoModelForZeroShotImageClassification": f"modeling_plan.{type(self).__name__}"}
        return super().save_pretrained(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    # ---------------------------------------------------------------------------------------------------------------
    def _text_outputs(self, input_ids, attention_mask, token_type_ids=None, position_ids=None, **tower_kwargs):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True, **tower_kwargs}
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(f"the text has {input_ids.shape[1]} tokens, more than the text tower's "
                             f"max_position_embeddings={limit}: tokenize with truncation=True (PlanModel.forward "
                             "truncates by itself)")
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return self.text_model(**kwargs)

    def _pool_text(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The report's global vector from the token states (B, L, D) -> (B, D): [CLS] or the masked mean."""
        if self.config.text_pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    @can_return_tuple
    def get_text_features(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                          output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                          **kwargs) -> BaseModelOutputWithPooling:
        """Text tower output whose `pooler_output` is the projected (unnormalised) report embedding, as CLIPModel's."""
        outputs = self._text_outputs(input_ids, attention_mask, token_type_ids, position_ids,
                                     **_output_flags(output_hidden_states, output_attentions))
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.text_projection(self._pool_text(outputs.last_hidden_state, attention_mask)),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    @can_return_tuple
    def get_image_features(self, pixel_values, output_hidden_states: bool | None = None,
                           output_attentions: bool | None = None, **kwargs) -> BaseModelOutputWithPooling:
        """Vision tower output whose `pooler_output` is the projected (unnormalised) global image embedding."""
        features = encode_image_tower(self.vision_model, pixel_values,
                                      **_output_flags(output_hidden_states, output_attentions))
        return BaseModelOutputWithPooling(
            last_hidden_state=features.tower_output.last_hidden_state,
            pooler_output=self.visual_projection(features.pooled),
            hidden_states=getattr(features.tower_output, "hidden_states", None),
            attentions=getattr(features.tower_output, "attentions", None),
        )

    # ---------------------------------------------------------------------------------------------------------------
    @staticmethod
    def default_word_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Without the processor's word_ids every token between [CLS] and the last [SEP] is its own word."""
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)  # (1, L)
        lengths = attention_mask.sum(dim=1, keepdim=True)  # (B, 1)
        inside = (positions >= 1) & (positions < lengths - 1)
        return torch.where(inside, positions - 1, torch.full_like(positions, -1)).expand_as(attention_mask)

    @staticmethod
    def default_sentence_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Without the processor's sentence_ids the report (from [CLS] to the last [SEP]) is one sentence."""
        return PlanModel.default_word_ids(attention_mask).clamp(max=0)

    def encode(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.FloatTensor,
        word_ids: torch.LongTensor | None = None,
        sentence_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        with_local: bool | None = None,
        with_place: bool = True,
        content_boxes: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> PlanFeatures:
        """Run both towers and the projections: everything the losses need, and nothing that depends on the batch.

        The losses are a function of these features (`loss_from_features`), which is what lets gradient accumulation
        cache features of many micro-batches and still contrast each sample against the whole batch.
        with_local: compute words and pixels for the local objective (default: when the config trains it).
        with_place: compute what the config's PLACE objectives need (pixels; T-PORs for PCMA; words for the
        correlation predictor). content_boxes: the image processor's (B, 4) boxes of the image inside the padded
        square; with `config.mask_padding` they give `features.pixel_mask`, which keeps the padding out of the local
        terms. output_hidden_states / output_attentions are passed to both towers.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        flags = _output_flags(output_hidden_states, output_attentions)
        if with_local is None:
            with_local = self.config.uses_local_alignment
        mgca_weights = with_local and self.config.local_objective == "mgca"
        text_outputs = self._text_outputs(input_ids, attention_mask, token_type_ids, position_ids,
                                          **(flags | {"output_attentions": True} if mgca_weights else flags))
        image = encode_image_tower(self.vision_model, pixel_values, self.config.local_vision_feature_layer, **flags)
        text_hidden = text_outputs.last_hidden_state  # (B_t, L, D_t)
        features = PlanFeatures(
            text_embeds=F.normalize(self.text_projection(self._pool_text(text_hidden, attention_mask)), dim=-1),  # t
            image_embeds=F.normalize(self.visual_projection(image.pooled), dim=-1),  # v, (B_i, d)
            grid_size=image.grid_size,
            text_model_output=text_outputs,
            vision_model_output=image.tower_output,
        )
        with_pcma = with_place and self.config.uses_pcma
        with_correlation = with_place and self.config.uses_correlation
        if with_local or with_correlation:
            if word_ids is None:
                word_ids = self.default_word_ids(attention_mask)
            pooled_words, features.word_mask = pool_by_ids(text_hidden, word_ids)  # (B, M, D_t), (B, M)
            features.words = F.normalize(self.word_projection(pooled_words), dim=-1)  # w_m, (B, M, d)
            if sentence_ids is not None:  # a word's tokens share its sentence: their mean id is that sentence
                sentence_of_word, _ = pool_by_ids(sentence_ids.unsqueeze(-1).float(), word_ids, features.words.shape[1])
                features.word_sentences = sentence_of_word.squeeze(-1).round().long()  # (B, M)
            if mgca_weights:
                if not text_outputs.attentions:
                    raise ValueError("local_objective='mgca' needs the text tower's attentions: load it with eager "
                                     "attention (attn_implementation={'text_config': 'eager'})")
                features.word_weights = mgca_word_weights(text_outputs.attentions[-1], word_ids,
                                                          features.word_mask)  # (B, M)
        if with_local or with_pcma or with_correlation:
            features.pixels = F.normalize(self.pixel_projection(image.grid), dim=-1)  # p_n, (B, N, d)
            if self.config.mask_padding and content_boxes is not None:
                features.pixel_mask = content_grid_mask(content_boxes, tuple(pixel_values.shape[-2:]),
                                                        image.grid_size)  # (B, N)
        if with_pcma:
            if sentence_ids is None:
                sentence_ids = self.default_sentence_ids(attention_mask)
            pooled_sentences, features.sentence_mask = pool_by_ids(text_hidden, sentence_ids)  # (B, S, D_t), (B, S)
            # T-PORs: a sentence's tokens averaged, through the word projection (affine, so this is the mean of its
            # tokens' word-space embeddings): sentences and words share the local space the pixels align to.
            features.sentences = F.normalize(self.word_projection(pooled_sentences), dim=-1)  # (B, S, d)
        return features

    def loss_from_features(self, features: PlanFeatures, local_loss_scale: float = 1.0) -> PlanOutput:
        """All loss terms (docs/method.md §7) from (possibly cached, concatenated) features of a paired batch.

        local_loss_scale: multiplies lambda_l; the training loop's warm-up ramps it from 0 to 1.
        """
        config = self.config
        out = dict(image_embeds=features.image_embeds, text_embeds=features.text_embeds)
        logit_scale = self.logit_scale.clamp(max=config.logit_scale_max).exp()
        out["loss_global"] = global_contrastive_loss(features.image_embeds, features.text_embeds, logit_scale)
        loss = config.global_loss_weight * out["loss_global"]
        if config.uses_local_alignment:
            local = self.local_alignment(features)
            out.update(loss_local=local.loss, loss_local_stages=tuple(local.stage_losses.unbind()),
                       word_weights=local.word_weights, regions_attention=local.regions_attention)
            loss = loss + local_loss_scale * config.local_loss_weight * local.loss
        if config.uses_pcma:
            if features.sentences is None or features.pixels is None:
                raise ValueError("PCMA needs features.sentences and features.pixels: encode with with_place=True")
            out["loss_pcma"], out["pathology_observations"] = self.pathology_extractor.loss(
                features.pixels, features.pixel_mask, features.sentences, features.sentence_mask)
            loss = loss + config.pcma_loss_weight * out["loss_pcma"]
        if config.uses_correlation:
            if features.words is None or features.pixels is None:
                raise ValueError("correlation exploration needs features.words and features.pixels: encode with "
                                 "with_place=True")
            out["loss_corr"] = self.correlation_predictor.loss(features.pixels, features.grid_size, features.words,
                                                               features.word_mask)
            loss = loss + config.correlation_loss_weight * out["loss_corr"]
        return PlanOutput(loss=loss, **out)  # built once: the fields keep their declared order (to_tuple)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        word_ids: torch.LongTensor | None = None,
        sentence_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        content_boxes: torch.Tensor | None = None,
        return_loss: bool | None = None,
        return_features: bool = False,
        local_loss_scale: float = 1.0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> PlanOutput | PlanFeatures:
        """Encode a batch of reports and images.

        return_loss: True computes the loss (the batch must be paired: report i with image i); None (default)
        computes it when the batch is paired, so a (1 image, K prompts) zero-shot call just scores.
        return_features: return the `PlanFeatures` (towers + projections, local features included) and compute no
        loss: the first half of a step whose loss is computed later from cached features (gradient accumulation with
        the whole batch's negatives). Going through `forward` keeps DDP's hooks working.
        local_loss_scale: multiplies lambda_l (the training loop's warm-up).
        content_boxes (the image processor's) keep the padding out of the local terms (`config.mask_padding`); the
        processor's `original_sizes` is accepted and ignored.
        """
        flags = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        if limit is not None and input_ids is not None and input_ids.shape[1] > limit:
            # Callers that tokenize without truncation (the stock zero-shot pipeline drops tokenizer_kwargs) still
            # get an embedding: the text is cut at the tower's limit, as the tokenizer's truncation would.
            input_ids, attention_mask, word_ids, sentence_ids, token_type_ids, position_ids = (
                None if t is None else t[:, :limit]
                for t in (input_ids, attention_mask, word_ids, sentence_ids, token_type_ids, position_ids))
        if return_features:
            return self.encode(input_ids, attention_mask, pixel_values, word_ids, sentence_ids, token_type_ids,
                               position_ids, content_boxes=content_boxes, **flags)
        paired = input_ids.shape[0] == pixel_values.shape[0]
        if return_loss is None:
            return_loss = paired
        elif return_loss and not paired:
            raise ValueError(
                f"return_loss=True needs paired inputs, got {input_ids.shape[0]} texts and {pixel_values.shape[0]} images"
            )
        features = self.encode(input_ids, attention_mask, pixel_values, word_ids, sentence_ids, token_type_ids,
                               position_ids, with_local=return_loss and self.config.uses_local_alignment,
                               with_place=return_loss, content_boxes=content_boxes, **flags)
        losses = dict(self.loss_from_features(features, local_loss_scale)) if return_loss else {}
        logit_scale = self.logit_scale.clamp(max=self.config.logit_scale_max).exp()
        logits_per_text = logit_scale * features.text_embeds @ features.image_embeds.t()  # (B_t, B_i)
        return PlanOutput(**{**losses, "image_embeds": features.image_embeds, "text_embeds": features.text_embeds,
                             "logits_per_text": logits_per_text, "logits_per_image": logits_per_text.t(),
                             "text_model_output": features.text_model_output,
                             "vision_model_output": features.vision_model_output})

    def get_grounding_maps(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.FloatTensor,
        word_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        content_boxes: torch.Tensor | None = None,
        regions: bool = False,
        **kwargs,
    ) -> PlanGroundingOutput:
        """Each phrase's map on its image's pixel grid (phrase i with image i), from the local objective's module:
        for PLAN each word's dense soft region softmax(w.p / tau_s), or with `regions=True` the last refinement
        stage's sparsified regions (what its loss reads); the word weights omega combine them. With the processor's
        content_boxes (and `config.mask_padding`) the padding gets exactly zero weight."""
        features = self.encode(input_ids, attention_mask, pixel_values, word_ids, token_type_ids=token_type_ids,
                               with_local=True, with_place=False, content_boxes=content_boxes)
        attention, omega = self.local_alignment.grounding_maps(features, regions=regions)  # (B, M, N), (B, M)
        height, width = features.grid_size
        heatmaps = torch.einsum("bm,bmn->bn", omega, attention)  # (B, N)
        return PlanGroundingOutput(
            heatmaps=heatmaps.view(-1, height, width),
            word_heatmaps=attention.view(attention.shape[0], attention.shape[1], height, width),
            word_mask=features.word_mask,
            word_weights=omega,
        )


def _output_flags(output_hidden_states: bool | None, output_attentions: bool | None) -> dict[str, bool]:
    """The towers' output switches that were given (unset ones fall back to each tower's config)."""
    return {name: value for name, value in (("output_hidden_states", output_hidden_states),
                                            ("output_attentions", output_attentions)) if value is not None}


class PlanForImageClassification(PlanPreTrainedModel):
    """The pre-trained vision tower + a linear head; multi-label (BCE) or multi-class (CE) by `config.problem_type`.

    `freeze_vision_tower()` turns it into a linear probe. Loading a PlanModel checkpoint keeps its vision tower.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # The loss is a per-batch mean: Trainer must divide it by the gradient-accumulation steps itself (a `**kwargs`
    # forward would otherwise make it assume the model normalises by `num_items_in_batch`).
    accepts_loss_kwargs = False

    def __init__(self, config: PlanConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vision_model = _build_tower(config.vision_config)
        _make_stages_checkpointable(self.vision_model)
        vision_dim, _ = vision_feature_dims(config.vision_config, -1)
        self.classifier = nn.Linear(vision_dim, config.num_labels)
        self.post_init()

    def freeze_vision_tower(self, frozen: bool = True) -> None:
        """Linear probe (`frozen=False` undoes it): the tower gets no gradients *and* stays in eval mode under
        `train()`, else a ResNet's BatchNorm running statistics would still change while its weights are frozen."""
        for parameter in self.vision_model.parameters():
            parameter.requires_grad = not frozen
        self.vision_tower_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True):
        # nn.Module.train named explicitly, not super(): the downstream detection/segmentation models reuse this method.
        nn.Module.train(self, mode)
        if getattr(self, "vision_tower_frozen", False):
            self.vision_model.eval()
        return self

    @can_return_tuple
    def forward(self, pixel_values: torch.FloatTensor, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                **kwargs) -> ImageClassifierOutput:
        features = encode_image_tower(self.vision_model, pixel_values, output_hidden_states=output_hidden_states,
                                      output_attentions=output_attentions)
        logits = self.classifier(features.pooled)  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                multi_label = labels.dim() == 2 and labels.shape[-1] == self.num_labels and labels.is_floating_point()
                self.config.problem_type = "multi_label_classification" if multi_label else "single_label_classification"
            if self.config.problem_type == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            elif self.config.problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return ImageClassifierOutput(loss=loss, logits=logits,
                                     hidden_states=getattr(features.tower_output, "hidden_states", None),
                                     attentions=getattr(features.tower_output, "attentions", None))


__all__ = ["PlanForImageClassification", "PlanGroundingOutput", "PlanFeatures", "PlanModel", "PlanOutput", "PlanPreTrainedModel"]
