"""The package as a user gets it: the wheel, installed in a fresh virtual environment, runs the smoke pre-training and
an evaluation with its console scripts from outside the checkout; an exported model laid out in the Hugging Face
cache as the Hub's download writes it loads by its repo id, as remote code, where plan_hf cannot be imported."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPTS = ("plan-pretrain", "plan-demo", "plan-eval", "plan-finetune-classification",
                   "plan-finetune-detection", "plan-finetune-segmentation", "plan-finetune-report-generation",
                   "plan-export")


def run(command: list, cwd: Path, timeout: int = 300) -> str:
    """`command` with an environment that cannot see the checkout (no PYTHONPATH, a working directory outside)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel of this checkout; its dependencies are this environment's."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "plan_hf", source / "plan_hf", ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", root / "dist", source], cwd=root)
    (wheel,) = (root / "dist").glob("plan_hf-*.whl")

    env = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", env], cwd=root)
    python = env / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip())
    # torch, transformers, ... (and pip) from this environment, after the venv's own site-packages. A directory named
    # in a .pth file is not scanned for .pth files itself, so an editable install of plan_hf here stays invisible.
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed", wheel], cwd=root)
    return env


def test_the_wheel_holds_the_package_its_data_and_commands(venv):
    probe = ("import json, plan_hf, plan_hf.hub, plan_hf.cli.arguments as a; print(json.dumps([plan_hf.__file__, "
             "str(plan_hf.hub.TEMPLATE_PATH), plan_hf.hub.TEMPLATE_PATH.is_file(), a.shipped_configs()]))")
    module, template, template_exists, configs = json.loads(run([venv / "bin" / "python", "-c", probe],
                                                                cwd=venv.parent))
    assert Path(module).is_relative_to(venv) and Path(template).is_relative_to(venv), module  # not the checkout's
    assert template_exists and configs == ["demo", "mimic_cxr", "smoke"]
    for script in CONSOLE_SCRIPTS:
        assert (venv / "bin" / script).is_file(), script
    assert "--micro_batch_size" in run([venv / "bin" / "plan-finetune-detection", "--help"], cwd=venv.parent)


def test_installed_commands_pretrain_and_evaluate_outside_the_checkout(venv):
    work = venv.parent / "work"
    work.mkdir()
    run([venv / "bin" / "plan-pretrain", "--config", "smoke", "--data_dir", "data", "--output_dir", "run",
         "--max_steps", "2", "--progress_bar", "false", "--threads", "1"], cwd=work)
    model = work / "run" / "model"
    assert json.loads((model / "plan_training_config.json").read_text())["steps_trained"] == 2
    card = (model / "README.md").read_text()
    assert "pipeline_tag: zero-shot-image-classification" in card and "## Objectives" in card  # the packaged template
    printed = run([venv / "bin" / "plan-eval", "--model_name_or_path", model, "--suite", "synthetic", "--data_dir",
                   "data", "--output_dir", "eval", "--split", "train", "--n_boot", "10", "--no_progress",
                   "--threads", "1"], cwd=work)
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert {"zero_shot", "retrieval", "grounding"} <= set(metrics) and "wrote eval/metrics.json" in printed
    assert 0.0 <= metrics["retrieval"]["i2t_recall@10"] <= 1.0


# --------------------------------------------------------------------------------------------------------------------
# Loading by repo id from the Hugging Face cache
# --------------------------------------------------------------------------------------------------------------------
def lay_out_in_hub_cache(folder: Path, cache: Path, repo_id: str, commit: str) -> Path:
    """`folder` as huggingface_hub's download leaves a model repo in HF_HUB_CACHE: blobs/ named by content hash,
    refs/main holding the commit, snapshots/<commit>/ of relative links to the blobs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for directory in (repo / "blobs", repo / "refs", snapshot):
        directory.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            blob = hashlib.sha256(data).hexdigest()
            (repo / "blobs" / blob).write_bytes(data)
            link = snapshot / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    return repo


HUB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["plan_hf"] = None  # `import plan_hf` (and of any plan_hf.*) raises ImportError in this process
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline
    repo_id, work = sys.argv[1], sys.argv[2]
    model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
    assert not [name for name in sys.modules if name.startswith("plan_hf.")], "plan_hf was imported"
    assert type(model).__module__.startswith("transformers_modules"), type(model)
    data = np.load(work + "/inputs.npz")
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(data[k]) for k in data.files}).logits_per_image
    image = Image.fromarray(data["image"])
    labels = json.loads(sys.argv[3])
    result = {"logits": logits.tolist(), "processor": type(processor).__name__}
    classifier = pipeline("zero-shot-image-classification", model=model, tokenizer=processor.tokenizer,
                          image_processor=processor.image_processor)  # as the model card shows
    result["scores"] = {r["label"]: r["score"] for r in classifier(image, candidate_labels=labels, hypothesis_template="{}")}
    try:  # the pipeline from the repo id alone
        by_id = pipeline("zero-shot-image-classification", model=repo_id, trust_remote_code=True)
        result["scores_by_id"] = {r["label"]: r["score"]
                                  for r in by_id(image, candidate_labels=labels, hypothesis_template="{}")}
    except Exception as error:
        result["by_id_error"] = f"{type(error).__name__}: {error}"[:500]
    (open(work + "/remote.json", "w")).write(json.dumps(result))
    """
)
LABELS = ["small left pleural effusion", "right apical pneumothorax"]


@pytest.fixture(scope="module")
def loaded_by_repo_id(tmp_path_factory, processor, tokenizer):
    """(the local model, its inputs, what a process without plan_hf computed from "user/plan-cxr" in the cache)."""
    from huggingface_hub import scan_cache_dir

    from plan_hf import PlanModel
    from plan_hf.hub import export_pretrained
    from plan_hf.tiny import tiny_plan_config
    from tests.conftest import synthetic_xray

    work = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    model = PlanModel(tiny_plan_config(vocab_size=len(tokenizer), image_size=64)).eval()
    folder = export_pretrained(model, processor, work / "export", base_models=[None, None])
    cache, commit = work / "hub", "4c1d3b0e6f2a9d8c7b6a5f4e3d2c1b0a99887766"
    lay_out_in_hub_cache(folder, cache, "user/plan-cxr", commit)
    (cached,) = scan_cache_dir(cache).repos  # huggingface_hub reads the layout back as a complete repo
    assert cached.repo_id == "user/plan-cxr" and [r.commit_hash for r in cached.revisions] == [commit]
    assert cached.nb_files == sum(1 for path in folder.rglob("*") if path.is_file())

    image = synthetic_xray(3)
    inputs = processor(text=LABELS, images=[image], return_tensors="pt")
    np.savez(work / "inputs.npz", image=image, **{k: v.numpy() for k, v in inputs.items()})
    (work / "remote.py").write_text(HUB_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_MODULES_CACHE": str(work / "modules"),
           "HOME": str(work), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(work / "remote.py"), "user/plan-cxr", str(work), json.dumps(LABELS)],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    with torch.no_grad():
        local = model(**inputs).logits_per_image  # (1 image, 2 texts)
    return local, json.loads((work / "remote.json").read_text())


def test_auto_model_processor_and_pipeline_load_by_repo_id(loaded_by_repo_id):
    local, remote = loaded_by_repo_id
    assert remote["processor"] == "PlanProcessor"
    np.testing.assert_allclose(remote["logits"], local.numpy(), rtol=1e-5, atol=1e-6)
    expected = torch.softmax(local[0], dim=-1).tolist()
    np.testing.assert_allclose([remote["scores"][label] for label in LABELS], expected, rtol=1e-5, atol=1e-6)


def test_zero_shot_pipeline_loads_by_repo_id_alone(loaded_by_repo_id):
    local, remote = loaded_by_repo_id
    assert "by_id_error" not in remote, remote.get("by_id_error")
    expected = torch.softmax(local[0], dim=-1).tolist()
    np.testing.assert_allclose([remote["scores_by_id"][label] for label in LABELS], expected, rtol=1e-5, atol=1e-6)
