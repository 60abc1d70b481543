"""Small towers and tokenizers built from configs alone, offline: for tests, the CPU demo and benchmarks.

Real users load pretrained towers by name (`PlanModel.from_text_vision_pretrained`); nothing here downloads.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from transformers import BertTokenizer

from .configuration_plan import PlanConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_MAX_POSITIONS = 128  # the tiny text tower's max_position_embeddings, and so its tokenizer's model_max_length
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")


def build_wordpiece_vocab(texts: Iterable[str], max_words: int = 4000) -> dict[str, int]:
    """A WordPiece vocabulary: special tokens, every single character (plain and ##), then the most frequent words.

    Characters guarantee that any text tokenizes without [UNK]; whole words keep radiology terms in one piece.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_WORD.findall(text.lower()))
    characters = sorted({ch for word in counts for ch in word} | set("abcdefghijklmnopqrstuvwxyz0123456789.,;:-()/%"))
    tokens = SPECIAL_TOKENS + characters + ["##" + ch for ch in characters if ch.isalnum()]
    seen = set(tokens)
    for word, _ in counts.most_common():
        if len(seen) >= len(SPECIAL_TOKENS) + 2 * len(characters) + max_words:
            break
        if word not in seen:
            tokens.append(word)
            seen.add(word)
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer(texts: Iterable[str], max_words: int = 4000, save_dir: str | Path | None = None,
                    model_max_length: int = TINY_MAX_POSITIONS) -> BertTokenizer:
    """A BERT (fast) tokenizer over `build_wordpiece_vocab(texts)`; saved to `save_dir` when given.

    `model_max_length` must be the text tower's `max_position_embeddings`: truncation (`truncation=True`, as in the
    zero-shot pipeline's `tokenizer_kwargs`) cuts there, where the tower's position table ends. Left unset it is
    1e30, and a long text reaches the tower whole and fails inside it."""
    tokenizer = BertTokenizer(vocab=build_wordpiece_vocab(texts, max_words), do_lower_case=True,
                              model_max_length=model_max_length)
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def tiny_text_config(vocab_size: int, hidden_size: int = 32, layers: int = 2, heads: int = 2,
                     max_position_embeddings: int = TINY_MAX_POSITIONS) -> dict:
    return dict(model_type="bert", vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=hidden_size * 2,
                max_position_embeddings=max_position_embeddings)


def tiny_vision_config(kind: str = "resnet", width: int = 16, image_size: int = 64, patch_size: int = 8) -> dict:
    if kind == "resnet":
        return dict(model_type="resnet", num_channels=3, embedding_size=width, layer_type="basic",
                    hidden_sizes=[width, width * 2, width * 2, width * 4], depths=[1, 1, 1, 1])
    if kind == "vit":
        return dict(model_type="vit", hidden_size=width * 2, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=width * 4, image_size=image_size, patch_size=patch_size, num_channels=3)
    raise ValueError(f"vision kind must be 'resnet' or 'vit', got {kind!r}")


def tiny_plan_config(vocab_size: int = 200, vision: str = "resnet", image_size: int = 64, projection_dim: int = 16,
                     **overrides) -> PlanConfig:
    """A PlanConfig whose towers are a 2-layer BERT and a 4-stage basic ResNet (or a 2-layer ViT)."""
    return PlanConfig(
        text_config=tiny_text_config(vocab_size),
        vision_config=tiny_vision_config(vision, image_size=image_size),
        projection_dim=projection_dim,
        **overrides,
    )


__all__ = ["TINY_MAX_POSITIONS", "build_tokenizer", "build_wordpiece_vocab", "tiny_plan_config", "tiny_text_config",
           "tiny_vision_config"]
