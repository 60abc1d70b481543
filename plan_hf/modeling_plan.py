"""PlanModel (dual encoder with PLAN's progressive local alignment and PLACE's objectives) and
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
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import ModelOutput

from .configuration_plan import PlanConfig
from .losses_plan import (
    StageSchedule,
    content_contrast_loss,
    correlation_prediction_loss,
    correlation_target,
    global_contrastive_loss,
    pcma_contrastive_loss,
    plan_local_loss,
    pool_by_ids,
    progressive_regions,
    sample_patch_mask,
    take_patches,
    word_weights,
)


@dataclass
class PlanOutput(ModelOutput):
    """
    Args:
        loss: total loss L = lambda_g L_global + lambda_l(step) sum_t alpha_t L_local^t + lambda_pcma L_pcma + lambda_corr L_corr.
        logits_per_image: (num_images, num_texts) scaled cosine similarities of the global embeddings.
        logits_per_text: (num_texts, num_images), the transpose.
        image_embeds: (num_images, projection_dim) L2-normalised global image embeddings v.
        text_embeds: (num_texts, projection_dim) L2-normalised global report embeddings t.
        loss_global, loss_local, loss_pcma, loss_corr: each term before its weight (None when off).
        loss_local_stages: (T,) the local loss of each refinement stage.
        loss_content: the optional content-contrast term (`config.content_contrast_weight`), before its weight; it is
            added with weight lambda_l(step) * content_contrast_weight.
        local_loss_weight: the effective lambda_l at this step (curriculum applied).
        word_weights: (B, M) omega, the diagnostic word weights.
        regions_attention: (B, M, N) the last stage's soft region A' of each word on its own image.
        grid_size: (h, w) of the pixel grid, N = h * w.
        pathology_observations: (B, K, d_local) the V-PORs of each image (PCMA on).
        correlation_mask: (B, N) True at the patches the correlation proxy task masked (correlation on).
        text_model_output, vision_model_output: the towers' outputs.
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
    loss_content: torch.FloatTensor | None = None
    loss_local_stages: torch.FloatTensor | None = None
    local_loss_weight: torch.FloatTensor | None = None
    word_weights: torch.FloatTensor | None = None
    regions_attention: torch.FloatTensor | None = None
    grid_size: tuple[int, int] | None = None
    pathology_observations: torch.FloatTensor | None = None
    correlation_mask: torch.BoolTensor | None = None
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
    pixels: torch.Tensor | None = None  # p, (B, N, d_local), L2-normalised
    pixel_mask: torch.Tensor | None = None  # (B, N) bool, False on grid cells over the padding (config.mask_padding)
    sentences: torch.Tensor | None = None  # T-PORs, (B, S, d_local), L2-normalised (PCMA)
    sentence_mask: torch.Tensor | None = None  # (B, S)
    text_model_output: Any = None
    vision_model_output: Any = None

    TENSOR_FIELDS = ("text_embeds", "image_embeds", "words", "word_mask", "pixels", "pixel_mask", "sentences",
                     "sentence_mask")
    PADDED_FIELDS = ("words", "word_mask", "sentences", "sentence_mask")  # per-report axes of varying length

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


def encode_image_tower(vision_model: nn.Module, pixel_values: torch.Tensor, local_layer: int = -1) -> ImageFeatures:
    output = vision_model(pixel_values=pixel_values, output_hidden_states=local_layer != -1, return_dict=True)
    grid, grid_size = _tokens_to_grid(_grid_source(output, local_layer))
    return ImageFeatures(pooled=_pooled(output), grid=grid, grid_size=grid_size, tower_output=output)


def _build_tower(config, **preferred_kwargs) -> PreTrainedModel:
    model_class = AutoModel._model_mapping[type(config)]
    accepted = inspect.signature(model_class.__init__).parameters
    kwargs = {k: v for k, v in preferred_kwargs.items() if k in accepted}
    return AutoModel.from_config(config, **kwargs)


def _make_stages_checkpointable(tower: nn.Module) -> None:
    """Give CNN towers without transformers' checkpointing support (ResNet's stages, MobileNetV2's blocks)
    per-stage activation checkpointing.

    Each stage gets the `gradient_checkpointing` flag that `PreTrainedModel._set_gradient_checkpointing` toggles.
    """
    if getattr(tower, "supports_gradient_checkpointing", False):
        return
    stages = getattr(getattr(tower, "encoder", None), "stages", None)
    if stages is None and isinstance(getattr(tower, "layer", None), nn.ModuleList):
        stages = tower.layer
    if stages is None:
        return
    for stage in stages:
        stage.gradient_checkpointing = False
        original_forward = stage.forward

        def forward(*args, _stage=stage, _forward=original_forward, **kwargs):
            if _stage.gradient_checkpointing and _stage.training and torch.is_grad_enabled():
                return _stage._gradient_checkpointing_func(_forward, *args, **kwargs)
            return _forward(*args, **kwargs)

        stage.forward = forward


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
            init.constant_(module.similarity_log_scale, math.log(1.0 / self.config.similarity_temperature))
            if module.pixel_update_gate is not None:
                init.zeros_(module.pixel_update_gate)
        elif isinstance(module, PathologyObservationExtractor):
            init.normal_(module.queries, std=self.config.initializer_range)
        elif isinstance(module, PatchCorrelationPredictor):
            init.normal_(module.mask_token, std=self.config.initializer_range)
            init.normal_(module.null_word, std=self.config.initializer_range)


class PixelUpdate(nn.Module):
    """Text-aware pixel update p <- normalise(p + gate * MLP(A'^T w)), the gate starting at 0 (METHOD.md §3)."""

    def __init__(self, dim: int, gate: nn.Parameter):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.gate = gate

    def forward(self, pixels: torch.Tensor, attention: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        text_context = attention.transpose(-1, -2).to(words.dtype) @ words  # (..., N, M) @ (..., M, d) -> (..., N, d)
        return F.normalize(pixels + self.gate * self.mlp(text_context), dim=-1)


def _transformer_decoder(dim: int, num_layers: int, num_heads: int) -> nn.TransformerDecoder:
    """Pre-norm decoder without dropout (the contrastive terms need no extra noise; outputs stay deterministic)."""
    layer = nn.TransformerDecoderLayer(dim, num_heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True,
                                       norm_first=True)
    return nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(dim))


def sincos_position_embedding(height: int, width: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (h * w, dim), each row of unit norm like the pixel features.

    A quarter of the channels each for sin / cos of the row and of the column; channels left over are zero.
    """
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1))
    rows, cols = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                                torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    angles_y = rows.reshape(-1, 1) * frequencies  # (N, dim/4)
    angles_x = cols.reshape(-1, 1) * frequencies
    embedding = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)  # (N, 4*(dim/4))
    embedding = embedding / math.sqrt(max(2 * quarter, 1))
    return F.pad(embedding, (0, dim - 4 * quarter)).to(dtype)


class PathologyObservationExtractor(nn.Module):
    """VPOE (METHOD.md §4): K learnable pathology queries attend to an image's projected pixel grid through a small
    transformer decoder; each output, projected and L2-normalised, is one visual pathology observation (V-POR).

    It reads the projected pixels p (B, N, d_local), the features PLAN's local alignment uses, so V-PORs and T-PORs
    live in the same local space and PCMA can run from cached features. No position embedding: the tower's features
    already carry position (CNN padding / ViT position embeddings), and this keeps any grid size valid.
    """

    def __init__(self, dim: int, num_queries: int, num_layers: int, num_heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(num_queries, dim))
        self.decoder = _transformer_decoder(dim, num_layers, num_heads)
        self.projection = nn.Linear(dim, dim)

    def forward(self, pixels: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (B, N, d); pixel_mask (B, N) bool, False on cells the queries must not attend to (padding)."""
        queries = self.queries.to(pixels.dtype).unsqueeze(0).expand(pixels.shape[0], -1, -1)  # (B, K, d)
        padding = None if pixel_mask is None else ~pixel_mask
        # queries self-attend, then cross-attend to the pixels, (B, K, d)
        observations = self.decoder(queries, pixels, memory_key_padding_mask=padding)
        return F.normalize(self.projection(observations), dim=-1)  # V-PORs, (B, K, d)


class PatchCorrelationPredictor(nn.Module):
    """Correlation exploration (METHOD.md §5): from the visible patches and the report, predict how each masked
    patch correlates with each visible one.

    Masked patches' features are replaced by a learned mask token; fixed 2-D position embeddings tell the mask tokens
    apart. A transformer decoder self-attends over all patches and cross-attends to the report's words (plus a learned
    null word, so a report without content words still has a key). The prediction for masked patch m and visible
    patch v is cos(head(h_m), p_v) with p_v the visible patch's own feature, so the gradient reaches the vision tower
    through the visible patches (as decoder inputs and as keys) and never through the masked ones.
    """

    def __init__(self, dim: int, num_layers: int, num_heads: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.null_word = nn.Parameter(torch.zeros(dim))
        self.decoder = _transformer_decoder(dim, num_layers, num_heads)
        self.head = nn.Linear(dim, dim)

    def forward(self, pixels: torch.Tensor, grid_size: tuple[int, int], words: torch.Tensor, word_mask: torch.Tensor,
                masked_index: torch.Tensor, visible_index: torch.Tensor) -> torch.Tensor:
        """pixels (B, N, d), words (B, M, d), word_mask (B, M), masked_index (B, N_m), visible_index (B, N_v)
        -> predicted correlations (B, N_m, N_v)."""
        batch, num_patches, dim = pixels.shape
        is_masked = torch.zeros(batch, num_patches, dtype=torch.bool, device=pixels.device)
        is_masked.scatter_(1, masked_index, True)  # (B, N)
        tokens = torch.where(is_masked.unsqueeze(-1), self.mask_token.to(pixels.dtype), pixels)  # (B, N, d)
        tokens = tokens + sincos_position_embedding(*grid_size, dim, device=pixels.device, dtype=pixels.dtype)
        memory = torch.cat([self.null_word.to(words.dtype).expand(batch, 1, dim), words], dim=1)  # (B, 1 + M, d)
        ignore = torch.cat([torch.zeros_like(word_mask[:, :1]), ~word_mask], dim=1)  # (B, 1 + M), True = no key
        hidden = self.decoder(tokens, memory, memory_key_padding_mask=ignore)  # (B, N, d)
        queries = F.normalize(self.head(take_patches(hidden, masked_index)), dim=-1)  # (B, N_m, d)
        keys = take_patches(pixels, visible_index)  # (B, N_v, d), with gradient
        return queries @ keys.transpose(-1, -2)  # (B, N_m, N_v)


class PlanModel(PlanPreTrainedModel):
    """Dual encoder: global InfoNCE + PLAN's progressive word-pixel alignment (+ PLACE's terms when switched on)."""

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
        # Parameters of an objective that is off are not built (or not trained): DDP needs every trained one used.
        self.similarity_log_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / config.similarity_temperature)),
            requires_grad=config.learn_similarity_temperature and config.uses_local_alignment,
        )
        self.word_gate = nn.Linear(d_local, 1) if config.use_word_gate and config.uses_local_alignment else None
        if config.text_aware_pixel_update:
            self.pixel_update_gate = nn.Parameter(torch.zeros(1))
            self.pixel_update = PixelUpdate(d_local, self.pixel_update_gate)
        else:
            self.pixel_update_gate = None
            self.pixel_update = None
        self.pathology_extractor = PathologyObservationExtractor(
            d_local, config.num_pathology_queries, config.pathology_decoder_layers, config.pathology_decoder_heads
        ) if config.uses_pcma else None
        self.correlation_predictor = PatchCorrelationPredictor(
            d_local, config.correlation_predictor_layers, config.correlation_predictor_heads
        ) if config.uses_correlation else None
        self.training_step = 0  # set by the training loop for the local-loss curriculum
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

    def set_training_step(self, step: int) -> None:
        """Tell the model the global optimisation step, for the local-loss warm-up (curriculum)."""
        self.training_step = int(step)

    def current_local_loss_weight(self) -> float:
        """lambda_l(step): ramps linearly from 0 to local_loss_weight over local_warmup_steps."""
        warmup = self.config.local_warmup_steps
        ramp = 1.0 if warmup == 0 else min(1.0, self.training_step / warmup)
        return self.config.local_loss_weight * ramp

    # ---------------------------------------------------------------------------------------------------------------
    def _text_outputs(self, input_ids, attention_mask, token_type_ids=None, position_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True}
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

    def get_text_features(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                          **kwargs) -> BaseModelOutputWithPooling:
        """Text tower output whose `pooler_output` is the projected (unnormalised) [CLS] embedding, as CLIPModel's."""
        outputs = self._text_outputs(input_ids, attention_mask, token_type_ids, position_ids)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.text_projection(self._pool_text(outputs.last_hidden_state, attention_mask)),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    def get_image_features(self, pixel_values, **kwargs) -> BaseModelOutputWithPooling:
        """Vision tower output whose `pooler_output` is the projected (unnormalised) global image embedding."""
        features = encode_image_tower(self.vision_model, pixel_values)
        return BaseModelOutputWithPooling(
            last_hidden_state=features.tower_output.last_hidden_state,
            pooler_output=self.visual_projection(features.pooled),
            hidden_states=getattr(features.tower_output, "hidden_states", None),
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

    def _word_weights(self, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.word_gate(words)).squeeze(-1) if self.word_gate is not None else None
        return word_weights(word_mask, gate, self.config.word_gate_floor)  # omega, (B, M)

    def _similarity_scale(self) -> torch.Tensor:
        return self.similarity_log_scale.clamp(max=math.log(100.0)).exp()

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
    ) -> PlanFeatures:
        """Run both towers and the projections: everything the losses need, and nothing that depends on the batch.

        The losses are a function of these features (`loss_from_features`), which is what lets gradient accumulation
        cache features of many micro-batches and still contrast each sample against the whole batch.
        with_local: compute words and pixels for PLAN (default: when the config trains it). with_place: compute what
        the config's PLACE objectives need (pixels; T-PORs for PCMA; words for the correlation predictor).
        content_boxes: the image processor's (B, 4) boxes of the image inside the padded square; with
        `config.mask_padding` they give `features.pixel_mask`, which keeps the padding out of the local terms.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_outputs = self._text_outputs(input_ids, attention_mask, token_type_ids, position_ids)
        image = encode_image_tower(self.vision_model, pixel_values, self.config.local_vision_feature_layer)
        text_hidden = text_outputs.last_hidden_state  # (B_t, L, D_t)
        features = PlanFeatures(
            text_embeds=F.normalize(self.text_projection(self._pool_text(text_hidden, attention_mask)), dim=-1),  # t
            image_embeds=F.normalize(self.visual_projection(image.pooled), dim=-1),  # v, (B_i, d)
            grid_size=image.grid_size,
            text_model_output=text_outputs,
            vision_model_output=image.tower_output,
        )
        if with_local is None:
            with_local = self.config.uses_local_alignment
        with_pcma = with_place and self.config.uses_pcma
        with_correlation = with_place and self.config.uses_correlation
        if with_local or with_correlation:
            if word_ids is None:
                word_ids = self.default_word_ids(attention_mask)
            pooled_words, features.word_mask = pool_by_ids(text_hidden, word_ids)  # (B, M, D_t), (B, M)
            features.words = F.normalize(self.word_projection(pooled_words), dim=-1)  # w_m, (B, M, d)
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

    def _correlation_loss(self, features: PlanFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Correlation exploration (METHOD.md §5) on a fresh random patch mask: (loss, mask (B, N))."""
        config = self.config
        pixels = features.pixels  # (B, N, d)
        batch, num_patches, _ = pixels.shape
        masked_index, visible_index = sample_patch_mask(batch, num_patches, config.correlation_mask_ratio,
                                                        pixels.device)  # (B, N_m), (B, N_v)
        predicted = self.correlation_predictor(pixels, features.grid_size, features.words, features.word_mask,
                                               masked_index, visible_index)  # (B, N_m, N_v)
        target = correlation_target(pixels, masked_index, visible_index)  # (B, N_m, N_v), no gradient
        loss = correlation_prediction_loss(predicted, target, config.correlation_loss_type,
                                           config.correlation_temperature)
        mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=pixels.device)
        return loss, mask.scatter_(1, masked_index, True)  # (B, N)

    def loss_from_features(self, features: PlanFeatures) -> PlanOutput:
        """All loss terms of METHOD.md §6 from (possibly cached, concatenated) features of a paired batch."""
        config = self.config
        out = PlanOutput(image_embeds=features.image_embeds, text_embeds=features.text_embeds,
                         grid_size=features.grid_size)
        logit_scale = self.logit_scale.clamp(max=config.logit_scale_max).exp()
        out.loss_global = global_contrastive_loss(features.image_embeds, features.text_embeds, logit_scale)
        loss = config.global_loss_weight * out.loss_global
        if config.uses_local_alignment:
            omega = self._word_weights(features.words, features.word_mask)
            schedule = StageSchedule.from_config(config)
            local = plan_local_loss(
                features.words, features.word_mask, features.pixels, self._similarity_scale(), schedule, omega,
                method=config.region_sparsify, prior_weight=config.prior_weight, prior_epsilon=config.prior_epsilon,
                cross_sample=config.cross_sample_local, within_pair=config.within_pair_local,
                chunk_size=config.cross_sample_chunk_size,
                pixel_update=self.pixel_update, pixel_mask=features.pixel_mask,
            )
            weight = self.current_local_loss_weight()
            out.loss_local, out.loss_local_stages = local.loss, local.stage_losses
            out.local_loss_weight = torch.tensor(weight)
            out.word_weights, out.regions_attention = local.word_weights, local.regions_attention
            loss = loss + weight * local.loss
            if config.content_contrast_weight > 0:
                out.loss_content = content_contrast_loss(
                    features.words, features.word_mask, omega, local.regions_attention, features.pixels,
                    schedule.temperatures[-1])
                loss = loss + weight * config.content_contrast_weight * out.loss_content
        if config.uses_pcma:
            if features.sentences is None or features.pixels is None:
                raise ValueError("PCMA needs features.sentences and features.pixels: encode with with_place=True")
            observations = self.pathology_extractor(features.pixels, features.pixel_mask)  # V-PORs, (B, K, d)
            out.loss_pcma = pcma_contrastive_loss(observations, features.sentences, features.sentence_mask,
                                                  config.pcma_temperature, config.pcma_chunk_size)
            out.pathology_observations = observations
            loss = loss + config.pcma_loss_weight * out.loss_pcma
        if config.uses_correlation:
            if features.words is None or features.pixels is None:
                raise ValueError("correlation exploration needs features.words and features.pixels: encode with "
                                 "with_place=True")
            out.loss_corr, out.correlation_mask = self._correlation_loss(features)
            loss = loss + config.correlation_loss_weight * out.loss_corr
        out.loss = loss
        return out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        word_ids: torch.LongTensor | None = None,
        sentence_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        return_features: bool = False,
        return_dict: bool | None = None,
        content_boxes: torch.Tensor | None = None,
        **kwargs,
    ) -> PlanOutput | PlanFeatures:
        """Encode a batch of reports and images.

        return_features: return the `PlanFeatures` (towers + projections, local features included) and compute no
        loss: the first half of a step whose loss is computed later from cached features (gradient accumulation with
        the whole batch's negatives). Going through `forward` keeps DDP's hooks working.

        return_loss: True computes the loss (the batch must be paired: report i with image i); None (default)
        computes it when the batch is paired, so a (1 image, K prompts) zero-shot call just scores.
        content_boxes (the image processor's) keep the padding out of the local terms (`config.mask_padding`); the
        processor's `original_sizes` is accepted and ignored.
        """
        if return_features:
            return self.encode(input_ids, attention_mask, pixel_values, word_ids, sentence_ids, token_type_ids,
                               position_ids, content_boxes=content_boxes)
        paired = input_ids.shape[0] == pixel_values.shape[0]
        if return_loss is None:
            return_loss = paired
        elif return_loss and not paired:
            raise ValueError(
                f"return_loss=True needs paired inputs, got {input_ids.shape[0]} texts and {pixel_values.shape[0]} images"
            )
        features = self.encode(input_ids, attention_mask, pixel_values, word_ids, sentence_ids, token_type_ids,
                               position_ids, with_local=return_loss and self.config.uses_local_alignment,
                               with_place=return_loss, content_boxes=content_boxes)
        out = self.loss_from_features(features) if return_loss else PlanOutput(
            image_embeds=features.image_embeds, text_embeds=features.text_embeds, grid_size=features.grid_size)
        logit_scale = self.logit_scale.clamp(max=self.config.logit_scale_max).exp()
        out.logits_per_text = logit_scale * features.text_embeds @ features.image_embeds.t()  # (B_t, B_i)
        out.logits_per_image = out.logits_per_text.t()
        out.text_model_output, out.vision_model_output = features.text_model_output, features.vision_model_output
        return out

    def get_grounding_maps(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.FloatTensor,
        word_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        content_boxes: torch.Tensor | None = None,
        **kwargs,
    ) -> PlanGroundingOutput:
        """Each phrase's last-stage soft region on its image's pixel grid (phrase i with image i).

        With the processor's content_boxes (and `config.mask_padding`) the padding gets exactly zero weight."""
        features = self.encode(input_ids, attention_mask, pixel_values, word_ids, token_type_ids=token_type_ids,
                               with_local=True, with_place=False, content_boxes=content_boxes)
        words, word_mask, pixels = features.words, features.word_mask, features.pixels
        omega = self._word_weights(words, word_mask)
        stages = progressive_regions(
            words, pixels, self._similarity_scale(), StageSchedule.from_config(self.config),
            self.config.region_sparsify, self.config.prior_weight, self.config.prior_epsilon, self.pixel_update,
            pixel_mask=features.pixel_mask,
        )
        attention = stages[-1][0]  # A' of the last stage, (B, M, N)
        height, width = features.grid_size
        heatmaps = torch.einsum("bm,bmn->bn", omega, attention)  # (B, N)
        return PlanGroundingOutput(
            heatmaps=heatmaps.view(-1, height, width),
            word_heatmaps=attention.view(attention.shape[0], attention.shape[1], height, width),
            word_mask=word_mask,
            word_weights=omega,
        )


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

    def forward(self, pixel_values: torch.FloatTensor, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> ImageClassifierOutput:
        features = encode_image_tower(self.vision_model, pixel_values)
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
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=getattr(features.tower_output, "hidden_states", None))


__all__ = ["PlanForImageClassification", "PlanGroundingOutput", "PlanFeatures", "PlanModel", "PlanOutput", "PlanPreTrainedModel"]
