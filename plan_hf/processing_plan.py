"""PlanProcessor: a tokenizer and a PlanImageProcessor, adding the `word_ids` and `sentence_ids` the losses pool by."""

from __future__ import annotations

import bisect
from typing import Any

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .sentences_plan import sentence_spans

# Words that carry no place on the image. Excluded from the word-pixel alignment (word_ids = -1), as are punctuation,
# special tokens and padding: docs/method.md §2.4's masking before the diagnostic gate. Negation cues are excluded too: the
# text tower's context already carries them into the finding's own word features.
STOP_WORDS = frozenset(
    """a an the and or but nor of in on at to for from by with without within into onto over under as is are was were be
    been being am do does did has have had having this that these those there here it its it's which who whom whose what
    when where while than then so such very can could may might must shall should will would also again further no not
    none nor only same too just any both each few more most other some all own once until up down out off above below
    between through during before after about against per via i we you he she they me us him her them my our your his
    their yes please seen noted identified evaluation""".split()
)


class PlanProcessor(ProcessorMixin):
    """Tokenizer + image processor. Text calls also return, per token:

    - `word_ids`: index of the word the token belongs to (word pieces of one word share it), -1 for special tokens,
      padding, punctuation and stop-words; words are numbered 0..M-1 in order within each text.
    - `sentence_ids`: index of the report sentence the token belongs to (sentence splitting of
      `plan_hf.data.split_sentences`), -1 for special tokens and padding.
    """

    def __init__(self, image_processor=None, tokenizer=None, max_length: int = 128, filter_stop_words: bool = True,
                 **kwargs):
        self.max_length = max_length
        self.filter_stop_words = filter_stop_words
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        return_word_ids: bool = True,
        return_sentence_ids: bool = True,
        **kwargs,
    ) -> BatchFeature:
        if text is None and images is None:
            raise ValueError("PlanProcessor needs `text`, `images`, or both")
        data: dict[str, Any] = {}
        if text is not None:
            data.update(self.encode_text(text, padding, truncation, max_length, return_word_ids, return_sentence_ids))
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def encode_text(self, text, padding=True, truncation=True, max_length=None, return_word_ids=True,
                    return_sentence_ids=True) -> dict[str, list]:
        texts = [text] if isinstance(text, str) else list(text)
        for index, item in enumerate(texts):
            if not isinstance(item, str):
                raise ValueError(f"text {index} of the batch is {type(item).__name__}, expected str")
        encoding = self.tokenizer(
            texts, padding=padding, truncation=truncation, max_length=max_length or self.max_length,
            return_offsets_mapping=True,
        )
        offsets = encoding.pop("offset_mapping")
        data = dict(encoding)
        if return_word_ids:
            data["word_ids"] = [self._word_ids(encoding, i, texts[i], offsets[i]) for i in range(len(texts))]
        if return_sentence_ids:
            data["sentence_ids"] = [self._sentence_ids(encoding, i, texts[i], offsets[i]) for i in range(len(texts))]
        return data

    def _word_ids(self, encoding, index: int, text: str, offsets) -> list[int]:
        token_words = encoding.word_ids(index)
        spans: dict[int, list[int]] = {}
        for (start, end), word in zip(offsets, token_words):
            if word is not None:
                spans.setdefault(word, [start, end])[1] = end
        kept: dict[int, int] = {}
        for word in sorted(spans):
            start, end = spans[word]
            if self._is_content_word(text[start:end]):
                kept[word] = len(kept)
        return [kept.get(word, -1) if word is not None else -1 for word in token_words]

    def _is_content_word(self, word: str) -> bool:
        if not any(ch.isalnum() for ch in word):
            return False
        return not (self.filter_stop_words and word.lower() in STOP_WORDS)

    @staticmethod
    def _sentence_ids(encoding, index: int, text: str, offsets) -> list[int]:
        spans = sentence_spans(text)
        starts = [start for start, _ in spans]
        ids = []
        for (start, end), word in zip(offsets, encoding.word_ids(index)):
            if word is None or not spans:
                ids.append(-1)
            else:  # the last sentence starting at or before the token (text between sentences joins the previous)
                ids.append(max(bisect.bisect_right(starts, start) - 1, 0))
        return ids

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names) + ["word_ids", "sentence_ids"] + list(
            self.image_processor.model_input_names
        )


__all__ = ["PlanProcessor", "STOP_WORDS"]
