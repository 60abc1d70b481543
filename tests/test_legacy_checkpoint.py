"""A model saved in the 0.1 format (flat, unprefixed config fields; PLAN's parameters on the model itself) loads
into this version with the same outputs. The fixture was written by plan-hf 0.1 with reference outputs beside it."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from plan_hf import PlanConfig, PlanModel

FIXTURE = Path(__file__).parent / "fixtures" / "plan_v0_1"


def test_legacy_config_fields_map_to_their_new_names():
    config = PlanConfig.from_pretrained(FIXTURE)
    assert config.local_num_stages == 2 and config.local_region_keep_ratio == 0.7
    assert config.local_word_gate_floor == 0.3 and config.pcma_num_queries == 4 and config.pcma_decoder_layers == 1
    saved = config.to_dict()
    assert "num_refinement_stages" not in saved and "cross_sample_chunk_size" not in saved
    assert "local_warmup_steps" not in saved and "content_contrast_weight" not in saved


def test_legacy_checkpoint_gives_the_saved_outputs(tmp_path):
    reference = load_file(FIXTURE / "reference_outputs.safetensors")
    inputs = {k.removeprefix("input_"): v for k, v in reference.items() if k.startswith("input_")}
    model = PlanModel.from_pretrained(FIXTURE).eval()
    # the 0.1 weights are all read, under their new names
    torch.testing.assert_close(model.local_alignment.similarity_log_scale, torch.tensor(2.5))
    assert model.local_alignment.word_gate is not None

    def run(m):
        torch.manual_seed(1)  # the correlation proxy task draws its patch mask from the global RNG
        with torch.no_grad():
            out = m(**inputs)
            # 0.1's map was the last stage's regions (the dense map is the default since)
            maps = m.get_grounding_maps(**{k: v for k, v in inputs.items() if k != "sentence_ids"}, regions=True)
        return out, maps

    out, maps = run(model)
    for name in ("loss_global", "loss_local", "loss_pcma", "image_embeds", "text_embeds", "logits_per_image"):
        torch.testing.assert_close(getattr(out, name), reference[name], msg=name)
    torch.testing.assert_close(torch.stack(out.loss_local_stages), reference["loss_local_stages"])
    torch.testing.assert_close(maps.heatmaps, reference["heatmaps"])
    torch.testing.assert_close(maps.word_weights, reference["word_weights"])

    # re-saved, it is in this version's format and still the same model
    model.save_pretrained(tmp_path)
    saved_keys = set(load_file(tmp_path / "model.safetensors"))
    assert "local_alignment.similarity_log_scale" in saved_keys and "similarity_log_scale" not in saved_keys
    again, again_maps = run(PlanModel.from_pretrained(tmp_path).eval())
    torch.testing.assert_close(again.loss_local, reference["loss_local"])
    torch.testing.assert_close(again_maps.heatmaps, reference["heatmaps"])
