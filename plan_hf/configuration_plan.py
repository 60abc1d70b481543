"""PlanConfig: the two towers' configs, the projections, and every switch of the PLAN / PLACE objectives."""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Sparsification rules for a word's soft region (METHOD.md §2.3).
REGION_SPARSIFY_CHOICES = ("top_mass", "sparsemax", "none")
CORRELATION_LOSS_CHOICES = ("kl", "mse")
TEXT_POOLING_CHOICES = ("cls", "mean")


def _check(condition: bool, field: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ValueError(f"PlanConfig.{field} {requirement}, got {value!r}")


class PlanConfig(PreTrainedConfig):
    r"""
    Configuration of a [`PlanModel`]: a text tower and a vision tower (any `AutoConfig`: BERT-like text, ResNet or ViT
    vision), projections into a shared space, and the loss switches of METHOD.md.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*): BERT-like text tower (default: `BertConfig()`).
        vision_config (`dict` or `PreTrainedConfig`, *optional*): vision tower (default: `ResNetConfig()`, ResNet-50).
        projection_dim (`int`): dimension d of the global embeddings v and t.
        local_projection_dim (`int`, *optional*): dimension of word and pixel embeddings (defaults to `projection_dim`).
        local_vision_feature_layer (`int`): which of the vision tower's `hidden_states` gives the pixel grid for local
            alignment (-1: the last; -2 on a ResNet: the stride-16 stage, a 14x14 grid at 224 px).
        logit_scale_init_value (`float`): initial log(1/temperature) of the global InfoNCE (log(1/0.07)).
        logit_scale_max (`float`): the global logit scale is clamped to at most this (log 100).
        global_loss_weight (`float`): lambda_g.
        local_loss_weight (`float`): lambda_l; 0 turns PLAN's local alignment off (a CLIP-style baseline).
        local_warmup_steps (`int`): lambda_l ramps linearly from 0 over this many training steps (curriculum).
        similarity_temperature (`float`): tau_s of the word-pixel similarity S = w.p / tau_s.
        learn_similarity_temperature (`bool`): whether tau_s is a learned parameter.
        local_temperature (`float`): tau_0, the temperature of the local InfoNCE terms at the first stage.
        region_sparsify (`str`): pixel-side noise suppression: "top_mass" (keep the top `region_keep_ratio` of each
            word's mass), "sparsemax", or "none".
        region_keep_ratio (`float`): keep_0 in (0, 1]; 1.0 keeps every pixel (no suppression).
        use_word_gate (`bool`): word-side noise suppression (a learned diagnostic-importance gate).
        word_gate_floor (`float`): fraction of each word's weight that stays uniform, so the gate cannot collapse onto
            one word: omega = floor / M + (1 - floor) * g / sum(g).
        cross_sample_local (`bool`): add the image <-> report local matching term across the batch (O(B^2 M N)).
        content_contrast_weight (`float`): weight of an extra local term (not in METHOD.md; 0 is off): each word's
            last-stage region on its own image against the same cells of the batch's other images
            (`losses_plan.content_contrast_loss`), which a position-only pixel code cannot satisfy. Needs
            `local_loss_weight` > 0 (it follows the same warm-up).
        within_pair_local (`bool`): the term inside each pair: word m must match its own region r_m rather than the
            other words' regions. It can be satisfied by giving each word a fixed place in the image whatever the
            image shows (pixel features that code position); `benchmarks/RESULTS.md` measures both settings.
        cross_sample_chunk_size (`int`): images per chunk when computing the cross-sample term.
        num_refinement_stages (`int`): T, the progressive stages.
        stage_loss_weights (`list[float]`, *optional*): alpha_t; default grows with the stage, alpha_t ~ t + 1,
            normalised to sum to 1.
        prior_weight (`float`): lambda_prior, the weight of the previous stage's region in the next stage's logits.
        prior_epsilon (`float`): epsilon in log(A' + epsilon).
        temperature_decay (`float`): gamma, tau_t = tau_0 * gamma^t.
        keep_ratio_decay (`float`): kappa, keep_t = keep_0 * kappa^t.
        text_aware_pixel_update (`bool`): p^{t+1} = p^t + gate * MLP(A'^T w), gate initialised at 0.
        mask_padding (`bool`): when the inputs carry the image processor's `content_boxes`, feature-grid cells whose
            centre falls on the black padding around the image take no part in the word-pixel soft regions, the
            grounding maps and the pathology queries' attention (they are not anatomy, and a CNN's border features
            are distinctive enough to attract attention).
        pcma_loss_weight (`float`): lambda_pcma (PLACE pathology-level alignment); 0 is off.
        correlation_loss_weight (`float`): lambda_corr (PLACE correlation exploration); 0 is off.
        num_pathology_queries (`int`): K learnable queries of the visual pathology observation extractor.
        pathology_decoder_layers (`int`): transformer-decoder layers of that extractor.
        pathology_decoder_heads (`int`): attention heads of that extractor (must divide `local_projection_dim`).
        pcma_temperature (`float`): temperature of the PCMA InfoNCE and of its sentence -> observation attention.
        pcma_chunk_size (`int`): images per chunk when scoring every report against every image for PCMA.
        correlation_mask_ratio (`float`): fraction of image patches masked in the correlation proxy task.
        correlation_loss_type (`str`): "kl" (KL(target || prediction) between softmaxed rows) or "mse" (raw cosines).
        correlation_temperature (`float`): temperature of the softmax over correlation rows.
        text_pooling (`str`): the report embedding t: "mean" (default: the masked mean of the token states) or "cls"
            (the [CLS] token, as METHOD.md has it). With [CLS], short CPU pre-training runs collapsed (every report
            embedded alike, global loss stuck at ln B); with the mean they learn (benchmarks/RESULTS.md §3).
        correlation_predictor_layers (`int`): transformer-decoder layers of the (report-conditioned) correlation
            predictor.
        correlation_predictor_heads (`int`): its attention heads (must divide `local_projection_dim`).
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
        logit_scale_init_value: float = math.log(1 / 0.07),
        logit_scale_max: float = math.log(100.0),
        global_loss_weight: float = 1.0,
        local_loss_weight: float = 1.0,
        local_warmup_steps: int = 0,
        similarity_temperature: float = 0.1,
        learn_similarity_temperature: bool = True,
        local_temperature: float = 0.1,
        region_sparsify: str = "top_mass",
        region_keep_ratio: float = 0.5,
        use_word_gate: bool = True,
        word_gate_floor: float = 0.5,
        cross_sample_local: bool = True,
        within_pair_local: bool = True,
        content_contrast_weight: float = 0.0,
        cross_sample_chunk_size: int = 16,
        num_refinement_stages: int = 3,
        stage_loss_weights: list[float] | None = None,
        prior_weight: float = 1.0,
        prior_epsilon: float = 1e-6,
        temperature_decay: float = 0.8,
        keep_ratio_decay: float = 0.8,
        text_aware_pixel_update: bool = False,
        mask_padding: bool = True,
        pcma_loss_weight: float = 0.0,
        correlation_loss_weight: float = 0.0,
        num_pathology_queries: int = 16,
        pathology_decoder_layers: int = 2,
        pathology_decoder_heads: int = 4,
        pcma_temperature: float = 0.1,
        pcma_chunk_size: int = 64,
        correlation_mask_ratio: float = 0.5,
        correlation_loss_type: str = "kl",
        correlation_temperature: float = 0.1,
        correlation_predictor_layers: int = 1,
        correlation_predictor_heads: int = 4,
        text_pooling: str = "mean",
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.text_config = text_config
        self.vision_config = vision_config
        self.projection_dim = projection_dim
        self.local_projection_dim = local_projection_dim if local_projection_dim is not None else projection_dim
        self.local_vision_feature_layer = local_vision_feature_layer
        self.logit_scale_init_value = float(logit_scale_init_value)
        self.logit_scale_max = float(logit_scale_max)
        self.global_loss_weight = float(global_loss_weight)
        self.local_loss_weight = float(local_loss_weight)
        self.local_warmup_steps = local_warmup_steps
        self.similarity_temperature = float(similarity_temperature)
        self.learn_similarity_temperature = learn_similarity_temperature
        self.local_temperature = float(local_temperature)
        self.region_sparsify = region_sparsify
        self.region_keep_ratio = float(region_keep_ratio)
        self.use_word_gate = use_word_gate
        self.word_gate_floor = float(word_gate_floor)
        self.cross_sample_local = cross_sample_local
        self.within_pair_local = within_pair_local
        self.content_contrast_weight = float(content_contrast_weight)
        self.cross_sample_chunk_size = cross_sample_chunk_size
        self.num_refinement_stages = num_refinement_stages
        self.stage_loss_weights = list(stage_loss_weights) if stage_loss_weights is not None else None
        self.prior_weight = float(prior_weight)
        self.prior_epsilon = float(prior_epsilon)
        self.temperature_decay = float(temperature_decay)
        self.keep_ratio_decay = float(keep_ratio_decay)
        self.text_aware_pixel_update = text_aware_pixel_update
        self.mask_padding = mask_padding
        self.pcma_loss_weight = float(pcma_loss_weight)
        self.correlation_loss_weight = float(correlation_loss_weight)
        self.num_pathology_queries = num_pathology_queries
        self.pathology_decoder_layers = pathology_decoder_layers
        self.pathology_decoder_heads = pathology_decoder_heads
        self.pcma_temperature = float(pcma_temperature)
        self.pcma_chunk_size = pcma_chunk_size
        self.correlation_mask_ratio = float(correlation_mask_ratio)
        self.correlation_loss_type = correlation_loss_type
        self.correlation_temperature = float(correlation_temperature)
        self.correlation_predictor_layers = correlation_predictor_layers
        self.correlation_predictor_heads = correlation_predictor_heads
        self.text_pooling = text_pooling
        self.initializer_range = float(initializer_range)
        super().__init__(**kwargs)
        self._validate_plan_fields()

    def _validate_plan_fields(self) -> None:
        positive_ints = ("projection_dim", "local_projection_dim", "cross_sample_chunk_size", "num_refinement_stages",
                         "num_pathology_queries", "pathology_decoder_layers", "pathology_decoder_heads",
                         "pcma_chunk_size", "correlation_predictor_layers", "correlation_predictor_heads")
        for name in positive_ints:
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
                   "must be a positive integer")
        _check(isinstance(self.local_warmup_steps, int) and self.local_warmup_steps >= 0, "local_warmup_steps",
               self.local_warmup_steps, "must be a non-negative integer")
        for name in ("global_loss_weight", "local_loss_weight", "pcma_loss_weight", "correlation_loss_weight",
                     "prior_weight", "content_contrast_weight"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, name, value, "must be a finite number >= 0")
        for name in ("similarity_temperature", "local_temperature", "pcma_temperature", "correlation_temperature",
                     "prior_epsilon"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, name, value, "must be a finite number > 0")
        _check(0 < self.region_keep_ratio <= 1, "region_keep_ratio", self.region_keep_ratio, "must be in (0, 1]")
        for name in ("temperature_decay", "keep_ratio_decay"):
            value = getattr(self, name)
            _check(0 < value <= 1, name, value, "must be in (0, 1]")
        for name in ("mask_padding", "use_word_gate", "cross_sample_local", "within_pair_local",
                     "text_aware_pixel_update"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be True or False")
        _check(self.content_contrast_weight == 0 or self.local_loss_weight > 0, "content_contrast_weight",
               self.content_contrast_weight, "needs local_loss_weight > 0 (it reads PLAN's word regions)")
        _check(self.within_pair_local or self.cross_sample_local, "within_pair_local", self.within_pair_local,
               "and cross_sample_local cannot both be False (the local loss would have no term)")
        _check(0 <= self.word_gate_floor <= 1, "word_gate_floor", self.word_gate_floor, "must be in [0, 1]")
        _check(0 < self.correlation_mask_ratio < 1, "correlation_mask_ratio", self.correlation_mask_ratio,
               "must be in (0, 1)")
        _check(self.region_sparsify in REGION_SPARSIFY_CHOICES, "region_sparsify", self.region_sparsify,
               f"must be one of {REGION_SPARSIFY_CHOICES}")
        _check(self.text_pooling in TEXT_POOLING_CHOICES, "text_pooling", self.text_pooling,
               f"must be one of {TEXT_POOLING_CHOICES}")
        _check(self.correlation_loss_type in CORRELATION_LOSS_CHOICES, "correlation_loss_type",
               self.correlation_loss_type, f"must be one of {CORRELATION_LOSS_CHOICES}")
        # The PLACE modules attend in the local space; their heads must split it (checked only when they are built).
        for name, used in (("pathology_decoder_heads", self.uses_pcma),
                           ("correlation_predictor_heads", self.uses_correlation)):
            _check(not used or self.local_projection_dim % getattr(self, name) == 0, name, getattr(self, name),
                   f"must divide local_projection_dim={self.local_projection_dim}")
        _check(0 < self.logit_scale_max and self.logit_scale_init_value <= self.logit_scale_max, "logit_scale_init_value",
               self.logit_scale_init_value, f"must be at most logit_scale_max={self.logit_scale_max}")
        if self.stage_loss_weights is not None:
            weights = self.stage_loss_weights
            _check(len(weights) == self.num_refinement_stages, "stage_loss_weights", weights,
                   f"must have num_refinement_stages={self.num_refinement_stages} entries")
            _check(all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0, "stage_loss_weights",
                   weights, "must be finite, >= 0, with a positive sum")
        for name, sub in (("text_config", self.text_config), ("vision_config", self.vision_config)):
            _check(isinstance(sub, PreTrainedConfig), name, type(sub).__name__, "must be a config or a config dict")

    @property
    def resolved_stage_loss_weights(self) -> list[float]:
        """alpha_t, growing with the stage (t + 1) unless given, normalised to sum to 1."""
        raw = self.stage_loss_weights or [float(t + 1) for t in range(self.num_refinement_stages)]
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
