"""The README's usage examples run as written (offline, tiny towers)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README should show the quick start and the pipeline"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["heatmap"].shape == (96, 80)
    assert (tmp_path / "my-plan" / "model.safetensors").exists()
    scores = namespace["clf"](namespace["Image"].fromarray(namespace["images"][0]), candidate_labels=["a", "b"], hypothesis_template="{}")
    assert abs(sum(s["score"] for s in scores) - 1) < 1e-5
