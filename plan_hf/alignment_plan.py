"""The objectives as modules: each owns its parameters and settings and calls the plain functions of
`losses_plan` (docs/method.md has the equations; its section numbers are cited here).

- `PlanLocalAlignment`: PLAN's progressive word-pixel alignment (§2-3): the similarity scale, the word gate, the
  text-aware pixel update and the stage schedule; its loss (`forward`) and its grounding maps (`grounding_maps`)
  run the same stages. `GloriaLocalAlignment` and `MgcaLocalAlignment` are the reference objectives (§6) behind the
  same two calls; `build_local_alignment` picks one by `config.local_objective`.
- `PathologyObservationExtractor` (PLACE's VPOE and PCMA loss, §4) and `PatchCorrelationPredictor` (PLACE's
  correlation exploration, §5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .losses_plan import (
    LocalAlignmentOutput,
    StageSchedule,
    correlation_prediction_loss,
    correlation_target,
    gloria_local_loss,
    gloria_word_attention,
    mgca_token_loss,
    mgca_word_attention,
    pcma_contrastive_loss,
    plan_local_loss,
    progressive_regions,
    region_stage,
    sample_patch_mask,
    take_patches,
    word_weights,
)

MAX_SIMILARITY_SCALE = math.log(100.0)  # the learned 1/tau_s is clamped at 100, as the global logit scale


class PixelUpdate(nn.Module):
    """Text-aware pixel update between stages: p <- normalise(p + gate * MLP(A'^T w)), the gate starting at 0 (§3)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, pixels: torch.Tensor, attention: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        text_context = attention.transpose(-1, -2).to(words.dtype) @ words  # (..., N, M) @ (..., M, d) -> (..., N, d)
        return F.normalize(pixels + self.gate * self.mlp(text_context), dim=-1)


class PlanLocalAlignment(nn.Module):
    """PLAN's local alignment (§2-3): soft word regions over the pixels, refined over T stages, with pixel-side
    (sparsified regions) and word-side (a learned diagnostic gate) noise suppression.

    `forward(words, word_mask, pixels, pixel_mask)` is the local loss sum_t alpha_t L_local^t;
    `grounding_maps(...)` each word's dense map (or the last stage's regions) and the word weights.
    Compute knobs that do not change the result: `chunk_size` (images per chunk of the cross-sample term) and
    `checkpoint_chunks` (recompute each chunk in the backward: memory O(B) instead of O(B^2)); the training
    arguments set them.
    """

    def __init__(self, config, trained: bool = True):
        super().__init__()
        dim = config.local_projection_dim
        # 1/tau_s, learned (when configured) only while the local loss trains it: DDP needs every trained one used
        self.similarity_log_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / config.local_similarity_temperature)),
            requires_grad=config.local_learn_similarity_temperature and trained,
        )
        self.word_gate = nn.Linear(dim, 1) if config.local_word_gate and trained else None
        self.pixel_update = PixelUpdate(dim) if config.local_pixel_update else None
        self.schedule = StageSchedule.from_config(config)
        self.sparsify = config.local_region_sparsify
        self.prior_weight = config.local_prior_weight
        self.prior_epsilon = config.local_prior_epsilon
        self.word_gate_floor = config.local_word_gate_floor
        self.cross_sample = config.local_cross_sample
        self.within_pair = config.local_within_pair
        self.group_by_sentence = config.local_within_pair_negatives == "other_sentences"
        self.chunk_size = 16
        self.checkpoint_chunks = False

    def similarity_scale(self) -> torch.Tensor:
        return self.similarity_log_scale.clamp(max=MAX_SIMILARITY_SCALE).exp()

    def word_weights(self, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """omega (B, M): the gate's diagnostic weights with a uniform floor, or uniform without a gate (§2.4)."""
        gate = torch.sigmoid(self.word_gate(words)).squeeze(-1) if self.word_gate is not None else None  # (B, M)
        return word_weights(word_mask, gate, self.word_gate_floor)

    def _stage_kwargs(self) -> dict:
        return dict(similarity_scale=self.similarity_scale(), schedule=self.schedule, method=self.sparsify,
                    prior_weight=self.prior_weight, prior_epsilon=self.prior_epsilon, pixel_update=self.pixel_update)

    def forward(self, features) -> LocalAlignmentOutput:
        """The local loss of a paired batch's `PlanFeatures`: words (B, M, d), word_mask (B, M), pixels (B, N, d),
        pixel_mask (B, N) (False on padding) and, for `local_within_pair_negatives="other_sentences"`,
        word_sentences (B, M)."""
        words, word_mask, pixels, word_sentences = features.words, features.word_mask, features.pixels, \
            features.word_sentences
        if self.within_pair and self.group_by_sentence and word_sentences is None:
            raise ValueError("local_within_pair_negatives='other_sentences' needs each word's sentence: pass the "
                             "processor's sentence_ids")
        return plan_local_loss(
            words, word_mask, pixels, weights=self.word_weights(words, word_mask), cross_sample=self.cross_sample,
            within_pair=self.within_pair, chunk_size=self.chunk_size, checkpoint_chunks=self.checkpoint_chunks,
            pixel_mask=features.pixel_mask, word_groups=word_sentences if self.group_by_sentence else None,
            **self._stage_kwargs(),
        )

    def grounding_maps(self, features, regions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(each word's map (B, M, N), omega (B, M)) of each phrase on its own image.

        The map is the dense soft region softmax_n(w.p / tau_s) over the image's cells, before noise suppression and
        refinement (docs/method.md §2, "The grounding map"); `regions=True` gives A' of the last stage instead, the
        sparsified regions the loss reads."""
        if regions:
            stages = progressive_regions(features.words, features.pixels, with_regions=False,
                                         pixel_mask=features.pixel_mask, **self._stage_kwargs())
            attention = stages[-1][0]
        else:
            attention, _ = region_stage(features.words, features.pixels, self.similarity_scale(), 1.0, "none",
                                        with_regions=False, pixel_mask=features.pixel_mask)
        return attention, self.word_weights(features.words, features.word_mask)


class _SingleStageAlignment(nn.Module):
    """A local objective of one term and no stages: `loss(features)` and `grounding_maps(features)`; `forward`
    reports both as PLAN's module does."""

    def forward(self, features) -> LocalAlignmentOutput:
        loss = self.loss(features)
        attention, weights = self.grounding_maps(features)
        return LocalAlignmentOutput(loss=loss, stage_losses=loss.unsqueeze(0), regions_attention=attention,
                                    word_weights=weights)


class GloriaLocalAlignment(_SingleStageAlignment):
    """GLoRIA's local objective (§6; `losses_plan.gloria_local_loss`): each word's attention-weighted context on
    every image of the batch, log-sum-exp of the word-context cosines as the report-image score, InfoNCE both ways.
    No parameters; `chunk_size` / `checkpoint_chunks` are compute knobs as PLAN's."""

    def __init__(self, config):
        super().__init__()
        self.chunk_size = 16
        self.checkpoint_chunks = False

    def loss(self, features) -> torch.Tensor:
        return gloria_local_loss(features.words, features.word_mask, features.pixels, features.pixel_mask,
                                 chunk_size=self.chunk_size, checkpoint_chunks=self.checkpoint_chunks)

    def grounding_maps(self, features, regions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(each word's attention over its own image (B, M, N), uniform word weights (B, M)); the attention is also
        what the loss reads, so `regions` changes nothing."""
        attention = gloria_word_attention(features.words, features.word_mask, features.pixels, features.pixel_mask)
        return attention, word_weights(features.word_mask, None, 0.0)


class MgcaLocalAlignment(_SingleStageAlignment):
    """MGCA's token-level objective (§6; `losses_plan.mgca_token_loss`): within each pair, words against the visual
    outputs their attention reads and patches against the textual outputs theirs reads, the words weighted by the
    text tower's last-layer [CLS] attention (`features.word_weights`, from `PlanModel.encode`)."""

    def __init__(self, config):
        super().__init__()
        self.temperature = config.local_temperature

    def loss(self, features) -> torch.Tensor:
        return mgca_token_loss(features.words, features.word_mask, features.pixels, features.pixel_mask,
                               word_weights=features.word_weights, temperature=self.temperature)

    def grounding_maps(self, features, regions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(each word's attention over its own image (B, M, N), the [CLS]-attention word weights (B, M)); `regions`
        changes nothing (the loss reads the same attention)."""
        attention = mgca_word_attention(features.words, features.pixels, features.pixel_mask, self.temperature)
        weights = features.word_weights if features.word_weights is not None else word_weights(
            features.word_mask, None, 0.0)
        return attention, weights


def build_local_alignment(config) -> nn.Module:
    """The module of `config.local_objective`; PLAN's trains its gate only while the local loss is on."""
    if config.local_objective == "gloria":
        return GloriaLocalAlignment(config)
    if config.local_objective == "mgca":
        return MgcaLocalAlignment(config)
    return PlanLocalAlignment(config, trained=config.uses_local_alignment)


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
    """VPOE (§4): K learnable pathology queries attend to an image's projected pixel grid through a small
    transformer decoder; each output, projected and L2-normalised, is one visual pathology observation (V-POR).
    `loss` is PCMA: V-PORs against the report sentences' T-PORs across the batch.

    It reads the projected pixels p (B, N, d_local), the features PLAN's local alignment uses, so V-PORs and T-PORs
    live in the same local space and PCMA can run from cached features. No position embedding: the tower's features
    already carry position (CNN padding / ViT position embeddings), and this keeps any grid size valid.
    `chunk_size` (images per chunk of the report x image scores) is a compute knob set by the training arguments.
    """

    def __init__(self, config):
        super().__init__()
        dim = config.local_projection_dim
        self.queries = nn.Parameter(torch.zeros(config.pcma_num_queries, dim))
        self.decoder = _transformer_decoder(dim, config.pcma_decoder_layers, config.pcma_decoder_heads)
        self.projection = nn.Linear(dim, dim)
        self.temperature = config.pcma_temperature
        self.chunk_size = 64

    def forward(self, pixels: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (B, N, d); pixel_mask (B, N) bool, False on cells the queries must not attend to (padding)."""
        queries = self.queries.to(pixels.dtype).unsqueeze(0).expand(pixels.shape[0], -1, -1)  # (B, K, d)
        padding = None if pixel_mask is None else ~pixel_mask
        # queries self-attend, then cross-attend to the pixels, (B, K, d)
        observations = self.decoder(queries, pixels, memory_key_padding_mask=padding)
        return F.normalize(self.projection(observations), dim=-1)  # V-PORs, (B, K, d)

    def loss(self, pixels: torch.Tensor, pixel_mask: torch.Tensor | None, sentences: torch.Tensor,
             sentence_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PCMA: symmetric InfoNCE of each report's sentences against each image's V-PORs, positive = own image.
        Returns (loss, the V-PORs (B, K, d))."""
        observations = self(pixels, pixel_mask)  # (B, K, d)
        loss = pcma_contrastive_loss(observations, sentences, sentence_mask, self.temperature, self.chunk_size)
        return loss, observations


class PatchCorrelationPredictor(nn.Module):
    """Correlation exploration (§5): from the visible patches and the report, predict how each masked patch
    correlates with each visible one; `loss` draws a fresh random patch mask and scores the prediction.

    Masked patches' features are replaced by a learned mask token; fixed 2-D position embeddings tell the mask tokens
    apart. A transformer decoder self-attends over all patches and cross-attends to the report's words (plus a learned
    null word, so a report without content words still has a key). The prediction for masked patch m and visible
    patch v is cos(head(h_m), p_v) with p_v the visible patch's own feature, so the gradient reaches the vision tower
    through the visible patches (as decoder inputs and as keys) and never through the masked ones.
    """

    def __init__(self, config):
        super().__init__()
        dim = config.local_projection_dim
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.null_word = nn.Parameter(torch.zeros(dim))
        self.decoder = _transformer_decoder(dim, config.correlation_predictor_layers,
                                            config.correlation_predictor_heads)
        self.head = nn.Linear(dim, dim)
        self.mask_ratio = config.correlation_mask_ratio
        self.loss_type = config.correlation_loss_type
        self.temperature = config.correlation_temperature

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

    def loss(self, pixels: torch.Tensor, grid_size: tuple[int, int], words: torch.Tensor,
             word_mask: torch.Tensor) -> torch.Tensor:
        """The proxy task on a random patch mask: a fresh one from the global RNG in training, a fixed one in eval
        mode (a validation loss is then the same on every call, as the model's other outputs)."""
        batch, num_patches, _ = pixels.shape
        generator = None if self.training else torch.Generator(pixels.device).manual_seed(0)
        masked_index, visible_index = sample_patch_mask(batch, num_patches, self.mask_ratio, pixels.device,
                                                        generator)  # (B, N_m), (B, N_v)
        predicted = self(pixels, grid_size, words, word_mask, masked_index, visible_index)  # (B, N_m, N_v)
        target = correlation_target(pixels, masked_index, visible_index)  # (B, N_m, N_v), no gradient
        return correlation_prediction_loss(predicted, target, self.loss_type, self.temperature)


__all__ = [
    "GloriaLocalAlignment",
    "MgcaLocalAlignment",
    "PathologyObservationExtractor",
    "PatchCorrelationPredictor",
    "PixelUpdate",
    "PlanLocalAlignment",
    "build_local_alignment",
    "sincos_position_embedding",
]
