"""PlanProcessor: a tokenizer and a PlanImageProcessor, adding the `word_ids` and `sentence_ids` the losses pool by."""

import bisect
from typing import Any

from transformers import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack

from .image_processing_plan import PlanImageProcessorKwargs, with_class_auto_map
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


class PlanProcessorKwargs(ProcessingKwargs, total=False):
    """Call-time options: the tokenizer's (`text_kwargs`), the image processor's (`images_kwargs`), and whether to
    return the per-token word and sentence ids the local losses pool by."""

    images_kwargs: PlanImageProcessorKwargs
    return_word_ids: bool
    return_sentence_ids: bool


class PlanProcessor(ProcessorMixin):
    """Tokenizer + image processor. Text calls also return, per token:

    - `word_ids`: index of the word the token belongs to (word pieces of one word share it), -1 for special tokens,
      padding, punctuation and stop-words; words are numbered 0..M-1 in order within each text.
    - `sentence_ids`: index of the report sentence the token belongs to (sentence splitting of
      `plan_hf.data.split_sentences`), -1 for special tokens and padding.

    Call-time options follow transformers' processor conventions: flat (`max_length=64`, `pad_mode="center"`) or
    nested (`text_kwargs={...}`, `images_kwargs={...}`, not both for one option); the tokenizer's own init options
    (e.g. `padding="max_length"`) override this class's defaults. `max_length` (saved with the processor) applies
    when neither the call nor the tokenizer sets one.
    """

    valid_processor_kwargs = PlanProcessorKwargs
    # Defaults of the call-time options (overridden by the tokenizer's init options, then by the call's).
    text_kwargs = {"padding": True, "truncation": True, "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}
    return_word_ids = True
    return_sentence_ids = True

    def __init__(self, image_processor=None, tokenizer=None, max_length: int = 128, filter_stop_words: bool = True,
                 **kwargs):
        self.max_length = max_length
        self.filter_stop_words = filter_stop_words
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        **kwargs: Unpack[PlanProcessorKwargs],
    ) -> BatchFeature:
        if text is None and images is None:
            raise ValueError("PlanProcessor needs `text`, `images`, or both")
        options = self._merge_kwargs(PlanProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = options["text_kwargs"], options["images_kwargs"]
        return_tensors = (text_kwargs if text is not None else images_kwargs).pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)  # one conversion, of the joined batch, below
        data: dict[str, Any] = {}
        if text is not None:
            if text_kwargs.get("max_length") is None:
                text_kwargs["max_length"] = self.max_length
            data.update(self._encode_text(text, options["return_word_ids"], options["return_sentence_ids"],
                                          **text_kwargs))
        if images is not None:
            data.update(self.image_processor(images, **images_kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _encode_text(self, text: str | list[str], return_word_ids: bool, return_sentence_ids: bool,
                     **tokenizer_kwargs) -> dict[str, list]:
        texts = [text] if isinstance(text, str) else list(text)
        for index, item in enumerate(texts):
            if not isinstance(item, str):
                raise ValueError(f"text {index} of the batch is {type(item).__name__}, expected str")
        # Word and sentence ids come from the tokens' character offsets.
        keep_offsets = tokenizer_kwargs.pop("return_offsets_mapping", False)
        encoding = self.tokenizer(texts, return_offsets_mapping=True, **tokenizer_kwargs)
        offsets = encoding["offset_mapping"]
        data = {key: value for key, value in encoding.items() if keep_offsets or key != "offset_mapping"}
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

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names) + ["word_ids", "sentence_ids"] + list(
            self.image_processor.model_input_names
        )

    def to_dict(self) -> dict[str, Any]:
        return with_class_auto_map(self, super().to_dict())


__all__ = ["PlanProcessor", "PlanProcessorKwargs", "STOP_WORDS"]
