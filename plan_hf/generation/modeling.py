"""A PLAN vision tower as the image encoder of a `transformers.VisionEncoderDecoderModel` report generator.

`VisionEncoderDecoderModel` cross-attends to encoder states of shape (B, seq, hidden). A ResNet tower gives
(B, C, h, w) maps and a ViT gives (B, 1 + h*w, C) tokens, so `PlanVisionEncoder` wraps the tower and returns its
pixel grid as tokens (the same grid PLAN aligns words to), layer-normalised and with a fixed 2-D sine-cosine position
embedding added: cross-attention is otherwise blind to where a feature lies, and a report says "left" or "right".

`import plan_hf.generation` registers `model_type="plan_vision_encoder"` with `AutoConfig`/`AutoModel`, which is all
`VisionEncoderDecoderModel.from_pretrained` needs to rebuild the encoder from a saved generator folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    VisionEncoderDecoderModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import BaseModelOutput

from ..configuration_plan import PlanConfig
from ..alignment_plan import sincos_position_embedding
from ..modeling_plan import PlanModel, _build_tower, encode_image_tower, vision_feature_dims

RANDOM_TOWER = "random"


class PlanVisionEncoderConfig(PreTrainedConfig):
    r"""
    Configuration of a [`PlanVisionEncoder`].

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*): the wrapped tower (any `AutoConfig` vision tower
            that `plan_hf` supports: ResNet-like or ViT-like; default `ResNetConfig()`).
        feature_layer (`int`): which of the tower's `hidden_states` gives the tokens (-1: the last layer; -2 on a
            ResNet: the stride-16 stage, 4x more tokens). PLAN's `local_vision_feature_layer` is the natural choice.
        position_embeddings (`bool`): add a fixed 2-D sine-cosine position embedding to the tokens.
        layer_norm_eps (`float`): epsilon of the token LayerNorm.
        initializer_range (`float`): std of the normal init of new linear layers (there are none by default).

    `hidden_size` (the tokens' width, which `VisionEncoderDecoderModel` reads) is derived from the tower.
    """

    model_type = "plan_vision_encoder"
    sub_configs_defaults = {"vision_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet")}

    def __init__(
        self,
        vision_config: dict | PreTrainedConfig | None = None,
        feature_layer: int = -1,
        position_embeddings: bool = True,
        layer_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ):
        kwargs.pop("hidden_size", None)  # derived below; a saved config.json carries it too
        self.vision_config = vision_config
        self.feature_layer = feature_layer
        self.position_embeddings = position_embeddings
        self.layer_norm_eps = float(layer_norm_eps)
        self.initializer_range = float(initializer_range)
        super().__init__(**kwargs)
        if not isinstance(self.vision_config, PreTrainedConfig):
            raise ValueError(f"PlanVisionEncoderConfig.vision_config must be a config or a config dict, "
                             f"got {type(self.vision_config).__name__}")
        self.hidden_size = vision_feature_dims(self.vision_config, feature_layer)[1]


class PlanVisionEncoder(PreTrainedModel):
    """A vision tower whose output is its pixel grid as a token sequence: `last_hidden_state` (B, N, hidden_size)."""

    config_class = PlanVisionEncoderConfig
    config: PlanVisionEncoderConfig
    base_model_prefix = "plan_vision_encoder"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: PlanVisionEncoderConfig):
        super().__init__(config)
        self.vision_model = _build_tower(config.vision_config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,  # VisionEncoderDecoderModel passes every non-decoder kwarg here (e.g. Trainer's loss kwargs)
    ) -> BaseModelOutput | tuple:
        features = encode_image_tower(self.vision_model, pixel_values, self.config.feature_layer)
        tokens = self.layer_norm(features.grid)  # (B, N, C)
        if self.config.position_embeddings:
            height, width = features.grid_size
            # Unit-norm rows scaled to the LayerNorm'd tokens' norm (~sqrt(C)), as ViT's and DETR's are comparable.
            position = sincos_position_embedding(height, width, tokens.shape[-1], tokens.device, tokens.dtype)
            tokens = tokens + position * math.sqrt(tokens.shape[-1])  # (B, N, C) + (N, C)
        hidden_states = getattr(features.tower_output, "hidden_states", None) if output_hidden_states else None
        if return_dict is False:
            return (tokens,) if hidden_states is None else (tokens, hidden_states)
        return BaseModelOutput(last_hidden_state=tokens, hidden_states=hidden_states)


AutoConfig.register(PlanVisionEncoderConfig.model_type, PlanVisionEncoderConfig, exist_ok=True)
AutoModel.register(PlanVisionEncoderConfig, PlanVisionEncoder, exist_ok=True)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and decoder
# --------------------------------------------------------------------------------------------------------------------
def configure_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer the bos/eos/pad tokens generation needs (in place; returned for chaining).

    A BERT WordPiece tokenizer (PlanProcessor's) has none of bos/eos: [CLS] starts a report and [SEP] ends it, as
    BERT itself frames a text. A GPT-2-like one has no pad: it pads with eos (padded labels are -100 anyway).
    """
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.cls_token if tokenizer.cls_token is not None else tokenizer.eos_token
    if tokenizer.eos_token is None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    missing = [name for name in ("bos_token", "eos_token", "pad_token") if getattr(tokenizer, name) is None]
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)} and no [CLS]/[SEP] to stand in for them")
    return tokenizer


@dataclass
class DecoderSettings:
    """The text decoder: a BERT-style causal LM with cross-attention, built from config (no pretrained weights)."""

    layers: int = 3
    hidden_size: int = 256
    heads: int = 4
    intermediate_size: int | None = None  # default 4 * hidden_size
    max_position_embeddings: int = 256  # longest report in tokens, [SEP] included
    dropout: float = 0.1

    def bert_config(self, tokenizer: PreTrainedTokenizerBase) -> BertConfig:
        if self.hidden_size % self.heads:
            raise ValueError(f"decoder hidden_size={self.hidden_size} must be divisible by heads={self.heads}")
        return BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate_size or 4 * self.hidden_size,
            max_position_embeddings=self.max_position_embeddings,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            is_decoder=True,
            add_cross_attention=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


# --------------------------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------------------------
PlanSource = PlanModel | PlanConfig | str | os.PathLike[str]


def _plan_tower(source: PlanSource, random_tower: bool) -> tuple[PlanConfig, dict[str, torch.Tensor] | None]:
    """(the checkpoint's config, its vision tower's weights -- None for a random tower)."""
    if isinstance(source, PlanConfig):
        return source, None
    if random_tower and not isinstance(source, PlanModel):
        return PlanConfig.from_pretrained(str(source)), None  # the architecture only: no weights to read
    plan = source if isinstance(source, PlanModel) else PlanModel.from_pretrained(str(source))
    return plan.config, None if random_tower else plan.vision_model.state_dict()


def build_report_generator(
    plan_model_or_path: PlanSource,
    tokenizer: PreTrainedTokenizerBase,
    decoder_layers: int = 3,
    decoder_hidden_size: int = 256,
    decoder_heads: int = 4,
    max_length: int = 128,
    feature_layer: int | None = None,
    random_tower: bool = False,
    num_beams: int = 1,
    decoder: DecoderSettings | None = None,
) -> VisionEncoderDecoderModel:
    """A `VisionEncoderDecoderModel`: PLAN's vision tower (its pre-trained weights) -> a new BERT-style decoder.

    Args:
        plan_model_or_path: a `PlanModel` or a folder / Hub id of one (a `training.pretrain` export); a
            `PlanConfig` gives a random tower of its architecture.
        tokenizer: the checkpoint's tokenizer (PlanProcessor's); bos/eos/pad are set on it (`configure_tokenizer`).
        decoder_layers, decoder_hidden_size, decoder_heads: the decoder's size (or pass `decoder`).
        max_length: longest report in tokens, [SEP] included: the decoder's positions and `generate()`'s limit.
        feature_layer: the tower layer whose grid becomes the tokens; default the checkpoint's
            `local_vision_feature_layer` (the grid PLAN aligned words to).
        random_tower: the baseline -- the same tower architecture, randomly initialised.
        num_beams: the generation config's default beam width (1: greedy).
    """
    configure_tokenizer(tokenizer)
    plan_config, tower_weights = _plan_tower(plan_model_or_path, random_tower)
    layer = plan_config.local_vision_feature_layer if feature_layer is None else feature_layer
    encoder = PlanVisionEncoder(PlanVisionEncoderConfig(vision_config=plan_config.vision_config.to_dict(),
                                                        feature_layer=layer))
    if tower_weights is not None:
        encoder.vision_model.load_state_dict(tower_weights)  # strict: every pre-trained tensor, nothing else
    settings = decoder or DecoderSettings(layers=decoder_layers, hidden_size=decoder_hidden_size, heads=decoder_heads,
                                          max_position_embeddings=max(max_length, 8))
    if settings.max_position_embeddings < max_length:
        raise ValueError(f"the decoder has {settings.max_position_embeddings} positions, fewer than "
                         f"max_length={max_length}")
    text_decoder = AutoModelForCausalLM.from_config(settings.bert_config(tokenizer))
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=text_decoder)
    # The forward pass shifts labels right with these (config); generate() reads the generation config.
    model.config.decoder_start_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.bos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_length=max_length + 1,  # generate() counts the start token
        num_beams=num_beams,
        # Not early_stopping=True: it stops at the first num_beams finished hypotheses, which are the short ones --
        # a report that ends early beats the right, longer one still being written.
        early_stopping=False,
    )
    return model


def load_report_generator(path: str | os.PathLike[str]) -> tuple[VisionEncoderDecoderModel, Any]:
    """A saved generator folder -> (model in eval mode, its `PlanProcessor`: tokenizer + image processor)."""
    from ..processing_plan import PlanProcessor

    model = VisionEncoderDecoderModel.from_pretrained(str(path))
    processor = PlanProcessor.from_pretrained(str(path)) if Path(path, "processor_config.json").is_file() else None
    return model.eval(), processor


__all__ = [
    "DecoderSettings",
    "PlanVisionEncoder",
    "PlanVisionEncoderConfig",
    "RANDOM_TOWER",
    "build_report_generator",
    "configure_tokenizer",
    "load_report_generator",
]
