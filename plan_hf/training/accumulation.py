"""One optimizer step's gradients over k micro-batches with the negatives of the whole batch (GradCache /
open_clip's `accum_freq`).

A contrastive loss is not a sum over samples: accumulating k micro-batch losses would contrast each sample with
1/k of the negatives. Instead:

(a) encode every micro-batch without a graph, keeping the RNG state it started from;
(b) concatenate the features, make them leaves, compute the loss once and get d loss / d features (and the gradient
    of the parameters the loss uses directly: logit_scale, the word gate, ...);
(c) re-encode each micro-batch with a graph under its restored RNG state (so dropout draws the same masks) and
    backpropagate the surrogate sum_f <f, d loss / d f>, whose gradient is exactly the tower's share of the loss's.

The result equals one forward/backward over the concatenated batch (tests/test_accumulation.py), at the cost of a
second forward, with the memory of one micro-batch.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states


@dataclass
class StepResult:
    """The loss terms of one optimizer step (detached) and whether the loss was finite on every process.

    When it was not, the caller zeroes whatever gradients the step left and skips the update.
    """

    output: Any  # PlanOutput
    finite: bool


def split_batch(batch: Mapping[str, torch.Tensor], num_chunks: int) -> list[dict[str, torch.Tensor]]:
    """Split every tensor of `batch` into `num_chunks` equal micro-batches along dim 0."""
    size = next(iter(batch.values())).shape[0]
    if size % num_chunks:
        raise ValueError(f"a batch of {size} samples does not split into {num_chunks} equal micro-batches")
    step = size // num_chunks
    return [{key: value[i * step:(i + 1) * step] for key, value in batch.items()} for i in range(num_chunks)]


def all_processes_finite(accelerator, loss: torch.Tensor) -> bool:
    """True when the loss is finite on every process: all must skip together (the global loss's backward is a
    collective)."""
    flag = torch.isfinite(loss.detach().float()).all().to(dtype=torch.float32).reshape(1)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


class _RngState:
    """The CPU and device RNG states at a point, as torch.utils.checkpoint keeps them for its recomputation."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.cpu = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        set_device_states(self.devices, self.device_states)


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.detach().clone() for name, buffer in module.named_buffers()}


def _load_buffers(module: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(saved[name])


def _detach(output: Any) -> Any:
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            output[key] = value.detach()
    return output


def single_batch_step(accelerator, model: nn.Module, batch: Mapping[str, torch.Tensor],
                      local_loss_scale: float = 1.0) -> StepResult:
    """The plain step (k = 1): forward with the loss, backward. A non-finite loss is still backpropagated so that
    every process finishes DDP's gradient reduction; the caller zeroes those gradients and skips the update."""
    output = model(**batch, return_loss=True, local_loss_scale=local_loss_scale)
    finite = all_processes_finite(accelerator, output.loss)
    accelerator.backward(output.loss)
    return StepResult(output=_detach(output), finite=finite)


def cached_feature_step(accelerator, model: nn.Module, micro_batches: Sequence[Mapping[str, torch.Tensor]],
                        local_loss_scale: float = 1.0) -> StepResult:
    """Gradients of the loss of the concatenated micro-batches, accumulated into `.grad` (see the module docstring).

    `model` is the prepared (possibly DDP-wrapped) model: its forward with `return_features=True` gives PlanFeatures.
    DDP synchronises the gradients once, in the last micro-batch's backward. A non-finite loss (on any process) is
    detected before any backward: nothing reaches `.grad`, and buffers (BatchNorm statistics) are restored.
    """
    unwrapped = accelerator.unwrap_model(model)
    buffers_before = _buffers(unwrapped)

    # (a) features of every micro-batch, no graph
    rng_states, parts = [], []
    with torch.no_grad():
        for micro in micro_batches:
            rng_states.append(_RngState(list(micro.values())))
            parts.append(model(**micro, return_features=True))
    buffers_after_encoding = _buffers(unwrapped)
    features = type(parts[0]).concatenate(parts)

    # (b) the loss of the whole batch from leaf copies of the features (fp32: exact values, fp32 gradients)
    names = [name for name, value in features.tensors().items() if value.is_floating_point()]
    leaves = {name: getattr(features, name).detach().float().requires_grad_() for name in names}
    with accelerator.autocast():
        output = unwrapped.loss_from_features(dataclasses.replace(features, **leaves), local_loss_scale)
    if not all_processes_finite(accelerator, output.loss):
        _load_buffers(unwrapped, buffers_before)
        return StepResult(output=_detach(output), finite=False)
    parameters = [p for p in unwrapped.parameters() if p.requires_grad]
    grads = torch.autograd.grad(output.loss, [*leaves.values(), *parameters], allow_unused=True)
    feature_grads = dict(zip(names, grads[:len(names)]))
    # Parameters the loss uses directly; their gradient joins the last micro-batch's backward so DDP averages it.
    loss_side = [(p, g) for p, g in zip(parameters, grads[len(names):]) if g is not None]

    # (c) re-encode each micro-batch with a graph under its RNG state; backpropagate <features, their gradient>
    offset = 0
    for index, (micro, rng) in enumerate(zip(micro_batches, rng_states)):
        last = index == len(micro_batches) - 1
        rng.restore()
        with accelerator.no_sync(model) if not last else nullcontext():
            fresh = model(**micro, return_features=True)
            rows = fresh.image_embeds.shape[0]
            surrogate = torch.zeros((), device=fresh.image_embeds.device)
            for name, grad in feature_grads.items():
                value = getattr(fresh, name)
                # rows of this micro-batch; word axes were padded to the longest micro-batch
                grad = grad[(slice(offset, offset + rows), *(slice(0, s) for s in value.shape[1:]))]
                surrogate = surrogate + (value.float() * grad).sum()
            if last:
                for parameter, grad in loss_side:
                    surrogate = surrogate + (parameter * grad).sum()
            accelerator.backward(surrogate)
        offset += rows
    # BatchNorm statistics: each sample counted once (the re-encoding pass repeated (a)'s updates).
    _load_buffers(unwrapped, buffers_after_encoding)
    return StepResult(output=_detach(output), finite=True)


def check_accumulation_support(accelerator, accumulation_steps: int) -> None:
    """The cached-feature step calls the loss outside the wrapped model's forward: fine for DDP (parameters are
    whole on every process), not for FSDP / DeepSpeed ZeRO-3, whose loss-side parameters are sharded there."""
    kind = str(accelerator.distributed_type)
    if accumulation_steps > 1 and any(name in kind for name in ("FSDP", "DEEPSPEED", "MEGATRON")):
        raise ValueError(
            f"accumulation_steps={accumulation_steps} (cached-feature accumulation) is supported with DDP or a single "
            f"process, not with {kind}: use accumulation_steps=1 and reach the global batch with more processes"
        )


def contrastive_step(accelerator, model: nn.Module, batch: Mapping[str, torch.Tensor],
                     accumulation_steps: int, local_loss_scale: float = 1.0) -> StepResult:
    """Gradients for one optimizer step over `batch` (this process's share), split into `accumulation_steps`
    micro-batches whose features are cached so that every sample keeps the whole batch's negatives.
    local_loss_scale multiplies the local loss weight (the warm-up)."""
    if accumulation_steps == 1:
        return single_batch_step(accelerator, model, batch, local_loss_scale)
    return cached_feature_step(accelerator, model, split_batch(batch, accumulation_steps), local_loss_scale)


__all__ = [
    "StepResult",
    "all_processes_finite",
    "cached_feature_step",
    "check_accumulation_support",
    "contrastive_step",
    "single_batch_step",
    "split_batch",
]
