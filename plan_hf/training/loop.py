"""The pre-training loop: steps (cached-feature accumulation), the non-finite guard, logging (progress bar,
trackers, a JSONL file) and the checkpoint schedule. Built from prepared objects; knows nothing of how they were
made."""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object, send_to_device
from tqdm.auto import tqdm

from ..data.bad_rows import BadRowReason
from ..data.unreadable import BAD_FILES, BAD_SAMPLES
from .accumulation import check_accumulation_support, contrastive_step
from .checkpointing import CheckpointError, TrainingProgress, load_checkpoint, load_process_state, save_checkpoint
from .config import PretrainConfig

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient, or the weights themselves became non-finite."""


class BadDataError(RuntimeError):
    """More unreadable images in one epoch (in memory or streamed) than `max_bad_sample_fraction` allows."""


def loss_terms(output: Any) -> dict[str, torch.Tensor]:
    """Every loss term of a PlanOutput as scalar tensors: loss, loss_global, loss_local, loss_local_stage_<t>,
    loss_pcma, loss_corr, ... (whatever the model reports)."""
    terms: dict[str, torch.Tensor] = {}
    for key, value in output.items():
        if not key.startswith("loss"):
            continue
        if isinstance(value, tuple) and key.endswith("_stages"):
            for stage, stage_value in enumerate(value):
                terms[f"{key[:-len('_stages')]}_stage_{stage}"] = stage_value.detach().float()
        elif isinstance(value, torch.Tensor) and value.dim() == 0:
            terms[key] = value.detach().float()
    return terms


class JsonlLog:
    """Appends one JSON object per line (main process only); survives resumes (append mode)."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def drop_after(self, step: int) -> None:
        """Forget records past `step`: a resumed run logs those steps again."""
        if self.enabled and self.path.is_file():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def _restore_buffers(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(saved[name])


class Pretrainer:
    """Runs `total_steps` optimizer steps of contrastive pre-training over prepared objects.

    Args:
        accelerator: the run's `Accelerator`.
        model, optimizer, dataloader: as returned by `accelerator.prepare`.
        scheduler: a learning-rate scheduler stepped once per step (saved with each checkpoint).
        sampler: the dataloader's epoch-seeded sampler (`set_epoch`).
        config: the run's settings (accumulation, logging, checkpoints, non-finite guard).
        total_steps: optimizer steps of the whole run.
        stream, collator: instead of `dataloader` and `sampler`, this process's `plan_hf.data.sources.PairStream`
            and the collator that makes its rows a batch. It is not prepared by accelerate: each process reads its
            own share, and a prepared loader reads a batch ahead, which would put the stream's position past the
            last step a checkpoint saves.
    """

    def __init__(self, accelerator, model, optimizer, scheduler, dataloader, sampler, config: PretrainConfig,
                 total_steps: int, stream=None, collator=None) -> None:
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dataloader = dataloader
        self.sampler = sampler
        self.stream = stream
        self.collator = collator
        self.config = config
        self.total_steps = total_steps
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.progress = TrainingProgress()
        self.consecutive_nonfinite = 0
        self.log = JsonlLog(self.output_dir / "logs" / "metrics.jsonl", enabled=accelerator.is_main_process)
        self.learning_rate = float("nan")
        self.tower_learning_rates: dict[str, float] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._counted = 0
        self._clock = (time.perf_counter(), 0)  # (time, global step) at the last log
        check_accumulation_support(accelerator, config.accumulation_steps)
        # the scheduler is saved by save_checkpoint as JSON: registering it with accelerate would pickle it

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    # ---------------------------------------------------------------------------------------------------------------
    def resume(self, checkpoint: str | Path) -> None:
        self.progress = load_checkpoint(self.accelerator, checkpoint, self.scheduler)
        if self.stream is not None:
            try:
                self.stream.load_state_dict(load_process_state(checkpoint, self.accelerator.process_index))
            except ValueError as error:
                raise CheckpointError(f"checkpoint {checkpoint}: {error}") from error
        self.log.drop_after(self.progress.global_step)
        self._clock = (time.perf_counter(), self.progress.global_step)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, self.progress.global_step,
                    self.progress.epoch, self.progress.batches_in_epoch)

    def save(self) -> Path:
        return save_checkpoint(self.accelerator, self.checkpoint_dir, self.progress, self.config.keep_checkpoints,
                               self.scheduler, None if self.stream is None else self.stream.state_dict())

    # ---------------------------------------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """One optimizer step on this process's batch; None when it was skipped (non-finite)."""
        step = self.progress.global_step + 1  # numbered from 1, as the logs and checkpoints count steps
        buffers = {name: b.detach().clone() for name, b in self.unwrapped.named_buffers()}

        result = contrastive_step(self.accelerator, self.model, batch, self.config.accumulation_steps,
                                  self.local_loss_scale())
        grad_norm = None
        applied = result.finite
        if applied:
            max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
            # fp16's GradScaler skips inf gradients itself (and lowers its scale); elsewhere a non-finite norm is ours
            # to skip. The norm is computed after DDP's all-reduce: every process decides the same.
            if self.accelerator.scaler is None and grad_norm is not None and not torch.isfinite(grad_norm):
                applied = False
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # the rate this step used: the new layers' ("heads"), and each tower's when it has its own
        rates = dict(zip((group.get("name", str(i)) for i, group in enumerate(self.optimizer.param_groups)),
                         self.scheduler.get_last_lr()))
        self.learning_rate = rates.get("heads", next(iter(rates.values())))
        self.tower_learning_rates = {f"learning_rate_{part}": rates[part] for part in ("text_tower", "vision_tower")
                                     if part in rates and rates[part] != self.learning_rate}
        with warnings.catch_warnings():  # a skipped first step would warn "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # the schedule follows the step count, skipped steps included

        if not applied:
            _restore_buffers(self.unwrapped, buffers)  # BatchNorm statistics: the bad batch leaves no trace
            self._nonfinite(step, "loss" if not result.finite else "gradient")
            return None
        self.consecutive_nonfinite = 0
        terms = loss_terms(result.output)
        terms["local_loss_weight"] = torch.tensor(self.local_loss_scale() * self.unwrapped.config.local_loss_weight)
        if grad_norm is not None:  # (DeepSpeed clips inside its engine and reports none)
            terms["grad_norm"] = torch.as_tensor(grad_norm).detach().float()
        return terms

    def local_loss_scale(self) -> float:
        """The curriculum: lambda_l ramps linearly from 0 to its value over `local_warmup_steps` optimizer steps."""
        warmup = self.config.local_warmup_steps
        return 1.0 if warmup == 0 else min(1.0, self.progress.global_step / warmup)

    def _count_bad_samples(self, batch: dict[str, Any]) -> None:
        """Take the unreadable-image counts out of the batch (`SkipUnreadable`), summed over processes (every
        process then decides alike); log them with this process's file names; stop past the allowed share."""
        bad = batch.pop(BAD_SAMPLES, None)
        files = batch.pop(BAD_FILES, [])
        if bad is None:
            return
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad.to(self.accelerator.device), reduction="sum")
        count = int(bad)
        if not count:
            return
        progress = self.progress
        progress.bad_samples += count
        progress.bad_samples_in_epoch += count
        step = progress.global_step + 1
        self.log.write({"step": step, "event": "bad_samples", "count": count, "files": files,
                        "bad_samples": progress.bad_samples})
        epoch_size = len(self.dataloader) * self.config.per_process_batch_size * self.accelerator.num_processes
        if progress.bad_samples_in_epoch > self.config.max_bad_sample_fraction * epoch_size:
            raise BadDataError(
                f"{progress.bad_samples_in_epoch} unreadable images in epoch {progress.epoch} of {epoch_size} samples, "
                f"more than max_bad_sample_fraction={self.config.max_bad_sample_fraction} (last at step {step}: "
                f"{', '.join(files) or 'on another process'}). Find them all with --verify_images true, or fix the "
                "files; the warnings above name each one."
            )

    def _nonfinite(self, step: int, what: str) -> None:
        self.consecutive_nonfinite += 1
        self.progress.nonfinite_steps += 1
        message = (f"non-finite {what} at step {step}: step skipped ({self.consecutive_nonfinite} in a row, "
                   f"{self.progress.nonfinite_steps} in total)")
        logger.warning(message)
        self.log.write({"step": step, "event": f"nonfinite_{what}", "consecutive": self.consecutive_nonfinite,
                        "nonfinite_steps": self.progress.nonfinite_steps})
        if self.consecutive_nonfinite >= self.config.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive steps had a non-finite {what} (last at step {step}; "
                f"max_consecutive_nonfinite={self.config.max_consecutive_nonfinite}). Lower the learning rate, use "
                "bf16 instead of fp16, check the data for corrupt images, or resume from an earlier checkpoint."
            )

    # ---------------------------------------------------------------------------------------------------------------
    def _accumulate(self, terms: dict[str, torch.Tensor]) -> None:
        for key, value in terms.items():
            self._sums[key] = self._sums.get(key, torch.zeros((), device=value.device)) + value
        self._counted += 1

    def _flush_logs(self, bar: tqdm) -> None:
        """Mean of each term since the last log, over steps and processes; to trackers, JSONL and the bar."""
        keys = sorted(self._sums)
        totals = torch.stack([self._sums[k] for k in keys] + [torch.tensor(float(self._counted))
                                                               .to(self.accelerator.device)])
        if self.accelerator.num_processes > 1:  # terms differ between processes (each has its rows of the loss)
            totals = self.accelerator.reduce(totals, reduction="sum")
        *sums, count = totals.tolist()
        metrics = {k: s / count for k, s in zip(keys, sums)} if count else {}
        now, step = time.perf_counter(), self.progress.global_step
        elapsed_steps = step - self._clock[1]
        samples = elapsed_steps * self.config.per_process_batch_size * self.accelerator.num_processes
        metrics["samples_per_second"] = samples / max(now - self._clock[0], 1e-9)
        metrics["learning_rate"] = self.learning_rate
        metrics.update(self.tower_learning_rates)
        # exp(-s) rather than 1 / exp(s): a diverged scale gives inf or NaN here, not a ZeroDivisionError
        metrics["temperature"] = torch.exp(-self.unwrapped.logit_scale.detach().float().clamp(
            max=self.unwrapped.config.logit_scale_max)).item()
        metrics["epoch"] = self.progress.epoch + (0 if self.stream is not None else  # (a stream's length is unknown)
                                                  self.progress.batches_in_epoch / max(len(self.dataloader), 1))
        metrics["nonfinite_steps"] = self.progress.nonfinite_steps
        self.accelerator.log(metrics, step=step)
        self.log.write({"step": step, **metrics})
        shown = {k.removeprefix("loss_") if k != "loss" else k: f"{v:.3f}" for k, v in metrics.items()
                 if k.startswith("loss") and "stage" not in k}
        bar.set_postfix(**shown, samples_s=f"{metrics['samples_per_second']:.1f}")
        self._sums, self._counted, self._clock = {}, 0, (now, step)
        if not math.isfinite(metrics["temperature"]):
            # exp(-s) overflows once s < -88: every similarity is scaled to 0, the loss sits at chance, no gradient
            # brings it back. Say so rather than train on.
            scale = self.unwrapped.logit_scale.detach().float().item()
            raise NonFiniteLossError(
                f"the run diverged by step {step}: the logit scale is {scale:.4g} (temperature "
                f"{metrics['temperature']}), so every image-text similarity is scaled to zero and the loss is stuck "
                f"at chance. Lower the learning rate (learning_rate={self.config.learning_rate:g}) or add warmup."
            )

    # ---------------------------------------------------------------------------------------------------------------
    def _stream_batches(self):
        """This process's batches of the epoch from its stream (continuing after the rows a resumed run has read),
        while every process has a full one: a process whose share has run out ends the epoch for all, as DDP
        steps together."""
        size = self.config.per_process_batch_size
        pairs = self.stream.pairs(self.progress.epoch)
        while True:
            rows = list(itertools.islice(pairs, size))
            short = torch.tensor(float(len(rows) < size), device=self.accelerator.device)
            if self.accelerator.num_processes > 1:
                short = self.accelerator.reduce(short, reduction="sum")
            if short.item() > 0:
                return
            yield send_to_device(self.collator(rows), self.accelerator.device)

    def _report_stream(self, complete: bool) -> None:
        """The epoch's bad rows over all processes, counted by reason and named: logged, and written to
        metrics.jsonl (``"event": "bad_rows"``); unreadable images in more than `max_bad_sample_fraction` of a
        complete epoch's rows stop the run."""
        report = self.stream.report()
        where = f"process {self.accelerator.process_index}, " if self.accelerator.num_processes > 1 else ""
        mine = {"rows_read": self.stream.rows_read, "skipped": {k.value: v for k, v in report.skipped.items()},
                "examples": [where + e for examples in report.examples.values() for e in examples]}
        everyone = gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]
        rows_read = sum(part["rows_read"] for part in everyone)
        by_reason: dict[str, int] = {}
        for part in everyone:
            for reason, count in part["skipped"].items():
                by_reason[reason] = by_reason.get(reason, 0) + count
        bad = sum(by_reason.values())
        examples = [example for part in everyone for example in part["examples"]]
        epoch = self.progress.epoch
        self.log.write({"step": self.progress.global_step, "event": "bad_rows", "epoch": epoch, "complete": complete,
                        "rows_read": rows_read, "bad_rows": bad, "by_reason": by_reason, "examples": examples})
        if self.accelerator.is_main_process:
            logger.log(logging.WARNING if bad else logging.INFO, "epoch %d%s: %d rows read, %d bad (%s)%s", epoch,
                       "" if complete else " (so far)", rows_read, bad,
                       ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items())) or "none",
                       f"; e.g. {'; '.join(examples[:3])}" if examples else "")
        # As in memory: rows a loader would have left out (no text, no file) are counted only; unreadable images,
        # which only decoding finds, stop the run past the allowed share
        unreadable = by_reason.get(BadRowReason.UNREADABLE_IMAGE.value, 0)
        if complete and unreadable > self.config.max_bad_sample_fraction * rows_read:
            named = [e for e in examples if "unreadable image" in e]
            raise BadDataError(
                f"{unreadable} unreadable images in epoch {epoch} of {rows_read} rows read, more than "
                f"max_bad_sample_fraction={self.config.max_bad_sample_fraction} (e.g. {'; '.join(named[:3])}). Fix "
                "the files, or set strict: true to stop at the first one."
            )

    def _epoch_batches(self):
        """This epoch's batches, those a resumed run already consumed left out."""
        if self.stream is not None:
            return self._stream_batches()
        epoch, done = self.progress.epoch, self.progress.batches_in_epoch
        self.sampler.set_epoch(epoch)
        loader = self.dataloader
        if done:
            loader = self.accelerator.skip_first_batches(self.dataloader, done)
        loader.set_epoch(epoch)  # the prepared loader sets its sampler's epoch on each iteration
        return loader

    def train(self) -> TrainingProgress:
        config, progress = self.config, self.progress
        bar = tqdm(total=self.total_steps, initial=progress.global_step, desc="pre-training", unit="step",
                   dynamic_ncols=True, disable=not (config.progress_bar and self.accelerator.is_local_main_process))
        self.model.train()
        last_saved = progress.global_step if progress.global_step else None
        finished_epoch = True
        while progress.global_step < self.total_steps:
            finished_epoch = True
            started_at = progress.global_step
            for batch in self._epoch_batches():
                self._count_bad_samples(batch)
                terms = self.train_step(batch)
                progress.global_step += 1
                progress.batches_in_epoch += 1
                progress.samples_seen += config.per_process_batch_size * self.accelerator.num_processes
                if terms is not None:
                    self._accumulate(terms)
                bar.update(1)
                if progress.global_step % config.log_every_steps == 0 or progress.global_step == self.total_steps:
                    self._flush_logs(bar)
                if progress.global_step % config.save_every_steps == 0:
                    self.save()
                    last_saved = progress.global_step
                if progress.global_step >= self.total_steps:
                    # (a stream's end is only known when a batch is asked for past it)
                    finished_epoch = self.stream is None and progress.batches_in_epoch >= len(self.dataloader)
                    break
            if self.stream is not None and finished_epoch:
                if progress.batches_in_epoch == 0 and progress.global_step == started_at:
                    raise RuntimeError(f"epoch {progress.epoch} of the stream gave no full batch of "
                                       f"{config.per_process_batch_size} rows on every process")
                self._report_stream(complete=True)
            if finished_epoch:
                progress.epoch += 1
                progress.batches_in_epoch = 0
                progress.bad_samples_in_epoch = 0
        if self.stream is not None and not finished_epoch:
            self._report_stream(complete=False)
        if last_saved != progress.global_step:
            self.save()
        bar.close()
        return progress


__all__ = ["BadDataError", "JsonlLog", "NonFiniteLossError", "Pretrainer", "loss_terms"]
