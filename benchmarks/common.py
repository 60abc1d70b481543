"""What the speed and memory benchmarks share: the tower presets and loss variants, a synthetic batch, one training
step, its timing, FLOP count and peak memory, the largest batch that fits, and the accelerators' bf16 peaks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from plan_hf import PlanConfig, PlanModel
from plan_hf.losses_plan import word_weights
from plan_hf.tiny import tiny_text_config, tiny_vision_config

PRESETS = {
    # (text config, vision config, image size, sequence length)
    "small": (tiny_text_config(vocab_size=1000, hidden_size=64, layers=2), tiny_vision_config("resnet", width=16), 128, 64),
    "base": (dict(model_type="bert"), dict(model_type="resnet"), 224, 128),  # ResNet-50 + BERT-base shapes
    "vit-base": (dict(model_type="bert"), dict(model_type="vit", image_size=224, patch_size=16), 224, 128),
}

VARIANTS = {
    "global-only": dict(local_loss_weight=0.0),
    "PLAN 1 stage": dict(local_num_stages=1),
    "PLAN 3 stages": dict(local_num_stages=3),
    "PLAN 3 stages, no cross-sample": dict(local_num_stages=3, local_cross_sample=False, local_within_pair=True),
}

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendor's data sheets, looked up by a substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
}


def peak_tflops_of(device_name: str) -> float | None:
    """The bf16 peak of the GPU called `device_name` (as CUDA names it), or None when the table does not know it."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def device_peak_tflops(device: torch.device) -> float | None:
    return peak_tflops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def make_batch(batch: int, seq_len: int, image_size: int, vocab: int, words: int, device,
               sentences: int = 4) -> dict:
    """Random token ids and pixels; `words` words of ~1.5 word pieces each, grouped into `sentences` sentences."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq_len), generator=g)
    word_ids = torch.full((batch, seq_len), -1)
    positions = torch.arange(1, min(seq_len - 1, words * 3 // 2 + 1))
    word_ids[:, positions] = ((positions - 1) * words // len(positions)).clamp(max=words - 1)  # ~1.5 pieces a word
    sentence_ids = torch.where(word_ids >= 0, word_ids * sentences // words, -1)  # consecutive words, -1 elsewhere
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long, device=device),
        "word_ids": word_ids.to(device),
        "sentence_ids": sentence_ids.to(device),
        # drawn where they are used: a CPU generator would spend seconds on a large accelerator batch
        "pixel_values": torch.randn(batch, 3, image_size, image_size, device=device,
                                    generator=g if torch.device(device).type == "cpu" else
                                    torch.Generator(device).manual_seed(0)),
    }


def local_inputs(batch: int, words: int, pixels: int, dim: int, dtype=torch.float32, device="cpu"):
    """Inputs of the PLAN local loss: unit words (B, M, d) and pixels (B, N, d) with gradients, half the reports
    padded to M/2 words, gated word weights omega (B, M), and the similarity scale."""
    g = torch.Generator().manual_seed(0)
    w = F.normalize(torch.randn(batch, words, dim, generator=g, dtype=dtype), dim=-1).to(device).requires_grad_()
    p = F.normalize(torch.randn(batch, pixels, dim, generator=g, dtype=dtype), dim=-1).to(device).requires_grad_()
    mask = torch.ones(batch, words, dtype=torch.bool)
    mask[::2, words // 2:] = False
    omega = word_weights(mask, torch.rand(batch, words, generator=g, dtype=dtype), 0.5)
    return w, mask.to(device), p, torch.tensor(10.0, dtype=dtype, device=device), omega.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Wall seconds of fn(), the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def build_models(text: dict, vision: dict, local_layer: int, projection_dim: int, device, variants=VARIANTS) -> dict:
    """One PlanModel per variant, all with the same towers' weights."""
    models = {}
    for name, overrides in variants.items():
        torch.manual_seed(0)
        config = PlanConfig(text_config=text, vision_config=vision, projection_dim=projection_dim,
                            local_vision_feature_layer=local_layer, **overrides)
        models[name] = PlanModel(config).to(device).train()
    reference = next(iter(models.values()))
    for model in models.values():
        model.load_state_dict(reference.state_dict(), strict=False)
    return models


def train_step(model, inputs: dict, autocast=None, optimizer: torch.optim.Optimizer | None = None) -> Callable[[], None]:
    """One forward (under `autocast`) + backward (+ optimizer step when given); the gradients are dropped after."""
    def run():
        with autocast or nullcontext():
            loss = model(**inputs).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return run


def step_flops(model, inputs: dict, autocast=None) -> int:
    """FLOPs of one forward + backward (FlopCounterMode: matmuls, convolutions, attention; not elementwise ops or
    sorts)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_step(model, inputs, autocast)()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------------------
def status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_peak_rss() -> float:
    """Make the resident-set high-water mark (VmHWM) the current RSS (Linux clear_refs); returns that RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return status_mib("VmRSS")


class PeakMemory:
    """Peak memory (GiB) of what runs inside `with PeakMemory(device) as peak:`, read as `peak.gib` afterwards.

    On a GPU: the caching allocator's peak of allocated tensors (what the step needs, weights included). On the CPU:
    the peak resident set above the one at entry (process-wide, so only a rough figure)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.gib = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._baseline = reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self.gib = (status_mib("VmHWM") - self._baseline) / 1024


def measure_step(model, inputs: dict, device: torch.device, autocast=None, warmup: int = 3, repeats: int = 10,
                 peak_tflops: float | None = None) -> dict:
    """One training step with AdamW (the update included): FLOPs (counted on the step), median seconds after
    `warmup` steps, images/s, peak memory and MFU = FLOPs / (seconds x peak_tflops), None without a peak."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    flops = step_flops(model, inputs, autocast)
    step = train_step(model, inputs, autocast, optimizer)
    for _ in range(warmup):
        step()
    with PeakMemory(device) as peak:
        seconds = statistics.median(timed(step, device) for _ in range(repeats))
    batch = inputs["input_ids"].shape[0]
    return {"batch": batch, "tflops_per_step": flops / 1e12, "step_s": seconds, "images_per_s": batch / seconds,
            "peak_gib": peak.gib, "mfu": flops / (seconds * peak_tflops * 1e12) if peak_tflops else None}


# ----------------------------------------------------------------------------------------------------------------------
# The largest batch that fits
# ----------------------------------------------------------------------------------------------------------------------
# What a step too large for the device raises: the caching allocator's out-of-memory, or a library's own allocation
# or size limit (cuDNN and cuBLAS workspaces, kernels indexed with 32-bit integers).
TOO_LARGE = ("out of memory", "ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED", "32-bit index", "canUse32BitIndexMath")


def runs_without_oom(run: Callable[[], None], model: torch.nn.Module | None = None,
                     failures: list[str] | None = None) -> bool:
    """run() and True, or False when the step was too large for the device (TOO_LARGE; the message is appended to
    `failures`); the cache is emptied for the next try. Any other error is raised."""
    try:
        run()
        return True
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not isinstance(error, torch.OutOfMemoryError) and not any(text in str(error) for text in TOO_LARGE):
            raise
        if failures is not None:
            failures.append(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    # out of the except block: its traceback held the failed step's tensors
    if model is not None:
        model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return False


def largest_batch(fits: Callable[[int], bool], start: int, cap: int | None = None, bisect: bool = True) -> tuple[int, bool]:
    """Largest batch for which fits(batch) holds: doubling from `start` (which must fit, else 0), then (`bisect`)
    bisection between the last fit and the first failure. Returns (batch, whether `cap` stopped the search)."""
    if not fits(start):
        return 0, False
    low, high = start, start * 2
    while cap is None or high <= cap:
        if not fits(high):
            break
        low, high = high, high * 2
    else:
        return low, True
    while bisect and high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, False
