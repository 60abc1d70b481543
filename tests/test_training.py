"""training.pretrain end to end (2 processes, export loads), its config parsing, and the non-finite guard."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from plan_hf.cli.arguments import CONFIG_DIR
from plan_hf.training.config import ConfigError, PretrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = CONFIG_DIR / "smoke.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from plan_hf.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, 24, seed=0, image_size=64, workers=1, contact_sheet=False)
    return root


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator (accelerate keeps process-wide singletons), on one thread:
    as the subprocesses (OMP_NUM_THREADS=1), so their numbers match, and fast on a shared machine (two OpenMP
    threads on two busy cores run small convolutions ~20x slower than one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def smoke_args(data_dir, output_dir, **overrides) -> list[str]:
    args = ["--config", str(SMOKE), "--data_dir", str(data_dir), "--output_dir", str(output_dir),
            "--progress_bar", "false"]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return args


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_process_command(data_dir, output_dir, **overrides) -> list[str]:
    """`accelerate launch` of `training.pretrain` on 2 CPU processes (gloo) with the smoke config."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "training.pretrain",
            *smoke_args(data_dir, output_dir, **overrides)]


def signal_tree(pid: int, signum: int, launcher: bool = True) -> None:
    """Send `signum` to every process `pid` started (torchrun's workers have sessions of their own) and, with
    `launcher`, to `pid` itself; those already gone are passed over."""
    root = psutil.Process(pid)
    for process in [*root.children(recursive=True), *([root] if launcher else [])]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def run_to_end(command: list[str], timeout: float = 300) -> str:
    """Run `command` (in `subprocess_env()`) to its end and return its stderr; a failure fails the test with the
    stderr's tail. Past `timeout` seconds every process it started gets SIGABRT, on which faulthandler prints each
    thread's Python stack: a hung collective or read names itself in the failure instead of only the time."""
    process = subprocess.Popen(command, cwd=REPO, env={**subprocess_env(), "PYTHONFAULTHANDLER": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        stderr = process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        signal_tree(process.pid, signal.SIGABRT, launcher=False)
        time.sleep(3)
        signal_tree(process.pid, signal.SIGKILL)
        stderr = process.communicate()[1]
        pytest.fail(f"the run did not end in {timeout} s; its processes' stacks (SIGABRT):\n{stderr[-12000:]}")
    assert process.returncode == 0, stderr[-4000:]
    return stderr


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------
def test_config_file_then_flags_typed_and_checked():
    config = load_config(SMOKE, ["--learning-rate", "1e-4", "--model.local_loss_weight", "0.5", "--dry-run",
                                 "--push_to_hub", "me/plan", "--max_steps", "7", "--card_base_models", "[a/b, null]"])
    assert config.learning_rate == 1e-4 and isinstance(config.learning_rate, float)
    assert config.max_steps == 7 and config.micro_batch_size == 4  # a flag wins; the file's other values stay
    assert config.model["local_loss_weight"] == 0.5 and config.model["projection_dim"] == 16  # merged, not replaced
    assert config.dry_run is True and config.push_to_hub == "me/plan" and config.card_base_models == ["a/b", None]
    assert config.cross_sample_chunk_size == 4 and config.local_warmup_steps == 0  # smoke.yaml's, and the default
    assert load_config("smoke") == load_config(SMOKE)  # a shipped config by name
    assert PretrainConfig().cross_sample_chunk_size == 16 and PretrainConfig().pcma_chunk_size == 64


def test_bad_keys_and_values_are_named(tmp_path):
    for flags, message in [
        (["--learning_rat", "0.1"], "unrecognized arguments: --learning_rat"),
        (["--micro_batch_size", "four"], "argument --micro_batch_size.*invalid int value: 'four'"),
        (["--model.local_weight", "1"], "unknown key model.local_weight"),
        (["--mixed_precision", "fp8"], "argument --mixed_precision.*invalid choice: 'fp8'"),
        (["--image_mean", "[0.5, x]"], "argument --image_mean"),
        (["--micro_batch_size", "0"], "micro_batch_size must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(SMOKE, flags)
    for text, message in [
        ("learning_rat: 0.1\n", "bad.yaml: unknown key 'learning_rat'"),
        ("epochs: two\n", "epochs: expected int, got 'two'"),
        ("model:\n  local_warmup_steps: 5\n", "bad.yaml: key model.local_warmup_steps is now local_warmup_steps"),
        ("model:\n  pcma_chunk_size: 8\n", "key model.pcma_chunk_size is now pcma_chunk_size"),
        ("- a list\n", "expected a mapping"),
    ]:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="--model.cross_sample_chunk_size is now --cross_sample_chunk_size"):
        load_config(SMOKE, ["--model.cross_sample_chunk_size", "8"])
    with pytest.raises(ConfigError, match="model.local_warmup_steps is now a top-level pre-training argument"):
        PretrainConfig(model={"local_warmup_steps": 3})
    with pytest.raises(ConfigError, match="model.num_refinement_stages was renamed: use model.local_num_stages"):
        load_config(SMOKE, ["--model.num_refinement_stages", "2"])
    with pytest.raises(ConfigError, match="model.content_contrast_weight was removed"):
        PretrainConfig(model={"content_contrast_weight": 1.0})
    with pytest.raises(ConfigError, match="no shipped config of that name.*--config smoke"):
        load_config("training/configs/smoke.yaml")  # the configs' place before they shipped with the package


def test_json_file_and_lone_positional_file(tmp_path):
    from plan_hf.training.config import parse_args, save_config

    (tmp_path / "run.json").write_text(json.dumps({"micro_batch_size": 3, "model": {"projection_dim": 8}}))
    config = parse_args([str(tmp_path / "run.json"), "--model.projection_dim", "12", "--local_warmup_steps", "9"])
    assert (config.micro_batch_size, config.model, config.local_warmup_steps) == (3, {"projection_dim": 12}, 9)
    save_config(config, tmp_path / "saved.yaml")  # what a run writes to <output_dir>/config.yaml reads back
    assert load_config(tmp_path / "saved.yaml") == config


def test_runtime_knobs_reach_the_model(make_model):
    from plan_hf.training.build import configure_runtime

    from types import SimpleNamespace

    from plan_hf.training.loop import Pretrainer

    model = make_model(local_loss_weight=2.0, pcma_loss_weight=1.0)
    configure_runtime(model, PretrainConfig(cross_sample_chunk_size=3, pcma_chunk_size=5, gradient_checkpointing=True))
    assert (model.local_alignment.chunk_size, model.pathology_extractor.chunk_size) == (3, 5)
    assert model.local_alignment.checkpoint_chunks
    assert "cross_sample_chunk_size" not in model.config.to_dict()  # a compute knob, not saved with the model
    # the warm-up: the loop scales lambda_l linearly over local_warmup_steps optimizer steps
    for step, scale in ((0, 0.0), (5, 0.5), (10, 1.0), (50, 1.0)):
        loop = SimpleNamespace(config=PretrainConfig(local_warmup_steps=10), progress=SimpleNamespace(global_step=step))
        assert Pretrainer.local_loss_scale(loop) == pytest.approx(scale)
    assert Pretrainer.local_loss_scale(SimpleNamespace(config=PretrainConfig(), progress=SimpleNamespace(
        global_step=0))) == 1.0


def test_preset_then_model_overrides():
    from plan_hf import presets
    config = PretrainConfig(preset="global", model={"projection_dim": 8})
    assert config.plan_config_kwargs() == {**presets.PRESETS["global"], "projection_dim": 8}
    config = PretrainConfig(preset="plan", model={"local_loss_weight": 0.25})
    assert config.plan_config_kwargs()["local_loss_weight"] == 0.25
    with pytest.raises(ConfigError, match="preset must be one of"):
        PretrainConfig(preset="nope").plan_config_kwargs()


def test_shipped_configs_parse():
    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {path.stem for path in paths} == {"smoke", "demo", "mimic_cxr"}
    for path in paths:
        config = load_config(path.stem)
        assert config.per_process_batch_size >= 1, path


# --------------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------------
def test_two_process_smoke_run_exports_a_loadable_model(data_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): trains, checkpoints, exports; the export loads."""
    from transformers import AutoModel

    from plan_hf import PlanModel, PlanProcessor

    out = tmp_path / "run"
    run_to_end(two_process_command(data_dir, out))

    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["samples_seen"] == 4 * 8 * 2  # 2 processes x 8 samples per step
    settings = json.loads((out / "model" / "plan_training_config.json").read_text())
    assert settings["num_processes"] == 2 and settings["global_batch_size"] == 16
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    log = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("loss_global" in r and "loss_local" in r for r in log)

    model = AutoModel.from_pretrained(out / "model")
    processor = PlanProcessor.from_pretrained(out / "model")
    assert isinstance(model, PlanModel)
    checkpoint = load_file(out / "checkpoints" / "step-00000004" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, checkpoint[name], msg=name)  # the export is the last checkpoint's model
    from tests.conftest import synthetic_xray

    batch = processor(text=["Small left pleural effusion."], images=[synthetic_xray(0)], return_tensors="pt")
    with torch.no_grad():
        output = model(**batch)
    assert torch.isfinite(output.loss)


@pytest.fixture
def nonfinite_steps(monkeypatch) -> set[int]:
    """The optimizer steps (numbered from 1, as the logs count them) whose batch gets NaN pixels: the guard's input,
    injected from outside the loop."""
    from plan_hf.training.loop import Pretrainer

    steps: set[int] = set()
    train_step = Pretrainer.train_step

    def poisoned(self, batch):
        if self.progress.global_step + 1 in steps:
            batch = dict(batch, pixel_values=torch.full_like(batch["pixel_values"], float("nan")))
        return train_step(self, batch)

    monkeypatch.setattr(Pretrainer, "train_step", poisoned)
    return steps


def test_nonfinite_step_is_skipped_and_logged(data_dir, tmp_path, nonfinite_steps):
    from training.pretrain import main

    out = tmp_path / "run"
    nonfinite_steps.add(1)
    main(smoke_args(data_dir, out, max_steps=3, export=False))
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if r.get("event") == "nonfinite_loss"]
    assert events == [{"step": 1, "event": "nonfinite_loss", "consecutive": 1, "nonfinite_steps": 1}]
    assert records[-1]["nonfinite_steps"] == 1 and all(torch.tensor(r["loss"]).isfinite()
                                                       for r in records if "loss" in r)
    assert json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())["nonfinite_steps"] == 1


def test_consecutive_nonfinite_steps_stop_the_run(data_dir, tmp_path, nonfinite_steps):
    from plan_hf.training.loop import NonFiniteLossError
    from training.pretrain import main

    nonfinite_steps.update({1, 2})
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps had a non-finite loss.*max_consecutive_nonfinite=2"):
        main(smoke_args(data_dir, tmp_path / "run", max_consecutive_nonfinite=2, max_steps=4, export=False))


def test_skipped_step_changes_nothing(tokenizer, batch):
    """Single micro-batch path (the NaN loss is backpropagated for DDP's sake): no update, no gradient left, no
    optimizer state, BatchNorm statistics untouched; the counter counts."""
    from accelerate import Accelerator
    from transformers import get_constant_schedule

    from plan_hf import PlanModel
    from plan_hf.tiny import tiny_plan_config
    from plan_hf.training.loop import Pretrainer

    accelerator = Accelerator(cpu=True)
    model = PlanModel(tiny_plan_config(vocab_size=len(tokenizer), image_size=64)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = PretrainConfig(accumulation_steps=1, micro_batch_size=4, max_consecutive_nonfinite=2,
                            output_dir="unused", log_with="none")
    trainer = Pretrainer(accelerator, model, optimizer, get_constant_schedule(optimizer), None, None, config, 10)
    trainer.log.enabled = False
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "word_ids")}
    state = {k: v.clone() for k, v in model.state_dict().items()}  # parameters and buffers

    poisoned = dict(inputs, pixel_values=torch.full_like(inputs["pixel_values"], float("nan")))
    assert trainer.train_step(poisoned) is None
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], msg=name)
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state
    assert trainer.consecutive_nonfinite == 1 and trainer.progress.nonfinite_steps == 1

    trainer.progress.global_step = 1  # a finite step resets the run of non-finite ones and updates the weights
    assert trainer.train_step(inputs) is not None and trainer.consecutive_nonfinite == 0
    assert not torch.equal(model.text_projection.weight, state["text_projection.weight"])


def test_each_tower_gets_its_own_learning_rate(make_model):
    from plan_hf.training.build import build_optimizer, build_scheduler

    model = make_model()
    config = PretrainConfig(learning_rate=1e-3, text_tower_learning_rate=2e-5, warmup_steps=2, lr_scheduler="linear")
    optimizer = build_optimizer(config, model)
    by_parameter = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert len(by_parameter) == len(named)  # every parameter in exactly one group
    for name, parameter in named.items():
        group = by_parameter[id(parameter)]
        assert group["lr"] == (2e-5 if name.startswith("text_model.") else 1e-3), name
        assert group["weight_decay"] == (config.weight_decay if parameter.ndim >= 2 else 0.0), name
    # The schedule scales every group by the same factor: the towers keep their ratio through warm-up and decay.
    scheduler = build_scheduler(config, optimizer, total_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates["text_tower"] / rates["heads"] == pytest.approx(2e-5 / 1e-3)
    assert rates["heads"] == pytest.approx(1e-3 * 6 / 8)  # linear decay: (10 - 4) / (10 - 2)
    assert rates["vision_tower"] == rates["heads"]
    with pytest.raises(ConfigError, match="text_tower_learning_rate"):
        PretrainConfig(text_tower_learning_rate=0.0)
