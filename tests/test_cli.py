"""The one command-line system: every entry point's --help, one name per idea across entry points, old spellings
named in the errors, a config file under the flags, --threads."""

import dataclasses
import importlib

import pytest
import torch

from plan_hf.cli.arguments import (
    ConfigError,
    DataArguments,
    HubArguments,
    ModelArguments,
    OptimisationArguments,
    RunArguments,
    RuntimeArguments,
    parse,
)
from plan_hf.cli.demo import DemoArguments
from plan_hf.cli.eval import EvalArguments
from plan_hf.cli.export import ExportArguments
from plan_hf.cli.finetune import (
    ClassificationArguments,
    DetectionArguments,
    ReportGenerationArguments,
    SegmentationArguments,
)
from plan_hf.training.config import PretrainConfig

# entry point module -> (its `main`, its arguments)
ENTRY_POINTS = {
    "training.pretrain": PretrainConfig,
    "training.demo": DemoArguments,
    "eval.run": EvalArguments,
    "training.finetune_classification": ClassificationArguments,
    "training.finetune_detection": DetectionArguments,
    "training.finetune_segmentation": SegmentationArguments,
    "training.finetune_report_generation": ReportGenerationArguments,
    "training.export": ExportArguments,
}
GROUPS = (RuntimeArguments, RunArguments, DataArguments, ModelArguments, OptimisationArguments, HubArguments)


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_every_entry_point_has_help(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--threads" in text and "--config" in text
    for item in dataclasses.fields(ENTRY_POINTS[module]):
        assert f"--{item.name}" in text, (module, item.name)


def test_one_name_per_idea():
    """An idea every entry point shares comes from one group; the spellings it replaced are gone everywhere."""
    def own_fields(group):
        inherited = {f.name for base in group.__bases__ if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
        return {f.name for f in dataclasses.fields(group)} - inherited

    group_fields = {group: own_fields(group) for group in GROUPS}
    old_spellings = {"out", "data", "model_dir", "batch_size", "use_cpu", "private", "num_images"}
    for module, arguments in ENTRY_POINTS.items():
        names = {f.name for f in dataclasses.fields(arguments)}
        assert "threads" in names, module
        assert not names & old_spellings, (module, names & old_spellings)
        for group, fields in group_fields.items():
            # an entry point that has one idea of a group has the group (the demo passes --epochs on to pre-training)
            if names & fields and (module, group) != ("training.demo", OptimisationArguments):
                assert issubclass(arguments, group) and fields <= names, (module, group.__name__)
    # the same flag reads the same way wherever it is accepted
    for name in ("output_dir", "seed", "data_dir", "model_name_or_path", "micro_batch_size", "max_steps"):
        kinds = {str(arguments.__dataclass_fields__[name].type) for arguments in ENTRY_POINTS.values()
                 if name in arguments.__dataclass_fields__}
        assert len(kinds) == 1 or name == "max_steps", (name, kinds)


@pytest.mark.parametrize(("module", "old", "new"), [
    ("eval.run", "--batch-size", "--eval_batch_size"),
    ("eval.run", "--out", "--output_dir"),
    ("training.finetune_detection", "--batch-size", "--micro_batch_size"),
    ("training.finetune_classification", "--use-cpu", "--cpu"),
    ("training.finetune_report_generation", "--data", "--data_dir"),
    ("training.export", "--model-dir", "--model_name_or_path"),
    ("training.demo", "--num-images", "--synthetic_num_images"),
    ("training.pretrain", "--model.local_warmup_steps", "--local_warmup_steps"),
])
def test_old_spellings_name_the_new_ones(module, old, new):
    main = importlib.import_module(module).main
    with pytest.raises(ConfigError, match=f"{old.replace('-', '[-_]')} is now {new}"):
        main([old, "1"])


def test_fine_tuning_config_of_old_names_the_architecture_flag():
    from training.finetune_segmentation import main

    with pytest.raises(ConfigError, match="no shipped config of that name.*--config_name tiny-resnet"):
        main(["--model_name_or_path", "random", "--config", "tiny-resnet"])
    with pytest.raises(ConfigError, match="random needs --config_name"):
        main(["--model_name_or_path", "random", "--dataset", "siim", "--data_dir", "d", "--output_dir", "o"])


def test_command_line_errors_exit_with_the_usage(monkeypatch, capsys):
    from plan_hf.cli.eval import main

    monkeypatch.setattr("sys.argv", ["plan-eval", "--suite", "nope"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: plan-eval") and "argument --suite: invalid choice: 'nope'" in err


def test_config_file_under_flags_for_any_entry_point(tmp_path):
    (tmp_path / "eval.yaml").write_text("model_name_or_path: runs/x/model\nsuite: ms-cxr\ndata_dir: d\n"
                                        "output_dir: o\ngrounding_methods: [local]\n")
    args = parse(EvalArguments, ["--config", str(tmp_path / "eval.yaml"), "--output_dir", "elsewhere"], prog="t")
    assert (args.model_name_or_path, args.suite, args.output_dir, args.grounding_methods) == (
        "runs/x/model", "ms-cxr", "elsewhere", ["local"])
    (tmp_path / "eval.yaml").write_text("suite: mri\n")
    with pytest.raises(ConfigError, match="suite: expected one of"):
        parse(EvalArguments, ["--config", str(tmp_path / "eval.yaml")], prog="t")
    with pytest.raises(ConfigError, match="required: --model_name_or_path"):
        parse(EvalArguments, ["--suite", "rsna", "--data_dir", "d", "--output_dir", "o"], prog="t")


def test_threads_sets_torch_threads():
    threads = torch.get_num_threads()
    try:
        args = parse(RuntimeArguments, ["--threads", "1"], prog="t")
        assert args.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
