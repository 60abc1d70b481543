"""The objectives of docs/method.md: global InfoNCE with cross-process negatives, PLAN's progressive word-pixel local
alignment with noise suppression, and PLACE's pathology-level (PCMA) and correlation terms.

Shapes use the notation of docs/method.md: B pairs, M words, N pixels (h*w), d the shared dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint


# --------------------------------------------------------------------------------------------------------------------
# Distribution helpers
# --------------------------------------------------------------------------------------------------------------------
def distributed_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0, keeping the autograd graph.

    The backward of torch.distributed.nn's all_gather sums each rank's gradient for this rank's slice, so with DDP's
    gradient averaging the parameter gradients equal those of the single-process loss on the concatenated batch.
    """
    _, world = distributed_world()
    if world == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def fp32(x: torch.Tensor) -> torch.Tensor:
    """Logits and softmaxes in at least fp32, whatever the autocast dtype (bf16 / fp16 logits lose the ranking)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def symmetric_infonce(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of the two directions' cross-entropies; logits_a: (B_local, B_global) rows of side a against all of b."""
    return 0.5 * (F.cross_entropy(fp32(logits_a), labels) + F.cross_entropy(fp32(logits_b), labels))


def global_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE between v (B, d) and t (B, d), negatives gathered from every process (docs/method.md §1).

    Each rank scores its own rows against all columns (labels offset by rank * B), in fp32.
    """
    rank, _ = distributed_world()
    all_images = gather_with_grad(image_embeds)  # (W*B, d)
    all_texts = gather_with_grad(text_embeds)  # (W*B, d)
    scale = fp32(logit_scale)
    logits_per_image = scale * fp32(image_embeds) @ fp32(all_texts).t()  # (B, W*B)
    logits_per_text = scale * fp32(text_embeds) @ fp32(all_images).t()  # (B, W*B)
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + rank * image_embeds.shape[0]
    return symmetric_infonce(logits_per_image, logits_per_text, labels)


# --------------------------------------------------------------------------------------------------------------------
# Pooling tokens into words / sentences
# --------------------------------------------------------------------------------------------------------------------
def pool_by_ids(features: torch.Tensor, ids: torch.Tensor, num_groups: int | None = None):
    """Average token features that share an id: (B, L, D) with ids (B, L) in {-1, 0..G-1} -> (B, G, D), mask (B, G).

    Id -1 marks tokens that belong to no group (special tokens, padding, filtered words).
    """
    if num_groups is None:
        num_groups = int(ids.max().item()) + 1 if ids.numel() else 0
    num_groups = max(num_groups, 1)
    one_hot = (ids.unsqueeze(-1) == torch.arange(num_groups, device=ids.device)).to(features.dtype)  # (B, L, G)
    counts = one_hot.sum(dim=1)  # (B, G)
    pooled = torch.einsum("blg,bld->bgd", one_hot, features) / counts.clamp(min=1).unsqueeze(-1)  # (B, G, D)
    return pooled, counts > 0


# --------------------------------------------------------------------------------------------------------------------
# PLAN: one stage of word-pixel soft regions (docs/method.md §2.1-2.5)
# --------------------------------------------------------------------------------------------------------------------
def sparsemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax (Martins & Astudillo, 2016): the Euclidean projection onto the simplex; exact zeros, sums to 1."""
    z_sorted, _ = logits.sort(dim=dim, descending=True)
    cumulative = z_sorted.cumsum(dim)
    shape = [1] * logits.dim()
    shape[dim] = -1
    k = torch.arange(1, logits.shape[dim] + 1, device=logits.device, dtype=logits.dtype).view(shape)
    support_size = (1 + k * z_sorted > cumulative).sum(dim=dim, keepdim=True)  # >= 1 always
    tau = (cumulative.gather(dim, support_size - 1) - 1) / support_size.to(logits.dtype)
    return torch.clamp(logits - tau, min=0)


def soft_regions(similarity: torch.Tensor, keep_ratio: float, method: str) -> torch.Tensor:
    """A'_m: each word's soft region over the pixels, with pixel-side noise suppression. (..., M, N) -> (..., M, N).

    "top_mass" keeps, per word, the highest-weight pixels that together hold `keep_ratio` of its softmax mass (the
    pixel that crosses the line included) and renormalises; gradients flow through the kept weights.
    """
    if method == "sparsemax":
        return sparsemax(fp32(similarity), dim=-1)
    attention = fp32(similarity).softmax(dim=-1)  # A_m, (..., M, N)
    if method == "none" or keep_ratio >= 1.0:
        return attention
    with torch.no_grad():
        sorted_weights, order = attention.sort(dim=-1, descending=True)
        mass_before = sorted_weights.cumsum(dim=-1) - sorted_weights  # mass of the strictly heavier pixels
        keep_sorted = mass_before < keep_ratio
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    kept = attention * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def region_stage(
    words: torch.Tensor,
    pixels: torch.Tensor,
    similarity_scale: torch.Tensor,
    keep_ratio: float,
    method: str,
    prior: torch.Tensor | None = None,
    prior_weight: float = 1.0,
    prior_epsilon: float = 1e-6,
    cosine: torch.Tensor | None = None,
    with_regions: bool = True,
    pixel_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One PLAN stage. words (..., M, d), pixels (..., N, d), both L2-normalised; leading dims broadcast.

    S = w.p / tau_s (+ lambda_prior * log(A'_prev + eps)), A' = sparsified softmax_n(S), r_m = normalise(sum_n A'_mn p_n).
    cosine: w.p (..., M, N) when the caller already has it (it is the same at every stage unless the pixels change).
    pixel_mask: (..., N) bool, False for pixels no word may attend to (the padding around the image); broadcast like
    the pixels. Masked pixels get exactly zero weight in A', as if they were not there.
    Returns (A' (..., M, N), regions r (..., M, d), or None when not `with_regions`).
    """
    if cosine is None:
        cosine = words @ pixels.transpose(-1, -2)  # w.p, (..., M, N)
    similarity = similarity_scale * cosine  # S, (..., M, N)
    if prior is not None:
        similarity = similarity + prior_weight * torch.log(prior + prior_epsilon)
    if pixel_mask is not None:
        # A finite stand-in for -inf: exp underflows to exactly 0 in fp32/bf16, and no inf - inf can appear.
        similarity = similarity.masked_fill(~pixel_mask.unsqueeze(-2), MASKED_LOGIT)
    regions_attention = soft_regions(similarity, keep_ratio, method)  # A', (..., M, N)
    if not with_regions:
        return regions_attention, None
    regions = F.normalize(regions_attention.to(pixels.dtype) @ pixels, dim=-1)  # r, (..., M, d)
    return regions_attention, regions


MASKED_LOGIT = -1.0e4  # far below any real logit (|S| <= 100 + |lambda_prior log eps|)


@dataclass
class StageSchedule:
    """Per-stage settings of the progressive refinement (docs/method.md §3): tau_t = tau_0 gamma^t, keep_t = keep_0 kappa^t."""

    temperatures: list[float]
    keep_ratios: list[float]
    loss_weights: list[float]

    @classmethod
    def from_config(cls, config) -> "StageSchedule":
        stages = range(config.local_num_stages)
        return cls(
            temperatures=[config.local_temperature * config.local_temperature_decay**t for t in stages],
            keep_ratios=[config.local_region_keep_ratio * config.local_keep_ratio_decay**t for t in stages],
            loss_weights=config.resolved_stage_loss_weights,
        )


def progressive_regions(
    words: torch.Tensor,
    pixels: torch.Tensor,
    similarity_scale: torch.Tensor,
    schedule: StageSchedule,
    method: str,
    prior_weight: float,
    prior_epsilon: float,
    pixel_update: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    cosine: torch.Tensor | None = None,
    with_regions: bool = True,
    pixel_mask: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The T stages: each refines the previous stage's region (prior carry), with a sharper keep ratio.

    pixel_update(pixels, regions_attention, words) -> pixels is the optional text-aware pixel update.
    cosine: w.p (..., M, N) if the caller has it (only without pixel_update). with_regions=False skips r_t.
    pixel_mask: (..., N) bool, pixels that take part (see `region_stage`).
    Returns [(A'_t, r_t)] for t = 0..T-1.
    """
    if pixel_update is None and cosine is None:
        cosine = words @ pixels.transpose(-1, -2)  # w.p, (..., M, N): the same at every stage
    outputs = []
    prior = None
    for keep_ratio in schedule.keep_ratios:
        attention, regions = region_stage(
            words, pixels, similarity_scale, keep_ratio, method, prior, prior_weight, prior_epsilon,
            cosine=cosine if pixel_update is None else None, with_regions=with_regions, pixel_mask=pixel_mask,
        )
        outputs.append((attention, regions))
        prior = attention
        if pixel_update is not None:
            pixels = pixel_update(pixels, attention, words)
    return outputs


# --------------------------------------------------------------------------------------------------------------------
# PLAN: word weights and the two local contrastive terms (docs/method.md §2.4, §2.6)
# --------------------------------------------------------------------------------------------------------------------
def word_weights(word_mask: torch.Tensor, gate: torch.Tensor | None, floor: float) -> torch.Tensor:
    """omega (B, M): uniform over valid words, or floor/M + (1 - floor) * g / sum(g) with the diagnostic gate g.

    The normalisation fixes the weights' sum; the uniform floor keeps the gate from collapsing onto a single word.
    """
    mask = word_mask.to(torch.float32)
    uniform = mask / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    if gate is None:
        return uniform
    gated = fp32(gate) * mask
    gated = gated / gated.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return floor * uniform + (1 - floor) * gated


def word_region_infonce(
    words: torch.Tensor, regions: torch.Tensor, weights: torch.Tensor, word_mask: torch.Tensor, temperature: float,
    word_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Within each pair, word m must match its own region r_m rather than the other words' regions (and vice versa).

    words, regions (B, M, d); weights omega (B, M). word_groups (B, M) long, optional: words of one group (e.g. one
    sentence, one finding) describe one region, so they are not each other's negatives; only other groups' words
    are. Returns the mean over pairs that have at least one word.
    """
    logits = (fp32(words) @ fp32(regions).transpose(-1, -2)) / temperature  # (B, M_words, M_regions)
    invalid = ~word_mask.unsqueeze(1)  # (B, 1, M): columns of padded words
    if word_groups is not None:
        same_group = word_groups.unsqueeze(2) == word_groups.unsqueeze(1)  # (B, M, M)
        not_self = ~torch.eye(words.shape[1], dtype=torch.bool, device=words.device)
        invalid = invalid | (same_group & not_self)  # symmetric, so it serves both directions
    very_negative = torch.finfo(logits.dtype).min
    word_to_region = logits.masked_fill(invalid, very_negative).log_softmax(dim=-1).diagonal(dim1=-2, dim2=-1)
    region_to_word = (
        logits.transpose(-1, -2).masked_fill(invalid, very_negative).log_softmax(dim=-1).diagonal(dim1=-2, dim2=-1)
    )  # (B, M)
    per_word = torch.where(word_mask, -0.5 * (word_to_region + region_to_word), 0.0)  # (B, M); padded words -> 0
    per_pair = (weights * per_word).sum(dim=-1)  # (B,)
    has_words = word_mask.any(dim=-1)
    return per_pair[has_words].sum() / has_words.sum().clamp(min=1)


def local_match_scores(words: torch.Tensor, regions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """s_ij = sum_m omega_m^(i) cos(w_m^(i), r_m^(i->j)). words (B, 1, M, d), regions (B, J, M, d) -> (B, J)."""
    cosine = (fp32(words) * fp32(regions)).sum(dim=-1)  # (B, J, M)
    return (cosine * weights.unsqueeze(1)).sum(dim=-1)


def region_match_scores(
    attention: torch.Tensor, cosine: torch.Tensor, gram: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """`local_match_scores` from the soft regions alone, the regions r^(i->j) never materialised.

    attention A' and cosine w.p (B, J, M, N) of report i on image j; gram G = p p^T of each image j (J, N, N);
    weights omega (B, M) -> (B, J). With u_m = sum_n A'_mn p_n and r_m = u_m / |u_m|:
    w_m . u_m = sum_n A'_mn (w_m . p_n) and |u_m|^2 = A'_m G A'_m^T, so every tensor is (B, J, M, N), none is
    (B, J, M, d) (the trick of pcma_match_scores).
    """
    attention, cosine = fp32(attention), fp32(cosine)
    dot = (attention * cosine).sum(dim=-1)  # w_m . u_m, (B, J, M)
    norm_sq = (torch.einsum("ijmn,jnk->ijmk", attention, fp32(gram)) * attention).sum(dim=-1)  # |u_m|^2, (B, J, M)
    cosine_to_region = dot / norm_sq.clamp(min=1e-24).sqrt()  # as F.normalize: u / max(|u|, 1e-12)
    return (cosine_to_region * weights.unsqueeze(1)).sum(dim=-1)


def _cross_sample_chunk(
    words: torch.Tensor, chunk_pixels: torch.Tensor, first_image: int, weights: torch.Tensor, regions_kwargs: dict,
    chunk_mask: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Every report i against the chunk's J images j, every stage: ([s_ij (B, J)], [A' (J, M, N)], [r (J, M, d)]),
    the last two of the chunk's own pairs i == j (reports first_image .. first_image + J - 1).
    chunk_mask: the chunk images' pixel masks (J, N)."""
    num_images, num_pixels, dim = chunk_pixels.shape
    regions_kwargs = {**regions_kwargs, "pixel_mask": None if chunk_mask is None else chunk_mask.unsqueeze(0)}
    own = (torch.arange(first_image, first_image + num_images, device=words.device),
           torch.arange(num_images, device=words.device))  # (report, image) indices of the pairs i == j
    scores, own_attention, own_regions = [], [], []
    if regions_kwargs["pixel_update"] is not None or num_pixels > dim:
        # The pixels differ per (report, image) pair after a text-aware update, and with N > d the Gram matrix of
        # region_match_scores costs more FLOPs than the regions: materialise r^(i->j), (B, J, M, d).
        stages = progressive_regions(words.unsqueeze(1), chunk_pixels.unsqueeze(0), **regions_kwargs)
        for attention, regions in stages:  # (B, J, M, N), (B, J, M, d)
            scores.append(local_match_scores(words.unsqueeze(1), regions, weights))
            own_attention.append(attention[own])
            own_regions.append(regions[own])
        return scores, own_attention, own_regions
    # One GEMM for w.p, shared by the stages; no broadcast copies of words or pixels (a batched matmul makes them).
    cosine = torch.einsum("imd,jnd->ijmn", words, chunk_pixels).contiguous()  # (B, J, M, N)
    gram = chunk_pixels @ chunk_pixels.transpose(-1, -2)  # (J, N, N)
    stages = progressive_regions(words.unsqueeze(1), chunk_pixels.unsqueeze(0), cosine=cosine, with_regions=False,
                                 **regions_kwargs)
    for attention, _ in stages:
        scores.append(region_match_scores(attention, cosine, gram, weights))
        own_attention.append(attention[own])  # (J, M, N)
        own_regions.append(F.normalize(own_attention[-1].to(chunk_pixels.dtype) @ chunk_pixels, dim=-1))  # (J, M, d)
    return scores, own_attention, own_regions


@dataclass
class LocalAlignmentOutput:
    loss: torch.Tensor  # sum_t alpha_t L_local^t
    stage_losses: torch.Tensor  # (T,)
    regions_attention: torch.Tensor  # last stage's A' of each pair (report i on its own image i), (B, M, N)
    word_weights: torch.Tensor  # omega, (B, M)


def plan_local_loss(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    pixels: torch.Tensor,
    similarity_scale: torch.Tensor,
    schedule: StageSchedule,
    weights: torch.Tensor,
    method: str = "top_mass",
    prior_weight: float = 1.0,
    prior_epsilon: float = 1e-6,
    cross_sample: bool = True,
    chunk_size: int = 16,
    pixel_update: Callable | None = None,
    checkpoint_chunks: bool = False,
    pixel_mask: torch.Tensor | None = None,
    within_pair: bool = True,
    word_groups: torch.Tensor | None = None,
) -> LocalAlignmentOutput:
    """PLAN's progressive local alignment loss (docs/method.md §2-3), vectorised over the batch.

    words (B, M, d) and pixels (B, N, d) are L2-normalised; word_mask (B, M); weights omega (B, M).
    Without the cross-sample term only the B own pairs are computed. With it, reports are run against chunks of
    `chunk_size` images (O(B * chunk * M * N) tensors per chunk); the own pairs are read off the diagonal.
    Autograd keeps every chunk's tensors for the backward, so training memory still grows as B^2 unless
    `checkpoint_chunks`: each chunk is then recomputed in the backward (same values and gradients, one more forward
    of the cross-sample term) and only its (B, J) scores and own pairs are kept.
    pixel_mask: (B, N) bool, False on pixels of image j that no word may attend to (padding); None: all take part.
    within_pair: include the word <-> own-region term inside each pair (at least one of the two terms is needed).
    word_groups: (B, M) group of each word for that term (see `word_region_infonce`); None: every other word of the
    report is a negative.
    """
    if not (within_pair or cross_sample):
        raise ValueError("plan_local_loss needs within_pair or cross_sample (or both)")
    batch = words.shape[0]
    num_stages = len(schedule.keep_ratios)
    regions_kwargs = dict(
        similarity_scale=similarity_scale, schedule=schedule, method=method, prior_weight=prior_weight,
        prior_epsilon=prior_epsilon, pixel_update=pixel_update,
    )
    if not cross_sample:
        own_stages = progressive_regions(words, pixels, pixel_mask=pixel_mask, **regions_kwargs)  # [(A', r)]
        scores = None
    else:
        chunks = []
        for start in range(0, batch, chunk_size):
            chunk_mask = None if pixel_mask is None else pixel_mask[start:start + chunk_size]
            chunk = (words, pixels[start:start + chunk_size], start, weights, regions_kwargs, chunk_mask)
            if checkpoint_chunks and torch.is_grad_enabled():
                chunks.append(torch.utils.checkpoint.checkpoint(_cross_sample_chunk, *chunk, use_reentrant=False))
            else:
                chunks.append(_cross_sample_chunk(*chunk))
        scores = [torch.cat([c[0][t] for c in chunks], dim=1) for t in range(num_stages)]  # T x (B reports, B imgs)
        own_stages = [(torch.cat([c[1][t] for c in chunks]), torch.cat([c[2][t] for c in chunks]))
                      for t in range(num_stages)]  # T x (A' (B, M, N), r (B, M, d))

    labels = torch.arange(batch, device=words.device)
    stage_losses = []
    for t, (_, regions) in enumerate(own_stages):
        loss_t = (word_region_infonce(words, regions, weights, word_mask, schedule.temperatures[t], word_groups)
                  if within_pair
                  else regions.new_zeros((), dtype=torch.float32))
        if scores is not None:
            logits = scores[t] / schedule.temperatures[t]  # (B reports, B images)
            loss_t = loss_t + symmetric_infonce(logits, logits.t(), labels)
        stage_losses.append(loss_t)
    stage_losses = torch.stack(stage_losses)
    alphas = torch.tensor(schedule.loss_weights, device=stage_losses.device, dtype=stage_losses.dtype)
    return LocalAlignmentOutput(
        loss=(alphas * stage_losses).sum(),
        stage_losses=stage_losses,
        regions_attention=own_stages[-1][0],
        word_weights=weights,
    )


# --------------------------------------------------------------------------------------------------------------------
# PLACE: pathology-level cross-modal alignment (docs/method.md §4)
# --------------------------------------------------------------------------------------------------------------------
def gather_padded_with_grad(tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """`gather_with_grad` for tensors whose size along `dim` differs between processes (e.g. sentences per report):
    each is padded to the largest size first. Callers gather a mask the same way so padded slots stay masked."""
    _, world = distributed_world()
    if world == 1:
        return tensor
    size = torch.tensor([tensor.shape[dim]], device=tensor.device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    padding = [0, 0] * (tensor.dim() - 1 - dim) + [0, int(size.item()) - tensor.shape[dim]]
    return gather_with_grad(F.pad(tensor, padding))


def pcma_match_scores(
    sentences: torch.Tensor,
    sentence_mask: torch.Tensor,
    observations: torch.Tensor,
    temperature: float,
    chunk_size: int = 64,
) -> torch.Tensor:
    """score_ij = mean over report i's valid sentences s of cos(T-POR_s, o_s^(i->j)), where
    o_s^(i->j) = sum_k softmax_k(T-POR_s . V-POR_k^(j) / tau) V-POR_k^(j) is the observation of image j it matches.

    sentences (I, S, d) and observations (J, K, d) are L2-normalised; sentence_mask (I, S). Returns (I, J).
    The matched observation is never materialised (it would be (I, J, S, d)): with a_s the attention and
    G = V V^T the (K, K) Gram matrix of image j's observations, T_s . o_s = sum_k a_sk (T_s . V_k) and
    |o_s|^2 = a_s G a_s, so every tensor is (I, J_chunk, S, K), independent of d.
    """
    sentences, observations = fp32(sentences), fp32(observations)
    mask = sentence_mask.to(sentences.dtype)  # (I, S)
    counts = mask.sum(dim=-1).clamp(min=1)  # (I,)
    chunks = []
    for start in range(0, observations.shape[0], chunk_size):
        chunk = observations[start:start + chunk_size]  # (J_c, K, d)
        cosines = torch.einsum("isd,jkd->ijsk", sentences, chunk)  # T_s . V_k, (I, J_c, S, K)
        attention = (cosines / temperature).softmax(dim=-1)  # a_sk, (I, J_c, S, K)
        dot = (attention * cosines).sum(dim=-1)  # T_s . o_s, (I, J_c, S)
        gram = chunk @ chunk.transpose(-1, -2)  # G, (J_c, K, K)
        norm_sq = (torch.einsum("ijsk,jkl->ijsl", attention, gram) * attention).sum(dim=-1)  # |o_s|^2, (I, J_c, S)
        matched_cosine = dot / norm_sq.clamp(min=1e-24).sqrt()  # (I, J_c, S)
        chunks.append((matched_cosine * mask.unsqueeze(1)).sum(dim=-1) / counts.unsqueeze(1))  # (I, J_c)
    return torch.cat(chunks, dim=1)


def pcma_contrastive_loss(
    observations: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: torch.Tensor,
    temperature: float,
    chunk_size: int = 64,
) -> torch.Tensor:
    """PCMA: symmetric InfoNCE over the batch on the pathology-level matching scores, positive = own image.

    observations: V-PORs (B, K, d); sentences: T-PORs (B, S, d); sentence_mask (B, S). As the global loss, negatives
    come from every process: each rank scores its own reports (images) against all images (reports), labels offset
    by rank * B. Reports without a sentence score 0 against every image.
    """
    rank, world = distributed_world()
    all_observations = gather_with_grad(observations)  # (W*B, K, d)
    logits_per_text = pcma_match_scores(sentences, sentence_mask, all_observations, temperature, chunk_size)
    logits_per_text = logits_per_text / temperature  # (B reports, W*B images)
    if world == 1:
        logits_per_image = logits_per_text.t()
    else:
        all_sentences = gather_padded_with_grad(sentences)  # (W*B, S_max, d)
        all_masks = gather_padded_with_grad(sentence_mask.to(sentences.dtype)) > 0.5  # (W*B, S_max)
        logits_per_image = pcma_match_scores(all_sentences, all_masks, observations, temperature, chunk_size)
        logits_per_image = logits_per_image.t() / temperature  # (B images, W*B reports)
    labels = torch.arange(observations.shape[0], device=observations.device) + rank * observations.shape[0]
    return symmetric_infonce(logits_per_image, logits_per_text, labels)


# --------------------------------------------------------------------------------------------------------------------
# PLACE: correlation exploration among image patches (docs/method.md §5)
# --------------------------------------------------------------------------------------------------------------------
def sample_patch_mask(
    batch: int, num_patches: int, ratio: float, device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask round(ratio * N) patches of each image (at least 1, at most N - 1), uniformly at random.

    Draws from `generator`, or from the global RNG (deterministic under `torch.manual_seed`, fresh every step).
    Returns (masked_index (B, N_m), visible_index (B, N - N_m)), each sorted.
    """
    if num_patches < 2:
        raise ValueError(f"correlation exploration needs a pixel grid of at least 2 patches, got {num_patches}")
    num_masked = min(max(round(ratio * num_patches), 1), num_patches - 1)
    order = torch.rand(batch, num_patches, device=device, generator=generator).argsort(dim=1)  # (B, N)
    return order[:, :num_masked].sort(dim=1).values, order[:, num_masked:].sort(dim=1).values


def take_patches(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """features (B, N, d), index (B, n) -> (B, n, d)."""
    return features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


@torch.no_grad()
def correlation_target(pixels: torch.Tensor, masked_index: torch.Tensor, visible_index: torch.Tensor) -> torch.Tensor:
    """The target: cosine of each masked patch with each visible patch of the un-masked image, gradients stopped.

    pixels (B, N, d) L2-normalised -> (B, N_m, N_v).
    """
    pixels = fp32(pixels.detach())
    return take_patches(pixels, masked_index) @ take_patches(pixels, visible_index).transpose(-1, -2)


def correlation_prediction_loss(
    predicted: torch.Tensor, target: torch.Tensor, loss_type: str = "kl", temperature: float = 0.1
) -> torch.Tensor:
    """Loss between predicted and target correlation rows (B, N_m, N_v), averaged over the masked patches.

    "kl": KL(softmax(target / tau) || softmax(predicted / tau)) per row, the target as the teacher distribution (the
    gradient is that of a cross-entropy with soft targets). "mse": mean squared error of the raw cosines.
    """
    predicted, target = fp32(predicted), fp32(target)
    if loss_type == "mse":
        return (predicted - target).pow(2).mean()
    if loss_type != "kl":
        raise ValueError(f"correlation loss_type must be 'kl' or 'mse', got {loss_type!r}")
    log_p = (predicted / temperature).log_softmax(dim=-1)  # (B, N_m, N_v)
    log_q = (target / temperature).log_softmax(dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1).mean()


# --------------------------------------------------------------------------------------------------------------------
# Reference local objectives: GLoRIA and MGCA's token level (METHOD.md §6)
# --------------------------------------------------------------------------------------------------------------------
def _gloria_attention(
    similarity: torch.Tensor, word_mask: torch.Tensor, pixel_mask: torch.Tensor | None, temp_attention: float
) -> torch.Tensor:
    """a_mn = softmax_n(temp_attention * softmax_m(s_mn)) from s = w.p (..., M, N); masks (..., M), (..., N)."""
    similarity = fp32(similarity).masked_fill(~word_mask.unsqueeze(-1), MASKED_LOGIT)
    over_words = similarity.softmax(dim=-2)  # each region's distribution over the report's words, (..., M, N)
    logits = temp_attention * over_words
    if pixel_mask is not None:
        logits = logits.masked_fill(~pixel_mask.unsqueeze(-2), MASKED_LOGIT)
    return logits.softmax(dim=-1)  # each word's attention over the regions, (..., M, N)


def gloria_word_attention(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    pixels: torch.Tensor,
    pixel_mask: torch.Tensor | None = None,
    temp_attention: float = 4.0,
) -> torch.Tensor:
    """GLoRIA's attention of each word over its own image's regions: words (B, M, d), pixels (B, N, d) -> (B, M, N).

    The word mask is needed, not only the pixel mask: the first softmax runs over the report's words, so each word's
    map depends on the other (valid) words. Rows sum to 1 over the valid pixels; masked pixels get exactly 0.
    """
    similarity = fp32(words) @ fp32(pixels).transpose(-1, -2)  # w.p, (B, M, N)
    return _gloria_attention(similarity, word_mask, pixel_mask, temp_attention)


def _gloria_score_chunk(
    words: torch.Tensor, word_mask: torch.Tensor, pixels: torch.Tensor, pixel_mask: torch.Tensor | None,
    temp_attention: float, temp_word: float,
) -> torch.Tensor:
    """score_ij = log sum_m exp(temp_word * cos(w_m^(i), c_m^(i->j))) over report i's valid words.

    words (I, M, d), word_mask (I, M), pixels (J, N, d), pixel_mask (J, N) -> (I, J); reports without words score 0.
    """
    words, pixels = fp32(words), fp32(pixels)
    similarity = torch.einsum("imd,jnd->ijmn", words, pixels)  # w.p, (I, J, M, N)
    attention = _gloria_attention(similarity, word_mask.unsqueeze(1),
                                  None if pixel_mask is None else pixel_mask.unsqueeze(0), temp_attention)
    context = torch.einsum("ijmn,jnd->ijmd", attention, pixels)  # c_m, (I, J, M, d)
    dot = torch.einsum("imd,ijmd->ijm", words, context)  # (I, J, M)
    # GLoRIA's cosine: w.c / max(|w| |c|, 1e-8); the words need not be unit vectors (GLoRIA feeds raw features).
    cosine = dot / (words.norm(dim=-1).unsqueeze(1) * context.norm(dim=-1)).clamp(min=1e-8)  # (I, J, M)
    exponents = (temp_word * cosine).masked_fill(~word_mask.unsqueeze(1), MASKED_LOGIT)  # finite: no NaN gradient
    scores = exponents.logsumexp(dim=-1)  # (I, J)
    return torch.where(word_mask.any(dim=-1).unsqueeze(1), scores, 0.0)


def gloria_scores(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    pixels: torch.Tensor,
    pixel_mask: torch.Tensor | None = None,
    temp_attention: float = 4.0,
    temp_word: float = 5.0,
    chunk_size: int | None = None,
    checkpoint_chunks: bool = False,
) -> torch.Tensor:
    """GLoRIA's local image-report score of every report i against every image j: (I, M, d) x (J, N, d) -> (I, J).

    Images are taken `chunk_size` at a time (None: all at once): each chunk holds O(I * chunk * M * (N + d)) tensors.
    Autograd keeps every chunk's tensors for the backward unless `checkpoint_chunks` (each chunk recomputed in the
    backward; same values and gradients, only the (I, chunk) scores kept).
    """
    num_images = pixels.shape[0]
    chunk_size = num_images if chunk_size is None else max(int(chunk_size), 1)
    chunks = []
    for start in range(0, num_images, chunk_size):
        chunk = (words, word_mask, pixels[start:start + chunk_size],
                 None if pixel_mask is None else pixel_mask[start:start + chunk_size], temp_attention, temp_word)
        if checkpoint_chunks and torch.is_grad_enabled():
            chunks.append(torch.utils.checkpoint.checkpoint(_gloria_score_chunk, *chunk, use_reentrant=False))
        else:
            chunks.append(_gloria_score_chunk(*chunk))
    return torch.cat(chunks, dim=1)  # (I, J)


def gloria_local_loss(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    pixels: torch.Tensor,
    pixel_mask: torch.Tensor | None = None,
    temp_attention: float = 4.0,
    temp_word: float = 5.0,
    temp_logits: float = 10.0,
    chunk_size: int | None = None,
    checkpoint_chunks: bool = False,
) -> torch.Tensor:
    """GLoRIA's local loss (Huang et al., ICCV 2021; METHOD.md §6), vectorised over the batch.

    words (B, M, d) with word_mask (B, M); pixels (B, N, d) with pixel_mask (B, N) (False: a padding cell no word
    attends to; None: all take part). For report i and image j, with s_mn = w_m . p_n:

    - attention a_mn = softmax_n(temp_attention * softmax_m(s_mn)): first over the report's *words* for each region,
      then, scaled by 4, over the regions for each word. This is GLoRIA's released `attention_fn` (inherited from
      AttnGAN's DAMSM), the code behind its published numbers; the paper's text writes only the second softmax, on s
      itself. The first softmax's output lies in [0, 1], so a word's region logits span at most 4 (a ratio of
      e^4 ~ 55 between regions): the attention is soft by construction.
    - context c_m = sum_n a_mn p_n; R_m = cos(w_m, c_m), as GLoRIA's cosine (w.c / max(|w||c|, 1e-8)).
    - score_ij = log sum_m exp(temp_word * R_m) over report i's valid words, and logits = temp_logits * score. The
      paper writes the aggregate as (1/temp_word) log sum exp(...); its code (again DAMSM's) leaves out the 1/temp_word,
      and that is what we implement. The paper's form is this function with temp_logits = 10 / 5 = 2.
      Summing (not averaging) over the words adds log M_i to every score of report i: it cancels in the softmax over
      images but favours long reports in the softmax over reports, as in GLoRIA (whose code offers "mean" too).
    - cross-entropy in both directions over the batch, averaged (`symmetric_infonce`). GLoRIA sums the two, and its
      global loss's two: with this package's averaged global loss, local_loss_weight = 1 keeps GLoRIA's 1:1 ratio.

    Departures, all no-ops on GLoRIA's own inputs: padded words take no part (GLoRIA slices each report to its
    length); padding cells get zero attention (GLoRIA has none); a report without words scores 0 against every
    image. GLoRIA feeds raw (unnormalised) features; the model passes L2-normalised ones, so s is a cosine and the
    softmax over words is softer than GLoRIA's on raw 768-d dot products. Any scale works here.

    Negatives come from every process, as `global_contrastive_loss`: each rank scores its reports against all
    gathered images and its images against all gathered reports (words padded to the longest report, masked), labels
    offset by rank * B; with DDP's gradient averaging, loss and gradients equal the single-process ones on the
    concatenated batch (GLoRIA's own loss is per process). On W processes that is 2 * B * W*B pairs per rank.
    Cost: O(B^2 M N d) time; memory, see `gloria_scores`.
    """
    rank, world = distributed_world()
    score_kwargs = dict(temp_attention=temp_attention, temp_word=temp_word, chunk_size=chunk_size,
                        checkpoint_chunks=checkpoint_chunks)
    all_pixels = gather_with_grad(pixels)  # (W*B, N, d)
    all_pixel_mask = None if pixel_mask is None else gather_with_grad(pixel_mask.to(pixels.dtype)) > 0.5  # (W*B, N)
    logits_per_text = temp_logits * gloria_scores(words, word_mask, all_pixels, all_pixel_mask, **score_kwargs)
    if world == 1:
        logits_per_image = logits_per_text.t()  # (B images, B reports)
    else:
        all_words = gather_padded_with_grad(words)  # (W*B, M_max, d)
        all_word_mask = gather_padded_with_grad(word_mask.to(words.dtype)) > 0.5  # (W*B, M_max)
        logits_per_image = temp_logits * gloria_scores(all_words, all_word_mask, pixels, pixel_mask,
                                                       **score_kwargs).t()  # (B images, W*B reports)
    labels = torch.arange(words.shape[0], device=words.device) + rank * words.shape[0]
    return symmetric_infonce(logits_per_image, logits_per_text, labels)


def mgca_word_attention(
    words: torch.Tensor, pixels: torch.Tensor, pixel_mask: torch.Tensor | None = None, temperature: float = 0.1
) -> torch.Tensor:
    """MGCA's attention of each word over its own image's patches, softmax_n(w.p / temperature): (B, M, N)."""
    attention, _ = region_stage(words, pixels, 1.0 / temperature, 1.0, "none", with_regions=False,
                                pixel_mask=pixel_mask)
    return attention


def _uniform_weights(mask: torch.Tensor) -> torch.Tensor:
    """(B, K) bool -> (B, K) weights uniform over the valid entries (`mgca_token_loss`'s arguments shadow the name)."""
    return word_weights(mask, None, 0.0)


def mgca_token_loss(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    pixels: torch.Tensor,
    pixel_mask: torch.Tensor | None = None,
    word_weights: torch.Tensor | None = None,
    patch_weights: torch.Tensor | None = None,
    temperature: float = 0.1,
) -> torch.Tensor:
    """MGCA's token-level alignment (Wang et al., NeurIPS 2022; METHOD.md §6), within each pair, no negatives from
    other pairs. words (B, M, d), pixels (B, N, d) L2-normalised; masks (B, M), (B, N) (False: padding).

    Word term: each word attends to its image's patches, softmax_n(w_m . p_n / tau), and its attended visual output
    v_m is the normalised attention-weighted patch sum; the words of a report and their outputs are contrasted
    with each other (w_m . v_k / tau, both directions averaged, the positive k = m), each anchor weighted by
    word_weights (B, M) (`mgca_word_weights`; None: uniform over the report's words).
    Patch term: the same with the roles swapped (each patch attends to the report's words), weighted by
    patch_weights (B, N) (None: uniform over the valid patches, MGCA's choice for CNN towers; for a ViT MGCA uses
    the vision [CLS] attention clipped the same way, `mgca_word_weights` with patch ids).
    Returns word term + patch term, averaged over the pairs whose report has words (each term is per pair a
    weighted sum with weights that sum to 1, as MGCA's sum over anchors / batch size).

    Departures from MGCA's code: its within-sample softmax keeps the padded word slots as negatives (their attended
    output is the mean patch direction), so its loss depends on the padding length; here padded words and padding
    cells take no part at all. Its words include [SEP] and sum the word pieces' features; ours are the model's words.
    For a ViT it leaves the patch outputs unnormalised; here they always are. The prototype (cluster) term is not
    implemented. MGCA adds this loss with weight 1 to its global loss *summed* over the two directions: with this
    package's averaged global loss, local_loss_weight = 0.5 keeps MGCA's ratio.
    Cost: O(B M N d) time, O(B M N) memory.
    """
    if pixel_mask is None:
        pixel_mask = torch.ones(pixels.shape[:2], dtype=torch.bool, device=pixels.device)
    # Patches of a pair whose report has no words have nothing to attend to: that pair drops out of both terms.
    patch_mask = pixel_mask & word_mask.any(dim=-1, keepdim=True)  # (B, N)
    if word_weights is None:
        word_weights = _uniform_weights(word_mask)
    if patch_weights is None:
        patch_weights = _uniform_weights(patch_mask)
    scale = 1.0 / temperature
    _, visual_outputs = region_stage(words, pixels, scale, 1.0, "none", pixel_mask=pixel_mask)  # v_m, (B, M, d)
    # region_stage's pixel_mask masks whatever is attended to: here the padded words.
    _, textual_outputs = region_stage(pixels, words, scale, 1.0, "none", pixel_mask=word_mask)  # (B, N, d)
    loss_words = word_region_infonce(words, visual_outputs, word_weights, word_mask, temperature)
    loss_patches = word_region_infonce(pixels, textual_outputs, patch_weights, patch_mask, temperature)
    return loss_words + loss_patches


@torch.no_grad()
def mgca_word_weights(
    cls_attentions: torch.Tensor,
    word_ids: torch.Tensor,
    word_mask: torch.Tensor,
    low_quantile: float = 0.1,
    high_quantile: float = 0.9,
) -> torch.Tensor:
    """MGCA's word weights from the text tower's last-layer attention, no gradient: (B, M), summing to 1 per report.

    cls_attentions (B, heads, L, L): the [CLS] query's row, averaged over the heads; a word's weight is the sum over
    its tokens (word_ids (B, L), -1 for none, as MGCA sums its word pieces'); clipped to the report's
    low/high quantiles over its valid words (word_mask (B, M); linear interpolation, as torch.quantile) and
    renormalised over them. Reports without words get all zeros.
    The same call weights a ViT's patches from its [CLS] attention (ids 0..N-1 for the patch tokens, -1 for [CLS]).
    """
    cls_row = fp32(cls_attentions).mean(dim=1)[:, 0]  # [CLS] -> every token, (B, L)
    token_weights = torch.where(word_ids >= 0, cls_row, 0.0)
    summed = torch.zeros(word_mask.shape, dtype=cls_row.dtype, device=cls_row.device)
    summed.scatter_add_(1, word_ids.clamp(min=0), token_weights)  # (B, M)
    quantiles = torch.tensor([low_quantile, high_quantile], dtype=summed.dtype, device=summed.device)
    bounds = summed.masked_fill(~word_mask, float("nan")).nanquantile(quantiles, dim=-1)  # over valid words, (2, B)
    clipped = torch.where(word_mask, summed.clamp(min=bounds[0].unsqueeze(-1), max=bounds[1].unsqueeze(-1)), 0.0)
    return clipped / clipped.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(clipped.dtype).tiny)


__all__ = [
    "LocalAlignmentOutput",
    "StageSchedule",
    "correlation_prediction_loss",
    "correlation_target",
    "distributed_world",
    "gather_padded_with_grad",
    "gather_with_grad",
    "global_contrastive_loss",
    "gloria_local_loss",
    "gloria_scores",
    "gloria_word_attention",
    "local_match_scores",
    "mgca_token_loss",
    "mgca_word_attention",
    "mgca_word_weights",
    "pcma_contrastive_loss",
    "pcma_match_scores",
    "plan_local_loss",
    "pool_by_ids",
    "progressive_regions",
    "region_match_scores",
    "region_stage",
    "sample_patch_mask",
    "soft_regions",
    "sparsemax",
    "symmetric_infonce",
    "take_patches",
    "word_region_infonce",
    "word_weights",
]
