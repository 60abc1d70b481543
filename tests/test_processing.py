"""PlanProcessor's word_ids / sentence_ids, its save/load, and phrase grounding onto the original image."""

import json

import numpy as np
import pytest
import torch

from plan_hf import PlanProcessor
from plan_hf.grounding import ground_phrase, ground_phrases, render_heatmap
from tests.conftest import synthetic_xray


def tokens_of(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens(ids)


def test_word_ids_pool_word_pieces_and_skip_stop_words(processor):
    out = processor(text=["No pneumomediastinum in the right lower lobe."], return_tensors="pt")
    tokens = tokens_of(processor, out["input_ids"][0].tolist())
    word_ids = out["word_ids"][0].tolist()
    words: dict[int, list[str]] = {}
    for token, word in zip(tokens, word_ids):
        if word >= 0:
            words.setdefault(word, []).append(token)
    # "no", "in", "the" and "." carry no place; the unknown word is split into pieces that share one id
    assert [("".join(t.replace("##", "") for t in pieces)) for _, pieces in sorted(words.items())] == [
        "pneumomediastinum", "right", "lower", "lobe"]
    assert len(words[0]) > 1
    assert word_ids[0] == -1 and word_ids[-1] == -1  # [CLS], [SEP]


def test_sentence_ids_follow_report_sentences(processor):
    text = ["Heart size is normal. Small left effusion, 1.5 cm. No pneumothorax.", "Lungs are clear."]
    out = processor(text=text, return_tensors="pt")
    tokens = tokens_of(processor, out["input_ids"][0].tolist())
    sentence_ids = out["sentence_ids"][0].tolist()
    by_sentence: dict[int, list[str]] = {}
    for token, sid in zip(tokens, sentence_ids):
        if sid >= 0:
            by_sentence.setdefault(sid, []).append(token)
    assert sorted(by_sentence) == [0, 1, 2]  # the decimal does not split a sentence
    assert "heart" in by_sentence[0] and "effusion" in by_sentence[1] and "pneumothorax" in by_sentence[2]
    second = out["sentence_ids"][1]
    assert (second[out["attention_mask"][1] == 0] == -1).all()  # padding
    assert set(second[out["attention_mask"][1] == 1].tolist()) == {-1, 0}


def test_text_only_image_only_and_both(processor):
    text_only = processor(text="Left apical pneumothorax.")
    assert {"input_ids", "attention_mask", "word_ids", "sentence_ids"} <= set(text_only) and "pixel_values" not in text_only
    image_only = processor(images=synthetic_xray(0))
    assert image_only["pixel_values"].shape == (1, 3, 64, 64) and "input_ids" not in image_only
    both = processor(text=["a", "b"], images=[synthetic_xray(0), synthetic_xray(1)])
    assert both["pixel_values"].shape[0] == both["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="text 1"):
        processor(text=["fine", 3])


def test_processor_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = PlanProcessor.from_pretrained(tmp_path)
    text, image = ["Right lower lobe consolidation. No effusion."], [synthetic_xray(2, 90, 50)]
    a, b = processor(text=text, images=image), loaded(text=text, images=image)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key])
    assert loaded.max_length == processor.max_length and loaded.filter_stop_words


def test_call_options_follow_transformers_processor_conventions(processor, tokenizer, tmp_path):
    text = ["Right lower lobe consolidation. No pneumothorax.", "Small left effusion."]
    flat = processor(text=text, max_length=6)
    nested = processor(text=text, text_kwargs={"max_length": 6})
    assert flat["input_ids"].shape == (2, 6)
    for key in flat:
        torch.testing.assert_close(nested[key], flat[key])
    assert flat["word_ids"].shape == flat["sentence_ids"].shape == (2, 6)  # the ids follow the truncated tokens
    with pytest.raises(ValueError, match="max_length was passed two times"):
        processor(text=text, max_length=6, text_kwargs={"max_length": 8})
    assert "word_ids" not in processor(text=text, return_word_ids=False)

    # The tokenizer's own init options outrank the processor's defaults (padding=True, its max_length).
    tokenizer.save_pretrained(tmp_path)
    padded = type(tokenizer).from_pretrained(tmp_path, padding="max_length", max_length=20)
    out = PlanProcessor(processor.image_processor, padded)(text=text)
    assert out["input_ids"].shape == out["word_ids"].shape == (2, 20)
    assert (out["word_ids"][out["attention_mask"] == 0] == -1).all()

    # Nested image lists (one per sample, possibly empty) are images in order; every output is a model input.
    images = [synthetic_xray(0), synthetic_xray(1, 70, 90)]
    both = processor(text=text, images=[[images[0]], [], [images[1]]])
    torch.testing.assert_close(both["pixel_values"], processor(images=images)["pixel_values"])
    assert set(both) == set(processor.model_input_names)


def test_saved_processor_names_its_code_and_reloads_equal(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_plan.PlanProcessor"}
    assert saved["image_processor"]["auto_map"] == {"AutoImageProcessor": "image_processing_plan.PlanImageProcessor"}
    loaded = PlanProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "processor_config.json").read_text()) == saved


def test_ground_phrase_maps_back_to_the_original_image(make_model, processor):
    model = make_model()
    image = synthetic_xray(5, height=120, width=70)  # tall: padding left and right
    heatmap = ground_phrase(model, processor, image, "right lower lobe consolidation")
    assert heatmap.shape == (120, 70) and np.isfinite(heatmap).all()
    assert heatmap.sum() == pytest.approx(1.0, rel=1e-4)
    # the same as mapping the model's grid map back by hand
    batch = processor(text=["right lower lobe consolidation"], images=[image])
    with torch.no_grad():
        grid = model.get_grounding_maps(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                        word_ids=batch["word_ids"]).heatmaps[0]
    by_hand = processor.image_processor.heatmap_to_original(grid.numpy(), (120, 70),
                                                            batch["content_boxes"][0].tolist())
    np.testing.assert_allclose(heatmap, by_hand / by_hand.sum(), rtol=1e-5)
    assert model.training is False
    several = ground_phrases(model, processor, [image, synthetic_xray(1)], ["effusion", "pneumothorax"], batch_size=1)
    np.testing.assert_allclose(several[0], ground_phrase(model, processor, image, "effusion"), rtol=1e-5)
    assert several[1].shape == (80, 64)
    picture = render_heatmap(image, heatmap, boxes=[(10, 20, 30, 40)])
    assert picture.size == (70, 120) and picture.mode == "RGB"
    assert tuple(picture.getpixel((10, 30))) == (0, 255, 0)  # the box outline
