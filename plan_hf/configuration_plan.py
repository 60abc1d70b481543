"""PlanConfig: the two towers, the projections, and one prefixed block of settings per objective (docs/method.md)."""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

logger = logging.getLogger(__name__)

LOCAL_OBJECTIVE_CHOICES = ("plan", "gloria", "mgca")
REGION_SPARSIFY_CHOICES = ("top_mass", "sparsemax", "none")  # docs/method.md §2.3
WITHIN_PAIR_NEGATIVE_CHOICES = ("all_words", "other_sentences")  # docs/method.md §2.6
CORRELATION_LOSS_CHOICES = ("kl", "mse")
TEXT_POOLING_CHOICES = ("cls", "mean")

# Names of the 0.1 format (config.json files and YAML `model:` blocks written before the objective blocks had
# prefixes): they load under their new names.
RENAMED_FIELDS = {
    "similarity_temperature": "local_similarity_temperature",
    "learn_similarity_temperature": "local_learn_similarity_temperature",
    "region_sparsify": "local_region_sparsify",
    "region_keep_ratio": "local_region_keep_ratio",
    "use_word_gate": "local_word_gate",
    "word_gate_floor": "local_word_gate_floor",
    "cross_sample_local": "local_cross_sample",
    "within_pair_local": "local_within_pair",
    "num_refinement_stages": "local_num_stages",
    "stage_loss_weights": "local_stage_loss_weights",
    "prior_weight": "local_prior_weight",
    "prior_epsilon": "local_prior_epsilon",
    "temperature_decay": "local_temperature_decay",
    "keep_ratio_decay": "local_keep_ratio_decay",
    "text_aware_pixel_update": "local_pixel_update",
    "num_pathology_queries": "pcma_num_queries",
    "pathology_decoder_layers": "pcma_decoder_layers",
    "pathology_decoder_heads": "pcma_decoder_heads",
}
# Settings of the 0.1 format that are no longer the model's: how a run is scheduled and chunked belongs to the
# training arguments (same names there). A saved model carrying them loads without them; outputs do not change.
TRAINING_FIELDS = ("local_warmup_steps", "cross_sample_chunk_size", "pcma_chunk_size")
# Removed: an experimental loss term (it sent every phrase's map to the heart; docs/method.md, "Departures").
REMOVED_FIELDS = ("content_contrast_weight",)


def _check(condition: bool, field: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ValueError(f"PlanConfig.{field} {requirement}, got {value!r}")


def _upgrade_legacy_fields(kwargs: dict[str, Any]) -> None:
    """Rename / drop (in place) the fields of the 0.1 format, so that its config.json files keep loading."""
    for old, new in RENAMED_FIELDS.items():
        if old in kwargs:
            kwargs[new] = kwargs.pop(old)
    for name in TRAINING_FIELDS:
        if name in kwargs:
            logger.info("PlanConfig: %r is a training argument now; the saved value %r is not part of the model",
                        name, kwargs.pop(name))
    for name in REMOVED_FIELDS:
        if kwargs.pop(name, 0) not in (0, 0.0, None):
            logger.warning("PlanConfig: %r was removed (its loss term no longer exists); the model's outputs are "
                           "unchanged, only training with it is gone", name)


class PlanConfig(PreTrainedConfig):
    r"""
    Configuration of a [`PlanModel`]: a text tower and a vision tower (any `AutoConfig`: BERT-like text; ResNet, ViT,
    MobileNetV2, ... vision), projections into a shared space, then one block per objective. docs/method.md explains
    every symbol; a weight of 0 turns its objective off.

    Towers and projections:
        text_config / vision_config (`dict` or `PreTrainedConfig`): the towers (defaults: `BertConfig()`,
            `ResNetConfig()`).
        projection_dim (`int`): d, the dimension of the global embeddings v and t.
        local_projection_dim (`int`, *optional*): the dimension of words w_m and pixels p_n (default: projection_dim).
        local_vision_feature_layer (`int`): which of the vision tower's `hidden_states` is the pixel grid (-1: the last;
            the stride-16 stage, 14x14 at 224 px, is -2 on a ResNet or ConvNeXt and -5 on a MobileNetV2;
            `modeling_plan.vision_feature_layer_for_stride` finds it for any tower).
        text_pooling (`str`): the report vector t: "mean" of the token states (default) or the "cls" token.
        mask_padding (`bool`): grid cells on the image processor's padding take no part in word-pixel regions, grounding
            maps or the pathology queries' attention (needs the processor's `content_boxes` at call time).
        logit_scale_init_value, logit_scale_max (`float`): log(1/temperature) of the global InfoNCE, its start value and
            its upper clamp.

    Global alignment (§1): `global_loss_weight` (lambda_g).

    Local alignment (§2-3, §6): `local_objective` picks the term that `local_loss_weight` (lambda_l) weighs:
        "plan" (PLAN's progressive soft regions), "gloria" or "mgca" (the reference objectives).
        local_temperature (`float`): tau_0 of the local InfoNCE terms (PLAN: at the first stage).
        PLAN only:
        local_similarity_temperature (`float`): tau_s in S = w.p / tau_s; learned when
            `local_learn_similarity_temperature`.
        local_region_sparsify (`str`): pixel-side noise suppression: "top_mass" (keep the top `local_region_keep_ratio`
            of each word's mass), "sparsemax" or "none".
        local_word_gate (`bool`), local_word_gate_floor (`float`): word-side noise suppression, a learned gate g with
            omega = floor / M + (1 - floor) g / sum(g) (the floor keeps it from collapsing onto one word).
        local_cross_sample (`bool`): the image <-> report local matching term across the batch.
        local_within_pair (`bool`): the word <-> own-region term inside each pair; off by default (docs/method.md,
            "PLAN's within-pair term": it puts each word of a finding on a spot of its own and costs grounding).
        local_within_pair_negatives (`str`): its negatives: "all_words" (every other word of the report) or
            "other_sentences" (only words of the report's other sentences: the words of one finding describe one
            region; needs the processor's `sentence_ids`).
        local_num_stages (`int`): T, the progressive stages; local_stage_loss_weights: alpha_t (default ~ t + 1).
        local_prior_weight, local_prior_epsilon (`float`): lambda_prior and eps of the prior carry log(A' + eps).
        local_temperature_decay, local_keep_ratio_decay (`float`): gamma and kappa of tau_t = tau_0 gamma^t and
            keep_t = keep_0 kappa^t.
        local_pixel_update (`bool`): the text-aware pixel update between stages.

    PLACE pathology-level alignment (§4): `pcma_loss_weight`, `pcma_num_queries` (K), `pcma_decoder_layers`,
        `pcma_decoder_heads` (must divide local_projection_dim), `pcma_temperature`.
    PLACE correlation exploration (§5): `correlation_loss_weight`, `correlation_mask_ratio`, `correlation_loss_type`
        ("kl" or "mse"), `correlation_temperature`, `correlation_predictor_layers`, `correlation_predictor_heads`.

    Names of the 0.1 format (e.g. `num_refinement_stages`, `region_sparsify`) are read as their new names
    (`RENAMED_FIELDS`). How a run is scheduled (`local_warmup_steps`) and chunked (`cross_sample_chunk_size`,
    `pcma_chunk_size`) are training arguments, not model settings.
    """

    model_type = "plan"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet"),
    }

    def __init__(
        self,
        text_config: dict | PreTrainedConfig | None = None,
        vision_config: dict | PreTrainedConfig | None = None,
        projection_dim: int = 512,
        local_projection_dim: int | None = None,
        local_vision_feature_layer: int = -1,
        text_pooling: str = "mean",
        mask_padding: bool = True,
        logit_scale_init_value: float = math.log(1 / 0.07),
        logit_scale_max: float = math.log(100.0),
        global_loss_weight: float = 1.0,
        local_objective: str = "plan",
        local_loss_weight: float = 1.0,
        local_temperature: float = 0.1,
        local_similarity_temperature: float = 0.1,
        local_learn_similarity_temperature: bool = True,
        local_region_sparsify: str = "top_mass",
        local_region_keep_ratio: float = 0.5,
        local_word_gate: bool = True,
        local_word_gate_floor: float = 0.5,
        local_cross_sample: bool = True,
        local_within_pair: bool = False,
        local_within_pair_negatives: str = "all_words",
        local_num_stages: int = 3,
        local_stage_loss_weights: list[float] | None = None,
        local_prior_weight: float = 1.0,
        local_prior_epsilon: float = 1e-6,
        local_temperature_decay: float = 0.8,
        local_keep_ratio_decay: float = 0.8,
        local_pixel_update: bool = False,
        pcma_loss_weight: float = 0.0,
        pcma_num_queries: int = 16,
        pcma_decoder_layers: int = 2,
        pcma_decoder_heads: int = 4,
        pcma_temperature: float = 0.1,
        correlation_loss_weight: float = 0.0,
        correlation_mask_ratio: float = 0.5,
        correlation_loss_type: str = "kl",
        correlation_temperature: float = 0.1,
        correlation_predictor_layers: int = 1,
        correlation_predictor_heads: int = 4,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        legacy = {old: kwargs.pop(old) for old in list(kwargs) if old in RENAMED_FIELDS or old in TRAINING_FIELDS
                  or old in REMOVED_FIELDS}
        _upgrade_legacy_fields(legacy)
        values = dict(locals()) | legacy  # a 0.1 name, when given, sets its new field
        self.text_config = text_config
        self.vision_config = vision_config
        self.projection_dim = projection_dim
        self.local_projection_dim = local_projection_dim if local_projection_dim is not None else projection_dim
        self.local_vision_feature_layer = local_vision_feature_layer
        self.text_pooling = text_pooling
        self.mask_padding = mask_padding
        self.logit_scale_init_value = float(logit_scale_init_value)
        self.logit_scale_max = float(logit_scale_max)
        self.global_loss_weight = float(global_loss_weight)
        self.local_objective = local_objective
        self.local_loss_weight = float(local_loss_weight)
        self.local_temperature = float(local_temperature)
        self.local_similarity_temperature = float(values["local_similarity_temperature"])
        self.local_learn_similarity_temperature = values["local_learn_similarity_temperature"]
        self.local_region_sparsify = values["local_region_sparsify"]
        self.local_region_keep_ratio = float(values["local_region_keep_ratio"])
        self.local_word_gate = values["local_word_gate"]
        self.local_word_gate_floor = float(values["local_word_gate_floor"])
        self.local_cross_sample = values["local_cross_sample"]
        self.local_within_pair = values["local_within_pair"]
        self.local_within_pair_negatives = local_within_pair_negatives
        self.local_num_stages = values["local_num_stages"]
        weights = values["local_stage_loss_weights"]
        self.local_stage_loss_weights = list(weights) if weights is not None else None
        self.local_prior_weight = float(values["local_prior_weight"])
        self.local_prior_epsilon = float(values["local_prior_epsilon"])
        self.local_temperature_decay = float(values["local_temperature_decay"])
        self.local_keep_ratio_decay = float(values["local_keep_ratio_decay"])
        self.local_pixel_update = values["local_pixel_update"]
        self.pcma_loss_weight = float(pcma_loss_weight)
        self.pcma_num_queries = values["pcma_num_queries"]
        self.pcma_decoder_layers = values["pcma_decoder_layers"]
        self.pcma_decoder_heads = values["pcma_decoder_heads"]
        self.pcma_temperature = float(pcma_temperature)
        self.correlation_loss_weight = float(correlation_loss_weight)
        self.correlation_mask_ratio = float(correlation_mask_ratio)
        self.correlation_loss_type = correlation_loss_type
        self.correlation_temperature = float(correlation_temperature)
        self.correlation_predictor_layers = correlation_predictor_layers
        self.correlation_predictor_heads = correlation_predictor_heads
        self.initializer_range = float(initializer_range)
        super().__init__(**kwargs)
        self._validate_plan_fields()

    def _validate_plan_fields(self) -> None:
        positive_ints = ("projection_dim", "local_projection_dim", "local_num_stages", "pcma_num_queries",
                         "pcma_decoder_layers", "pcma_decoder_heads", "correlation_predictor_layers",
                         "correlation_predictor_heads")
        for name in positive_ints:
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
                   "must be a positive integer")
        for name in ("global_loss_weight", "local_loss_weight", "pcma_loss_weight", "correlation_loss_weight",
                     "local_prior_weight"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, name, value, "must be a finite number >= 0")
        for name in ("local_similarity_temperature", "local_temperature", "pcma_temperature",
                     "correlation_temperature", "local_prior_epsilon"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, name, value, "must be a finite number > 0")
        _check(0 < self.local_region_keep_ratio <= 1, "local_region_keep_ratio", self.local_region_keep_ratio,
               "must be in (0, 1]")
        for name in ("local_temperature_decay", "local_keep_ratio_decay"):
            value = getattr(self, name)
            _check(0 < value <= 1, name, value, "must be in (0, 1]")
        for name in ("mask_padding", "local_word_gate", "local_cross_sample", "local_within_pair",
                     "local_pixel_update", "local_learn_similarity_temperature"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be True or False")
        _check(self.local_within_pair or self.local_cross_sample, "local_within_pair", self.local_within_pair,
               "and local_cross_sample cannot both be False (PLAN's local loss would have no term)")
        _check(0 <= self.local_word_gate_floor <= 1, "local_word_gate_floor", self.local_word_gate_floor,
               "must be in [0, 1]")
        _check(0 < self.correlation_mask_ratio < 1, "correlation_mask_ratio", self.correlation_mask_ratio,
               "must be in (0, 1)")
        for name, choices in (("local_objective", LOCAL_OBJECTIVE_CHOICES),
                              ("local_region_sparsify", REGION_SPARSIFY_CHOICES),
                              ("local_within_pair_negatives", WITHIN_PAIR_NEGATIVE_CHOICES),
                              ("text_pooling", TEXT_POOLING_CHOICES),
                              ("correlation_loss_type", CORRELATION_LOSS_CHOICES)):
            _check(getattr(self, name) in choices, name, getattr(self, name), f"must be one of {choices}")
        # The PLACE modules attend in the local space; their heads must split it (checked only when they are built).
        for name, used in (("pcma_decoder_heads", self.uses_pcma),
                           ("correlation_predictor_heads", self.uses_correlation)):
            _check(not used or self.local_projection_dim % getattr(self, name) == 0, name, getattr(self, name),
                   f"must divide local_projection_dim={self.local_projection_dim}")
        _check(0 < self.logit_scale_max and self.logit_scale_init_value <= self.logit_scale_max, "logit_scale_init_value",
               self.logit_scale_init_value, f"must be at most logit_scale_max={self.logit_scale_max}")
        if self.local_stage_loss_weights is not None:
            weights = self.local_stage_loss_weights
            _check(len(weights) == self.local_num_stages, "local_stage_loss_weights", weights,
                   f"must have local_num_stages={self.local_num_stages} entries")
            _check(all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0, "local_stage_loss_weights",
                   weights, "must be finite, >= 0, with a positive sum")
        for name, sub in (("text_config", self.text_config), ("vision_config", self.vision_config)):
            _check(isinstance(sub, PreTrainedConfig), name, type(sub).__name__, "must be a config or a config dict")

    @property
    def resolved_stage_loss_weights(self) -> list[float]:
        """alpha_t, growing with the stage (t + 1) unless given, normalised to sum to 1."""
        raw = self.local_stage_loss_weights or [float(t + 1) for t in range(self.local_num_stages)]
        total = sum(raw)
        return [w / total for w in raw]

    @property
    def uses_local_alignment(self) -> bool:
        return self.local_loss_weight > 0

    @property
    def uses_pcma(self) -> bool:
        return self.pcma_loss_weight > 0

    @property
    def uses_correlation(self) -> bool:
        return self.correlation_loss_weight > 0

    @classmethod
    def from_text_vision_configs(cls, text_config: PreTrainedConfig, vision_config: PreTrainedConfig, **kwargs):
        return cls(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **kwargs)


__all__ = ["PlanConfig"]
