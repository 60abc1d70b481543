"""Model card generation, the Hub-ready export folder, and the upload's dry run (no network)."""

import json

import pytest
import yaml

from plan_hf import PlanConfig, PlanModel
from plan_hf.hub import export_pretrained, push_to_hub, render_model_card, results_table
from plan_hf.tiny import tiny_plan_config

RESULTS = {"seed": 0, "zero_shot": {"auroc": 0.8125, "accuracy": 0.5, "ci": {"auroc": {"low": 0.7, "high": 0.9}},
                         "num_images": 33}, "retrieval": {"i2t": {"r@1": 0.25}}, "note": "text"}


def card_metadata(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


def objective_rows(text: str) -> dict[str, tuple[str, str]]:
    section = text.split("## Objectives")[1].split("##")[0]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    return {row[0]: (row[1], row[2]) for row in cells[1:]}


def test_card_metadata_objectives_training_and_results():
    config = tiny_plan_config(vocab_size=100, local_loss_weight=0.5, local_num_stages=2)
    training = {"preset": "plan", "learning_rate": 1e-3, "micro_batch_size": 4, "accumulation_steps": 2,
                "global_batch_size": 16, "not_a_card_row": 1}
    card = render_model_card(config, training, RESULTS, repo_id="me/plan-cxr",
                             base_models=["emilyalsentzer/Bio_ClinicalBERT", "microsoft/resnet-50"],
                             datasets=["mimic-cxr"], license="apache-2.0")
    text = str(card)
    meta = card_metadata(text)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    assert set(meta["tags"]) == {"medical-imaging", "chest-x-ray", "radiology", "contrastive-learning", "plan"}
    assert meta["datasets"] == ["mimic-cxr"]
    assert meta["base_model"] == ["emilyalsentzer/Bio_ClinicalBERT", "microsoft/resnet-50"]

    rows = objective_rows(text)
    assert rows["global (image-report InfoNCE)"] == ("yes", "1")
    assert rows["PLAN local (word-pixel alignment)"] == ("yes", "0.5")
    assert rows["PLACE PCMA (pathology-level alignment)"] == ("no", "0")
    assert "2 progressive stages" in text
    assert 'AutoModel.from_pretrained("me/plan-cxr", trust_remote_code=True)' in text
    assert "pipeline(\"zero-shot-image-classification\"" in text and "ground_phrase(" in text
    assert "reconstruction, not the authors' code" in text and "abstracts" in text
    assert "| learning_rate | 0.001 |" in text and "| global_batch_size | 16 |" in text
    assert "not_a_card_row" not in text
    assert "| zero_shot | auroc | 0.8125 |" in text and "| retrieval | i2t/r@1 | 0.25 |" in text
    results = text.split("## Results")[1]
    assert "note" not in results and "seed" not in results  # only headline numbers become rows
    assert "ci/" not in results and "num_images" not in results


def test_card_for_a_global_only_baseline_says_so():
    config = tiny_plan_config(vocab_size=100, local_loss_weight=0.0)
    text = str(render_model_card(config))
    rows = objective_rows(text)
    assert rows["PLAN local (word-pixel alignment)"] == ("no", "0")
    assert "global contrastive objective only" in text
    assert "No evaluation results" in text
    assert "base_model" not in card_metadata(text)  # towers from scratch


def test_results_table_flattens_nested_metrics():
    assert results_table({"a": {"b": 1, "c": {"d": 2.5}, "per_class": {"x": 1}}, "top": 3, "seconds": {"a": 1}}) == [
        {"task": "a", "metric": "b", "value": "1"},
        {"task": "a", "metric": "c/d", "value": "2.5"},
        {"task": "-", "metric": "top", "value": "3"},
    ]


@pytest.fixture
def exported(tmp_path, processor, tokenizer):
    model = PlanModel(tiny_plan_config(vocab_size=len(tokenizer), image_size=64))
    results = tmp_path / "metrics.json"
    results.write_text(json.dumps(RESULTS))
    folder = export_pretrained(model, processor, tmp_path / "model", training={"learning_rate": 0.01},
                               results_path=results, base_models=[None, None])
    return folder


def test_export_is_hub_ready_and_loads(exported):
    from transformers import AutoModel, AutoProcessor

    names = {path.name for path in exported.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "modeling_plan.py", "configuration_plan.py",
            "processing_plan.py", "image_processing_plan.py", "processor_config.json",
            "plan_training_config.json"} <= names
    assert not (exported.parent / ".tmp-model").exists()
    assert "auto_map" in json.loads((exported / "config.json").read_text())
    assert "| zero_shot | auroc | 0.8125 |" in (exported / "README.md").read_text()
    assert isinstance(AutoModel.from_pretrained(exported), PlanModel)
    assert type(AutoProcessor.from_pretrained(exported)).__name__ == "PlanProcessor"
    assert PlanConfig.from_pretrained(exported).model_type == "plan"


class RecordingApi:
    calls: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


def test_dry_run_lists_files_and_touches_no_network(exported, monkeypatch, capsys):
    import plan_hf.hub
    from training.export import main

    def no_network(*args, **kwargs):
        raise AssertionError("the dry run must not create an HfApi client")

    monkeypatch.setattr(plan_hf.hub, "HfApi", no_network)
    files = push_to_hub(exported, "me/plan-cxr", dry_run=True)
    sizes = dict(files)
    assert sizes["model.safetensors"] == (exported / "model.safetensors").stat().st_size > 0
    assert {"README.md", "modeling_plan.py", "tokenizer.json"} <= set(sizes)

    main(["--model_name_or_path", str(exported), "--push_to_hub", "me/plan-cxr", "--dry_run"])
    printed = capsys.readouterr().out
    assert f"would upload {len(files)} files" in printed and "model.safetensors" in printed
    assert 'from_pretrained("me/plan-cxr"' in (exported / "README.md").read_text()  # the card names the repo


def test_push_creates_the_repo_and_uploads_the_folder(exported, monkeypatch):
    import plan_hf.hub

    RecordingApi.calls = []
    monkeypatch.setattr(plan_hf.hub, "HfApi", RecordingApi)
    push_to_hub(exported, "me/plan-cxr", private=True)
    (create, repo, create_kwargs), (upload, repo2, upload_kwargs) = RecordingApi.calls
    assert (create, repo, create_kwargs["private"], create_kwargs["exist_ok"]) == ("create_repo", "me/plan-cxr", True, True)
    assert (upload, repo2, upload_kwargs["folder_path"]) == ("upload_folder", "me/plan-cxr", str(exported))
