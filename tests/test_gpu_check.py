"""benchmarks/gpu_check.py: its dry run (every section at tiny sizes on the CPU) writes sane figures to JSON and
markdown, a failing section is recorded while the others run, and its largest-batch search and peak table hold."""

import json
import math

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.common import largest_batch, peak_tflops_of, runs_without_oom


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add synchronisation on shared cores
    try:
        results = gpu_check.main(["--dry-run", "--out", str(out), "--peak-tflops", "1"])
    finally:
        torch.set_num_threads(threads)
    return out, results


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_section_succeeds_and_is_written(dry_run):
    out, results = dry_run
    written = json.loads((out / "gpu_check.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert list(written["sections"]) == list(gpu_check.SECTIONS)
    assert {name: s.get("error") for name, s in written["sections"].items()} == dict.fromkeys(gpu_check.SECTIONS)
    assert written["dry_run"] and written["device"] == "cpu" and written["peak_tflops"] == 1.0
    markdown = (out / "gpu_check.md").read_text()
    assert all(f"## {name}" in markdown for name in gpu_check.SECTIONS) and "failed" not in markdown


@pytest.mark.parametrize("section", ["steps_resnet", "steps_vit"])
def test_step_figures(dry_run, section):
    out, results = dry_run
    sizes = gpu_check.DRY_RUN
    result = results["sections"][section]["result"]
    rows = {(row["variant"], row["at"]): row for row in result["rows"]}
    assert set(rows) == {(variant, at) for variant in gpu_check.VARIANTS for at in ("base", "largest")}
    assert result["errors"] == {}
    for (variant, at), row in rows.items():
        assert all(positive(row[key]) for key in ("images_per_s", "step_s", "tflops_per_step", "mfu")), row
        assert math.isfinite(row["peak_gib"])
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["step_s"])
        assert row["mfu"] == pytest.approx(row["tflops_per_step"] / row["step_s"])  # --peak-tflops 1
        # on the CPU nothing runs out of memory: the doubling stops at the cap
        assert row["batch"] == (sizes.batch if at == "base" else sizes.max_batch)
        assert at == "base" or row["capped"]
    assert rows["global-only", "base"]["ratio_to_global"] == 1.0
    for at in ("base", "largest"):  # the local and PLACE terms add matmuls to the towers' FLOPs
        assert rows["PLAN 3 stages", at]["tflops_per_step"] > rows["global-only", at]["tflops_per_step"]
        assert rows["PLACE", at]["tflops_per_step"] > rows["global-only", at]["tflops_per_step"]
    markdown = (out / "gpu_check.md").read_text()
    assert f"| PLACE | {sizes.max_batch} (largest) = cap |" in markdown


def test_local_loss_and_profile(dry_run):
    _, results = dry_run
    local = results["sections"]["local_loss"]["result"]
    assert (local["batch"], local["words"], local["pixels"]) == gpu_check.DRY_RUN.loss_shape
    assert positive(local["fwd_bwd_ms"]) and math.isfinite(local["peak_gib"]) and local["stages"] == 3

    profile = results["sections"]["profile"]["result"]
    assert positive(profile["step_ms"]) and profile["time_base"] == "cpu"
    assert profile["top_ops"] and all(".py(" not in op["name"] and op["count"] >= 1 for op in profile["top_ops"])
    selfs = [op["self_ms"] for op in profile["top_ops"]]
    assert selfs == sorted(selfs, reverse=True)
    # PLAN 3 stages with top-mass sparsification sorts each word's pixel weights at every stage
    assert profile["sort_calls"] >= 3 and positive(profile["sort_ms"]) and 0 < profile["sort_share"] < 1
    assert set(profile["syncs"]) <= set(gpu_check.SYNC_OPS)
    assert sum(o["count"] for o in profile["sync_origins"]) == profile["sync_points"]
    assert all(o["where"].split(" in ")[0] in gpu_check.SYNC_OPS for o in profile["sync_origins"])


def test_pretraining_runs_the_demo_config_and_counts_its_steps(dry_run):
    out, results = dry_run
    run = results["sections"]["pretrain"]["result"]
    max_steps = int(gpu_check.DRY_RUN.pretrain_overrides[gpu_check.DRY_RUN.pretrain_overrides.index("--max_steps") + 1])
    assert run["config"] == "demo" and run["steps"] == max_steps
    assert run["logged_steps"] == [1, max_steps]
    logged = [json.loads(line) for line in (out / "pretrain" / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, max_steps + 1))
    assert {"loss", "loss_global", "loss_local"} <= set(run["first"]) == set(run["last"]) == set(run["fell"])
    assert all(math.isfinite(v) for v in [*run["first"].values(), *run["last"].values()])
    assert run["fell"] == {k: run["last"][k] < run["first"][k] for k in run["first"]}
    assert 0 < run["data_wait_share"] < 1 and run["data_wait_s"] + run["step_s"] == pytest.approx(run["loop_s"])
    assert run["samples_per_s"] == pytest.approx(max_steps * run["batch"] / run["loop_s"])


def test_a_failing_section_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("forced failure")

    monkeypatch.setitem(gpu_check.SECTIONS, "profile", broken)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the pre-training clock at 0 s: it stops after its first step
        gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "profile", "pretrain",
                        "--pretrain-seconds", "0"])
    finally:
        torch.set_num_threads(threads)
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert list(sections) == ["profile", "pretrain"]
    assert not sections["profile"]["ok"] and sections["profile"]["error"] == "RuntimeError: forced failure"
    assert "forced failure" in sections["profile"]["traceback"]
    assert sections["pretrain"]["ok"] and sections["pretrain"]["result"]["steps"] == 1
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "**failed**" in markdown and "RuntimeError: forced failure" in markdown and "## pretrain" in markdown


def test_largest_batch_doubles_until_out_of_memory():
    tried = []

    def fits(batch: int) -> bool:
        def step():
            tried.append(batch)
            if batch > 300:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return runs_without_oom(step)

    assert largest_batch(fits, 64, bisect=False) == (256, False) and tried == [64, 128, 256, 512]
    assert largest_batch(fits, 64) == (300, False)
    assert largest_batch(fits, 64, cap=128) == (128, True)
    assert largest_batch(fits, 512) == (0, False)
    failures = []

    def cudnn_limit():
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                           "non-contiguous input.")

    assert not runs_without_oom(cudnn_limit, failures=failures)  # a library's size limit: too large as well
    assert failures == ["RuntimeError: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed "
                        "in a non-contiguous input."]
    for error in (ValueError("a bug"), RuntimeError("shapes cannot be multiplied")):  # not taken for a full memory
        def bug(error=error):
            raise error

        with pytest.raises(type(error), match=str(error)):
            runs_without_oom(bug)


def test_peaks_are_looked_up_by_the_device_name():
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_of("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_of("NVIDIA H200") == 989.0
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_of("Tesla T4") is None
