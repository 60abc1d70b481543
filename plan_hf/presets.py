"""Named objective presets (the ablation ladder of docs/method.md) and a plain-words account of what a config trains.

`PRESETS[name]` holds loss weights (and the local objective); every other field keeps its `PlanConfig` default unless
overridden.
The training entry points take `--preset`, the model card generator writes `objectives_of(config)`.
"""

from __future__ import annotations

from typing import Any

from .configuration_plan import PlanConfig

# Starting points, not tuned values. PCMA is an InfoNCE like the global term, so it gets the same weight; the
# correlation proxy task is auxiliary (its KL is of the order of the InfoNCE terms at initialisation), so half.
PRESETS: dict[str, dict[str, float | str | bool]] = {
    "global": {"global_loss_weight": 1.0, "local_loss_weight": 0.0, "pcma_loss_weight": 0.0,
               "correlation_loss_weight": 0.0},
    "plan": {"global_loss_weight": 1.0, "local_loss_weight": 1.0, "pcma_loss_weight": 0.0,
             "correlation_loss_weight": 0.0},
    "place": {"global_loss_weight": 1.0, "local_loss_weight": 0.0, "pcma_loss_weight": 1.0,
              "correlation_loss_weight": 0.5},
    "plan+place": {"global_loss_weight": 1.0, "local_loss_weight": 1.0, "pcma_loss_weight": 1.0,
                   "correlation_loss_weight": 0.5},
    # PLAN with its within-pair term, the reconstruction's default before the evidence of docs/method.md ("PLAN's
    # within-pair term"): the term puts each word of a finding on a spot of its own; kept for the ablations.
    "plan_within_pair": {"global_loss_weight": 1.0, "local_loss_weight": 1.0, "local_within_pair": True,
                         "pcma_loss_weight": 0.0, "correlation_loss_weight": 0.0},
    # The reference local objectives, at the global:local ratio of their papers (docs/method.md §6): GLoRIA's two
    # terms weigh 1:1; MGCA's token term is (word + patch), each averaged over two directions, hence 0.5.
    "gloria": {"global_loss_weight": 1.0, "local_objective": "gloria", "local_loss_weight": 1.0,
               "pcma_loss_weight": 0.0, "correlation_loss_weight": 0.0},
    "mgca": {"global_loss_weight": 1.0, "local_objective": "mgca", "local_loss_weight": 0.5,
             "pcma_loss_weight": 0.0, "correlation_loss_weight": 0.0},
}


def preset_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The PlanConfig keyword arguments of preset `name`, with `overrides` applied on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return {**PRESETS[name], **overrides}


def config_from_preset(name: str, **kwargs: Any) -> PlanConfig:
    """A PlanConfig for preset `name`; kwargs (text_config, vision_config, any field) override the preset."""
    return PlanConfig(**preset_kwargs(name, **kwargs))


def _weight(value: float) -> str:
    return f"{value:g}"


def _local_objective(config: PlanConfig) -> str:
    """The local objective in words, with the settings that change what it computes."""
    if config.local_objective == "gloria":
        return "GLoRIA word-region alignment (reference objective)"
    if config.local_objective == "mgca":
        return "MGCA token-level alignment (reference objective)"
    if config.local_region_sparsify == "top_mass":
        sparsify = (f"top-mass pixel sparsification (keep {config.local_region_keep_ratio:g}, "
                    f"x{config.local_keep_ratio_decay:g} per stage)")
    elif config.local_region_sparsify == "sparsemax":
        sparsify = "sparsemax pixel sparsification"
    else:
        sparsify = "no pixel sparsification"
    stages = config.local_num_stages
    parts = [
        f"{stages} progressive stage{'s' if stages > 1 else ''}",
        sparsify,
        "diagnostic word gate" if config.local_word_gate else "uniform word weights",
        "cross-sample term" if config.local_cross_sample else "no cross-sample term",
    ]
    if not config.local_within_pair:
        parts.append("no within-pair term")
    if not config.mask_padding:
        parts.append("padding not masked")
    if config.local_pixel_update:
        parts.append("text-aware pixel update")
    return f"PLAN word-pixel alignment, {', '.join(parts)}"


def objectives_of(config: PlanConfig) -> list[str]:
    """One line per objective the config trains with (weight > 0), in docs/method.md's order, with its settings.

    Each line starts with a stable key ("global", "plan_local", "pcma", "correlation") followed by a colon.
    """
    objectives = []
    if config.global_loss_weight > 0:
        objectives.append(f"global: image-report InfoNCE, weight {_weight(config.global_loss_weight)}")
    if config.uses_local_alignment:
        objectives.append(f"plan_local: {_local_objective(config)}, weight {_weight(config.local_loss_weight)}")
    if config.uses_pcma:
        objectives.append(
            f"pcma: PLACE pathology-level alignment, {config.pcma_num_queries} pathology queries, "
            f"{config.pcma_decoder_layers}-layer extractor, weight {_weight(config.pcma_loss_weight)}"
        )
    if config.uses_correlation:
        objectives.append(
            f"correlation: PLACE correlation exploration, {config.correlation_mask_ratio:.0%} of patches masked, "
            f"{config.correlation_loss_type.upper()} loss, weight {_weight(config.correlation_loss_weight)}"
        )
    return objectives


def objective_keys(config: PlanConfig) -> list[str]:
    """The stable keys of `objectives_of(config)`: a subset of ["global", "plan_local", "pcma", "correlation"]."""
    return [line.split(":", 1)[0] for line in objectives_of(config)]


__all__ = ["PRESETS", "config_from_preset", "objective_keys", "objectives_of", "preset_kwargs"]
