"""Global embeddings of images and texts in batches, L2-normalised numpy arrays, for the evaluation protocols.

Works with any model that has CLIP's `get_image_features` / `get_text_features` (PlanModel does), so the protocols
also run on other dual encoders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..grounding import inference_mode  # noqa: F401  (re-exported: the evaluation modules import it from here)

TEXT_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class LazyColumn(Sequence):
    """One column of a row-indexable dataset (a `datasets.Dataset`, a list of dicts), read row by row on access.

    Lets a protocol hold "the images of the test split" without decoding thousands of X-rays at once. Indexing with
    a slice or a list of positions gives a view of those rows.
    """

    def __init__(self, rows: Any, column: str, indices: Sequence[int] | None = None):
        self.rows = rows
        self.column = column
        self.indices = list(range(len(rows))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return type(self)(self.rows, self.column, self.indices[index])
        if isinstance(index, (list, tuple, np.ndarray)):
            return type(self)(self.rows, self.column, [self.indices[i] for i in index])
        return self.read(self.rows[self.indices[index]][self.column])

    def read(self, value: Any) -> Any:
        """What a cell becomes on access (the value itself here)."""
        return value


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pooled_embedding(output: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose `pooler_output` is the projected embedding; older ones a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _batches(count: int, batch_size: int, desc: str, progress: bool) -> Iterator[slice]:
    starts = range(0, count, batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress or count == 0, leave=False):
        yield slice(start, min(start + batch_size, count))


def _embed(encode: Callable[[slice], torch.Tensor], count: int, batch_size: int, desc: str,
           progress: bool) -> np.ndarray:
    parts = [torch.nn.functional.normalize(encode(part).float(), dim=-1).cpu().numpy()
             for part in _batches(count, batch_size, desc, progress)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def embed_images(model, processor, images: Sequence[Any], batch_size: int = 32, progress: bool = True,
                 desc: str = "Embedding images") -> np.ndarray:
    """(N, d) float32 L2-normalised global image embeddings v."""
    device = model_device(model)

    def encode(part: slice) -> torch.Tensor:
        batch = processor.image_processor([images[i] for i in range(part.start, part.stop)], return_tensors="pt")
        return pooled_embedding(model.get_image_features(pixel_values=batch["pixel_values"].to(device)))

    with inference_mode(model):
        return _embed(encode, len(images), batch_size, desc, progress)


def embed_texts(model, processor, texts: Sequence[str], batch_size: int = 64, progress: bool = True,
                desc: str = "Embedding texts") -> np.ndarray:
    """(N, d) float32 L2-normalised global text embeddings t."""
    device = model_device(model)

    def encode(part: slice) -> torch.Tensor:
        batch = processor.tokenizer(list(texts[part]), padding=True, truncation=True,
                                    max_length=getattr(processor, "max_length", None), return_tensors="pt")
        inputs = {k: batch[k].to(device) for k in TEXT_INPUT_NAMES if k in batch}
        return pooled_embedding(model.get_text_features(**inputs))

    with inference_mode(model):
        return _embed(encode, len(texts), batch_size, desc, progress)


def logit_scale(model) -> float:
    """The model's global softmax scale s = exp(logit_scale), clamped as in its forward; 100 when it has none."""
    parameter = getattr(model, "logit_scale", None)
    if parameter is None:
        return 100.0
    maximum = getattr(getattr(model, "config", None), "logit_scale_max", None)
    value = parameter.detach().float()
    if maximum is not None:
        value = value.clamp(max=maximum)
    return float(value.exp())


__all__ = ["LazyColumn", "embed_images", "embed_texts", "inference_mode", "logit_scale", "model_device", "pooled_embedding"]
