"""Builders for a pre-training run: the dataset, processor, model, data loader, optimizer and schedule, from a
`PretrainConfig`. Nothing here knows about processes; `training/pretrain.py` prepares what these return."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import AutoConfig, AutoModel, AutoTokenizer, get_scheduler
from transformers.utils import logging as hf_logging

from ..configuration_plan import PlanConfig
from ..data.collator import PlanCollator
from ..data.sources import SourceKind, load_pairs, source_from, source_kind, stream_pairs
from ..data.unreadable import CountUnreadable, SkipUnreadable
from ..image_processing_plan import PlanImageProcessor
from ..modeling_plan import PlanModel, vision_feature_layer_for_stride
from ..processing_plan import PlanProcessor
from ..tiny import build_tokenizer, tiny_text_config, tiny_vision_config
from ..towers import resolve_tower
from .config import ConfigError, PretrainConfig

logger = logging.getLogger(__name__)

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
def has_mimic_layout(data_dir: str | Path) -> bool:
    root = Path(data_dir)
    return any((root / name).is_file() for name in (SPLIT_CSV, SPLIT_CSV + ".gz"))


def ensure_synthetic_data(config: PretrainConfig) -> None:
    """Write the synthetic CXR set into `data_dir` when asked for and not there yet (call on one process)."""
    if (config.synthetic_num_images <= 0 or config.data_dir is None or has_mimic_layout(config.data_dir)
            or source_kind(config.dataset) is not SourceKind.MIMIC_CXR):
        return
    from ..data.synthetic import generate_synthetic

    logger.info("writing %d synthetic studies into %s", config.synthetic_num_images, config.data_dir)
    generate_synthetic(config.data_dir, config.synthetic_num_images, seed=config.synthetic_seed,
                       image_size=config.synthetic_image_size, contact_sheet=False)


def load_train_dataset(config: PretrainConfig, process_index: int = 0, num_processes: int = 1):
    """The training split of `config.dataset` (`plan_hf.data.sources`): a `datasets.Dataset` with `image` (decoded
    lazily) and `text` columns, or with `streaming` this process's `PairStream`."""
    if config.data_dir is None and source_kind(config.dataset) is SourceKind.MIMIC_CXR:
        raise ConfigError("data_dir is not set: point it at a MIMIC-CXR-JPG-style folder (or the synthetic set)")
    try:
        source = source_from(config)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if config.streaming:  # read in each training process (a resumed run knows exactly which rows it has read);
        # num_workers threads decode the images ahead
        return stream_pairs(source, config.train_split, seed=config.seed, buffer_size=config.shuffle_buffer_size,
                            process_index=process_index, num_processes=num_processes,
                            max_rows=config.max_train_samples, decode_threads=config.num_workers)
    dataset = load_pairs(source, config.train_split, verify=config.verify_images)
    if config.max_train_samples is not None:
        dataset = dataset.select(range(min(config.max_train_samples, len(dataset))))
    return dataset


class EpochShuffleSampler(Sampler[int]):
    """A permutation of the dataset seeded by (seed, epoch): the same on every process and after a resume.

    Accelerate's own seedable sampler would do, but `save_state` pickles it with its dataset into every checkpoint;
    this one's whole state (the epoch) is in the checkpoint's trainer_state.json.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


def build_dataloader(config: PretrainConfig, dataset, collator: PlanCollator) -> DataLoader:
    """Shuffled per epoch, `drop_last` (a short last batch would change the negatives' count and, padded by
    repetition, put a sample against its own duplicate: a false negative), one optimizer step's worth per batch."""
    if len(dataset) < config.per_process_batch_size:
        raise ConfigError(f"the training set has {len(dataset)} samples, fewer than one batch "
                          f"(micro_batch_size * accumulation_steps = {config.per_process_batch_size})")
    return DataLoader(
        SkipUnreadable(dataset),  # an unreadable image is named, counted and replaced by the next sample
        batch_size=config.per_process_batch_size,
        sampler=EpochShuffleSampler(len(dataset), config.seed),
        drop_last=True,
        collate_fn=CountUnreadable(collator),
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        # worker seeds come from this generator, not from the global RNG that dropout draws from
        generator=torch.Generator().manual_seed(config.seed),
    )


# --------------------------------------------------------------------------------------------------------------------
# Processor and model
# --------------------------------------------------------------------------------------------------------------------
def build_processor(config: PretrainConfig, texts: list[str] | None = None) -> PlanProcessor:
    """Tokenizer of the pretrained text tower (or `tokenizer`), else a WordPiece vocabulary built from `texts`."""
    text_model = resolve_tower(config.text_model)
    name = config.tokenizer or text_model
    # the text tower's position table ends here: truncation must cut there (a saved tokenizer may say 1e30)
    tower_config = (AutoConfig.from_pretrained(text_model) if text_model is not None
                    else AutoConfig.for_model(**(config.text_config or tiny_text_config(1))))
    max_positions = getattr(tower_config, "max_position_embeddings", None) or int(1e30)
    if name is not None:
        tokenizer = AutoTokenizer.from_pretrained(name)
        tokenizer.model_max_length = min(tokenizer.model_max_length, max_positions)
    else:
        if not texts:
            raise ConfigError("no tokenizer or text_model given and no training texts to build a vocabulary from")
        tokenizer = build_tokenizer(texts, max_words=config.tokenizer_max_words, model_max_length=max_positions)
    image_processor = PlanImageProcessor(size=config.image_size, image_mean=config.image_mean,
                                         image_std=config.image_std)
    return PlanProcessor(image_processor=image_processor, tokenizer=tokenizer, max_length=config.max_length)


def _without_pooler(tower_config) -> dict:
    """PlanModel pools the text itself ([CLS] + its projection): BERT's pooler would be an unused parameter."""
    model_class = AutoModel._model_mapping[type(tower_config)]
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters else {}


def _text_tower(config: PretrainConfig, vocab_size: int):
    text_model = resolve_tower(config.text_model)
    if text_model is not None:
        overrides = {"num_hidden_layers": config.text_num_layers} if config.text_num_layers else {}
        tower_config = AutoConfig.from_pretrained(text_model, **overrides)
        verbosity = hf_logging.get_verbosity()
        if overrides:  # the dropped layers' weights are "unexpected" by design: no need for the long load report
            hf_logging.set_verbosity_error()
        try:
            return AutoModel.from_pretrained(text_model, config=tower_config, **_without_pooler(tower_config))
        finally:
            hf_logging.set_verbosity(verbosity)
    values = dict(config.text_config or tiny_text_config(vocab_size))
    values["vocab_size"] = vocab_size
    tower_config = AutoConfig.for_model(**values)
    return AutoModel.from_config(tower_config, **_without_pooler(tower_config))


def _vision_tower(config: PretrainConfig):
    if config.vision_model is not None:
        return AutoModel.from_pretrained(resolve_tower(config.vision_model))
    values = dict(config.vision_config or tiny_vision_config("resnet", image_size=config.image_size))
    return AutoModel.from_config(AutoConfig.for_model(**values))


def build_model(config: PretrainConfig, processor: PlanProcessor) -> PlanModel:
    """A PlanModel over the configured towers; PlanConfig arguments from `preset` then `model`."""
    text = _text_tower(config, len(processor.tokenizer))
    vision = _vision_tower(config)
    kwargs = config.plan_config_kwargs()
    if config.vision_feature_stride is not None:
        if "local_vision_feature_layer" in config.model:
            raise ConfigError("give vision_feature_stride or model.local_vision_feature_layer, not both")
        kwargs["local_vision_feature_layer"] = vision_feature_layer_for_stride(vision.config,
                                                                               config.vision_feature_stride)
    plan_config = PlanConfig(text_config=text.config.to_dict(), vision_config=vision.config.to_dict(), **kwargs)
    model = PlanModel(plan_config, text_model=text, vision_model=vision)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    configure_runtime(model, config)
    return model


def configure_runtime(model: PlanModel, config: PretrainConfig) -> None:
    """The compute knobs of the objectives' modules (results do not depend on them, memory and speed do)."""
    model.local_alignment.chunk_size = config.cross_sample_chunk_size
    # with activation checkpointing on, PLAN's cross-sample chunks are recomputed too: memory O(B), not O(B^2)
    model.local_alignment.checkpoint_chunks = config.gradient_checkpointing
    if model.pathology_extractor is not None:
        model.pathology_extractor.chunk_size = config.pcma_chunk_size


def unused_parameters(model: PlanModel, batch: dict[str, torch.Tensor]) -> list[str]:
    """Trainable parameters that one training forward/backward leaves without a gradient (DDP must be told:
    `find_unused_parameters`). Buffers and gradients are restored afterwards."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    model(**batch, return_loss=True).loss.backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    return unused


# --------------------------------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------------------------------
def parameter_groups(config: PretrainConfig, model: torch.nn.Module) -> list[dict[str, Any]]:
    """AdamW parameter groups: (text tower, vision tower, the rest) x (decay, no decay), empty groups left out.

    Each tower gets its own peak learning rate (`text_tower_learning_rate`, `vision_tower_learning_rate`; None means
    `learning_rate`): a pretrained text tower fine-tuned at the rate the new projections need forgets what it knew.
    No weight decay on biases, norms, temperatures and other 1-D parameters (as CLIP/open_clip). Each group carries
    a `name`, which the training log uses.
    """
    rates = {"text_tower": config.text_tower_learning_rate, "vision_tower": config.vision_tower_learning_rate,
             "heads": None}
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {(part, d): [] for part in rates for d in (True, False)}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = ("text_tower" if name.startswith("text_model.") else
                "vision_tower" if name.startswith("vision_model.") else "heads")
        buckets[(part, parameter.ndim >= 2)].append(parameter)
    groups = []
    for (part, decay), parameters in buckets.items():
        if parameters:
            rate = rates[part] if rates[part] is not None else config.learning_rate
            groups.append({"params": parameters, "lr": rate, "weight_decay": config.weight_decay if decay else 0.0,
                           "name": f"{part}{'' if decay else '_no_decay'}"})
    return groups


def build_optimizer(config: PretrainConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over `parameter_groups` (per-tower learning rates, no decay on 1-D parameters)."""
    return torch.optim.AdamW(parameter_groups(config, model), lr=config.learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)


def total_training_steps(config: PretrainConfig, steps_per_epoch: int) -> int:
    return config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch


def warmup_steps(config: PretrainConfig, total_steps: int) -> int:
    return config.warmup_steps or round(config.warmup_ratio * total_steps)


def build_scheduler(config: PretrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Learning-rate schedule over optimizer steps (stepped once per step by the loop, not prepared)."""
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(config, total_steps),
                         num_training_steps=total_steps)


__all__ = [
    "EpochShuffleSampler",
    "build_dataloader",
    "build_model",
    "build_optimizer",
    "parameter_groups",
    "build_processor",
    "build_scheduler",
    "configure_runtime",
    "ensure_synthetic_data",
    "has_mimic_layout",
    "load_train_dataset",
    "configure_runtime",
    "total_training_steps",
    "unused_parameters",
    "warmup_steps",
]
