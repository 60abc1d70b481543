"""Contrastive pre-training of a PlanModel with Accelerate: build, prepare, loop, save.

    plan-pretrain --config smoke [--key value ...]          (or python -m training.pretrain from a checkout)
    accelerate launch -m plan_hf.cli.pretrain --config mimic_cxr --data_dir /data/mimic-cxr-jpg

See training/README.md for the configs, flags, accumulation, checkpoints/resume and the exported folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, is_tensorboard_available, set_seed

from ..data.collator import PlanCollator
from ..hub import export_pretrained, format_upload_plan, push_to_hub
from ..processing_plan import PlanProcessor
from ..towers import tower_hub_id
from ..training.build import (
    build_dataloader,
    build_model,
    build_optimizer,
    build_processor,
    build_scheduler,
    ensure_synthetic_data,
    load_train_dataset,
    total_training_steps,
    unused_parameters,
)
from ..training.checkpointing import list_checkpoints, resolve_resume
from ..training.config import ConfigError, PretrainConfig, parse_args, save_config
from ..training.loop import Pretrainer
from .arguments import console_script

logger = logging.getLogger(__name__)


def _tracker_config(config: PretrainConfig) -> dict:
    """Scalars only: TensorBoard's hparams refuse lists and dicts."""
    flat = {k: v for k, v in config.to_dict().items() if k != "model"}
    flat.update({f"model.{k}": v for k, v in config.plan_config_kwargs().items()})
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def main(argv: list[str] | None = None) -> Path:
    """Pre-train with the arguments `argv` (None: the command line); returns the exported model folder."""
    config = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    state = PartialState(cpu=config.cpu)
    output_dir = Path(config.output_dir)

    checkpoint = resolve_resume(config.resume, output_dir / "checkpoints")
    if checkpoint is None and list_checkpoints(output_dir / "checkpoints") and state.is_main_process:
        logger.warning("%s holds checkpoints of an earlier run; starting afresh (pass --resume auto to continue)",
                       output_dir)

    # --- build: data, processor (a resumed run reuses the saved one: the same vocabulary), model --------------------
    with state.main_process_first():
        if state.is_main_process:
            ensure_synthetic_data(config)
    dataset = load_train_dataset(config)
    processor_dir = output_dir / "processor"
    with state.main_process_first():
        if checkpoint is not None and processor_dir.is_dir():
            processor = PlanProcessor.from_pretrained(processor_dir)
        else:
            processor = build_processor(config, dataset["text"])
            if state.is_main_process:
                processor.save_pretrained(processor_dir)
    set_seed(config.seed)
    model = build_model(config, processor)
    collator = PlanCollator(processor, augment=config.augment, seed=config.seed)
    dataloader = build_dataloader(config, dataset, collator)
    sampler = dataloader.sampler  # the epoch-seeded shuffle; prepare() wraps it but keeps this object
    steps_per_epoch = len(dataset) // config.per_process_batch_size // state.num_processes
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(dataset)} samples make no full global batch of "
                          f"{config.per_process_batch_size} x {state.num_processes} processes")
    total_steps = total_training_steps(config, steps_per_epoch)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, total_steps)

    # --- prepare ---------------------------------------------------------------------------------------------------
    find_unused = config.find_unused_parameters
    if find_unused is None:  # DDP must know about parameters a config leaves unused (e.g. local heads when off)
        find_unused = state.num_processes > 1 and bool(unused_parameters(model, collator([dataset[0], dataset[1]])))
        set_seed(config.seed)
    log_with = {"auto": "tensorboard" if is_tensorboard_available() else None, "none": None}.get(
        config.log_with, config.log_with)
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        log_with=log_with,
        project_dir=str(output_dir / "logs"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    )
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    assert len(dataloader) == steps_per_epoch, (len(dataloader), steps_per_epoch)
    accelerator.init_trackers("pretrain", config=_tracker_config(config))
    trainer = Pretrainer(accelerator, model, optimizer, scheduler, dataloader, sampler, config, total_steps)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    if accelerator.is_main_process:
        save_config(config, output_dir / "config.yaml")
        logger.info("%d samples, %d steps/epoch, %d steps, global batch %d (%d x %d micro-batches x %d processes)",
                    len(dataset), steps_per_epoch, total_steps, config.per_process_batch_size * state.num_processes,
                    config.micro_batch_size, config.accumulation_steps, state.num_processes)

    # --- loop ------------------------------------------------------------------------------------------------------
    progress = trainer.train()

    # --- save: the Hub-ready folder --------------------------------------------------------------------------------
    export_dir = output_dir / "model"
    if config.export:
        state_dict = accelerator.get_state_dict(model)  # gathers FSDP / DeepSpeed shards
        if accelerator.is_main_process:
            settings = {
                **config.to_dict(),
                "num_train_samples": len(dataset),
                "num_processes": accelerator.num_processes,
                "global_batch_size": config.per_process_batch_size * accelerator.num_processes,
                "steps_trained": progress.global_step,
                "nonfinite_steps": progress.nonfinite_steps,
                "base_models": config.card_base_models or [tower_hub_id(config.text_model),
                                                            tower_hub_id(config.vision_model)],
            }
            export_pretrained(accelerator.unwrap_model(model), processor, export_dir, training=settings,
                              results_path=config.eval_json, state_dict=state_dict,
                              datasets=config.card_datasets, license=config.license)
            logger.info("exported %s", export_dir)
            if config.push_to_hub:
                files = push_to_hub(export_dir, config.push_to_hub, private=config.hub_private,
                                    dry_run=config.dry_run)
                print(format_upload_plan(files, config.push_to_hub) if config.dry_run
                      else f"uploaded {len(files)} files to {config.push_to_hub}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export_dir


cli = console_script(main)

if __name__ == "__main__":
    main()
