"""An exported processor loads with `trust_remote_code` in an environment holding only torch, transformers, safetensors,
pillow, numpy and what they depend on: no pydicom (only DICOM input needs it) and no plan_hf.

The environment is a fresh virtual environment whose one `.pth` file points at a directory of links to just those
distributions of the running interpreter's environment (nothing is installed or downloaded).
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from plan_hf import PlanImageProcessor, PlanProcessor
from plan_hf.tiny import build_tokenizer
from tests.conftest import REPORTS

ALLOWED_DISTRIBUTIONS = ("torch", "transformers", "safetensors", "pillow", "numpy")

# Run by the clean environment's interpreter: argv[1] is the exported folder.
LOAD_SCRIPT = """
import importlib.util, json, sys
import numpy as np
from transformers import AutoProcessor

present = [name for name in ("pydicom", "plan_hf") if importlib.util.find_spec(name) is not None]
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
image = np.arange(40 * 60, dtype=np.uint16).reshape(40, 60)
out = processor(text=["Left apical pneumothorax. Heart size is normal."], images=[image], return_tensors="np")
try:
    processor(images=[bytes(128) + b"DICM" + bytes(64)])
    dicom_error = None
except ImportError as err:
    dicom_error = str(err)
print(json.dumps({"present": present, "class": type(processor).__module__ + "." + type(processor).__name__,
                  "outputs": {key: value.tolist() for key, value in out.items()}, "dicom_error": dicom_error}))
"""


def distribution_closure(names) -> list[importlib.metadata.Distribution]:
    """The installed distributions `names` need, themselves included (requirements without extras, markers applied)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = list(names)
    while pending:
        name = pending.pop()
        key = name.lower().replace("_", "-")
        if key in found:
            continue
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional platform requirement that is not installed here
        found[key] = distribution
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return list(found.values())


def clean_environment(root: Path) -> Path:
    """A virtual environment that sees only ALLOWED_DISTRIBUTIONS and their requirements; returns its python."""
    links = root / "site"
    links.mkdir()
    for distribution in distribution_closure(ALLOWED_DISTRIBUTIONS):
        tops = {Path(file).parts[0] for file in distribution.files or [] if not str(file).startswith("..")}
        for top in tops:
            source = Path(distribution.locate_file(top))
            if source.exists() and not (links / top).exists() and top != "__pycache__":
                (links / top).symlink_to(source)
    environment = root / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(environment)
    python = environment / "bin" / "python"
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    (Path(site_packages) / "allowed.pth").write_text(f"{links}\n")
    return python


@pytest.mark.skipif(sys.platform == "win32", reason="the clean environment is built with symbolic links")
def test_exported_processor_loads_without_pydicom_or_the_package(tmp_path):
    processor = PlanProcessor(PlanImageProcessor(size=32), build_tokenizer(REPORTS), max_length=24)
    export = tmp_path / "export"
    processor.save_pretrained(export)
    assert {"processing_plan.py", "image_processing_plan.py", "sentences_plan.py"} <= {p.name for p in export.iterdir()}

    python = clean_environment(tmp_path)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([python, "-c", LOAD_SCRIPT, str(export)], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["present"] == []  # neither pydicom nor plan_hf: the class came from the exported code
    assert report["class"].startswith("transformers_modules.") and report["class"].endswith(".PlanProcessor")
    assert "needs pydicom" in report["dicom_error"]
    image = np.arange(40 * 60, dtype=np.uint16).reshape(40, 60)
    expected = processor(text=["Left apical pneumothorax. Heart size is normal."], images=[image], return_tensors="np")
    assert set(report["outputs"]) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(np.asarray(report["outputs"][key]), value, rtol=1e-6, atol=1e-6)
