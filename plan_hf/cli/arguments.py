"""The command line of every entry point: `transformers.HfArgumentParser` over dataclasses, a YAML or JSON file
(`--config FILE`, a shipped config's name, or a lone positional .yaml/.json), and flags that override the file.

The argument groups below are shared, so an idea has one name in every entry point (`--output_dir`, `--seed`,
`--threads`, `--micro_batch_size`, ...); an entry point's dataclass inherits the groups it has and may redeclare a
field to give it its own default. A field's trailing `# comment` is its `--help` text. Bad input is a `ConfigError`
naming the key (on a real command line: argparse's usage line and exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from transformers import HfArgumentParser

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the configs users pass by name: `--config smoke`
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file or command-line flag; the message names the key."""


# --------------------------------------------------------------------------------------------------------------------
# Shared argument groups
# --------------------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RuntimeArguments:
    threads: int | None = None  # torch CPU threads (default: torch's choice)


@dataclass(kw_only=True)
class RunArguments(RuntimeArguments):
    output_dir: str  # where the run writes everything
    seed: int = 0  # data order, subsets and new weights


@dataclass(kw_only=True)
class DataArguments:
    data_dir: str  # the data set's folder


@dataclass(kw_only=True)
class SourceArguments:
    """Where image-report pairs come from (`plan_hf.data.sources`), with `data_dir`."""

    dataset: str = "mimic-cxr"  # mimic-cxr, csv, imagefolder, disk, parquet, arrow, or a datasets.load_dataset name
    image_column: str = "image"  # the image column (an Image() feature, a path under data_dir, or bytes)
    text_column: str | list[str] = "text"  # the text column, or several joined (e.g. [findings, impression])
    allow_outside_root: bool = False  # read image paths that lead outside the data folder (one's own lists)
    strict: bool = False  # a bad row (no image or text) is an error naming it, not skipped and counted


@dataclass(kw_only=True)
class ModelArguments:
    model_name_or_path: str  # a saved model folder (an export of plan-pretrain) or a Hub id


@dataclass(kw_only=True)
class OptimisationArguments:
    epochs: float = 10.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    micro_batch_size: int = 16  # samples per forward pass per process
    learning_rate: float | None = None  # peak learning rate (None: the entry point's default)
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.05  # fraction of the steps the learning rate warms up over
    num_workers: int = 0  # DataLoader worker processes (streaming: threads that decode the images ahead)
    cpu: bool = False  # force the CPU even when an accelerator is present


@dataclass(kw_only=True)
class HubArguments:
    eval_json: str | None = None  # metrics JSON (plan-eval's metrics.json) for the model card's results table
    push_to_hub: str | None = None  # a Hub repo id to upload the exported folder to
    hub_private: bool = False  # create the Hub repo private
    dry_run: bool = False  # with push_to_hub: list what would be uploaded, touch no network


# --------------------------------------------------------------------------------------------------------------------
# Type checking of values read from a file (argparse checks the flags)
# --------------------------------------------------------------------------------------------------------------------
def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def coerce(key: str, value: Any, kind: Any) -> Any:
    """`value` checked against the annotation `kind` (ints are accepted as floats); ConfigError naming `key`."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return coerce(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(kind)}, got {value!r}")
    if kind is type(None):
        if value is None:
            return None
    elif origin is Literal or (isinstance(kind, type) and issubclass(kind, Enum)):
        choices = list(typing.get_args(kind)) if origin is Literal else [member.value for member in kind]
        if value in choices:
            return value
        raise ConfigError(f"{key}: expected one of {choices}, got {value!r}")
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(kind) or (Any,)
            return [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif origin is dict or kind is dict:
        if isinstance(value, dict):
            return dict(value)
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(kind)}, got {value!r} ({type(value).__name__})")


def _plain(kind: Any) -> bool:
    """Whether argparse can read the annotation as HfArgumentParser does (else the flag's value is read as YAML)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(kind) if option is not type(None)]
        return len(options) == 1 and _plain(options[0])
    if origin is list:
        (item,) = typing.get_args(kind)
        return item in (str, int, float) or (isinstance(item, type) and issubclass(item, Enum))
    return kind in (str, int, float, bool) or origin is Literal or (isinstance(kind, type) and issubclass(kind, Enum))


def _read_yaml(key: str, text: str) -> Any:
    """A flag's value read as YAML (3, 0.5, true, null, [1, 2], {a: 1}); "" is null."""
    try:
        return yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--{key}: not a YAML value: {text!r} ({error})") from error


def _yaml_reader(key: str, kind: Any) -> Callable[[str], Any]:
    def read(text: str) -> Any:
        return coerce(key, _read_yaml(key, text), kind)

    read.__name__ = _type_name(kind)  # argparse names the type in its messages
    return read


def _comment_help(cls: type) -> dict[str, str]:
    """`name: type = default  # help` -> {name: help}, for the class and its bases (the nearest wins)."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        found.update((name, text.replace("%", "%%"))  # argparse %-formats help strings
                     for name, text in re.findall(r"^\s+(\w+):[^\n#]*#\s*(.+?)\s*$", source, flags=re.MULTILINE))
    return found


# --------------------------------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------------------------------
class ArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors raise ConfigError, with `--help` text from the fields' comments and YAML values
    for the annotations argparse cannot read (dicts, `float | list[float]`, lists of optional items)."""

    def __init__(self, dataclass_type: type, **kwargs) -> None:
        super().__init__(dataclass_type, allow_abbrev=False, **kwargs)
        self.add_argument("--config", metavar="FILE_OR_NAME", default=argparse.SUPPRESS,
                          help="a YAML/JSON file of these arguments (flags override it), or a shipped config's name: "
                               f"{', '.join(shipped_configs())}")

    def _add_dataclass_arguments(self, dtype: type) -> None:
        helps = _comment_help(dtype)
        for item in dataclasses.fields(dtype):
            if "help" not in item.metadata and item.name in helps:
                item.metadata = types.MappingProxyType({**item.metadata, "help": helps[item.name]})
        super()._add_dataclass_arguments(dtype)

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, item: dataclasses.Field) -> None:
        if _plain(item.type):  # HfArgumentParser's own handling of bool / Literal / Enum / list / Optional
            HfArgumentParser._parse_dataclass_field(parser, item)
            return
        default = (item.default if item.default is not dataclasses.MISSING else
                   item.default_factory() if item.default_factory is not dataclasses.MISSING else None)
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        names = [f"--{item.name}"] + ([f"--{item.name.replace('_', '-')}"] if "_" in item.name else [])
        parser.add_argument(*names, dest=item.name, type=_yaml_reader(item.name, item.type), default=default,
                            required=required, metavar="YAML", help=item.metadata.get("help"))

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def shipped_configs() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file's path: the file itself, or the shipped config of that name (`smoke`, `demo`, `mimic_cxr`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{path.name}.yaml" if path.suffix == "" else CONFIG_DIR / path.name
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    hint = ""
    if shipped.is_file():  # e.g. training/configs/smoke.yaml of an older checkout: the configs ship with plan_hf now
        hint = f"; the shipped config of that name is --config {shipped.stem}"
    raise ConfigError(f"--config {name_or_path}: no such file, and no shipped config of that name "
                      f"(shipped: {', '.join(shipped_configs())}){hint}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return values


def _flag_name(token: str) -> str | None:
    """`--micro-batch-size=4` -> "micro_batch_size" (dashes and underscores are one spelling); None for values."""
    if not token.startswith("--") or len(token) == 2:
        return None
    return token[2:].partition("=")[0].replace("-", "_")


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(`--config` value or a leading positional .yaml/.json, the other tokens)."""
    rest: list[str] = []
    config = None
    index = 0
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        config, index = argv[0], 1
    while index < len(argv):
        token = argv[index]
        if _flag_name(token) == "config":
            if "=" in token:
                config, index = token.partition("=")[2], index + 1
            elif index + 1 < len(argv):
                config, index = argv[index + 1], index + 2
            else:
                raise ConfigError("--config needs a file or a shipped config's name")
            continue
        rest.append(token)
        index += 1
    return config, rest


def _split_nested(argv: list[str], dict_fields: set[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """`--model.local_loss_weight 0.5` -> {"model": {"local_loss_weight": 0.5}} (values read as YAML)."""
    nested: dict[str, dict[str, Any]] = {}
    rest: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        name = _flag_name(token)
        section, dot, key = (name or "").partition(".")
        if not dot:
            rest.append(token)
            index += 1
            continue
        if section not in dict_fields:
            raise ConfigError(f"--{name}: only {', '.join(f'{f}.*' for f in sorted(dict_fields)) or 'no key'} "
                              f"can be set one key at a time")
        if "=" in token:
            raw, index = token.partition("=")[2], index + 1
        elif index + 1 < len(argv) and _flag_name(argv[index + 1]) is None:
            raw, index = argv[index + 1], index + 2
        else:
            raw, index = "true", index + 1
        nested.setdefault(section, {})[key] = _read_yaml(name, raw)
    return nested, rest


def _check_renamed(keys: list[str], renamed: Mapping[str, str], flags: bool, where: str = "") -> None:
    prefix = "--" if flags else ""
    for key in keys:
        if key in renamed:
            moved = " (a top-level key now)" if "." in key and "." not in renamed[key] else ""
            raise ConfigError(f"{where}{'' if flags else 'key '}{prefix}{key} is now {prefix}{renamed[key]}{moved}: "
                              "rename it")


def parse(dataclass_type: type[T], argv: list[str] | None = None, *, prog: str, description: str | None = None,
          renamed: Mapping[str, str] | None = None) -> T:
    """`dataclass_type` filled from the command line (`argv`; None: sys.argv) over an optional config file.

    The file's values become the parser's defaults, so a flag always wins over the file. `renamed` maps an old key
    (a flag or a file's key; `model.x` for a key of a dict field) to its new name: the old one is an error that names
    the new one. Sets torch's thread count when `--threads` is given. On a real command line (argv None) a bad
    argument prints the usage and exits with status 2; otherwise it raises ConfigError."""
    from_command_line = argv is None
    argv = [str(token) for token in (sys.argv[1:] if argv is None else argv)]
    renamed = dict(renamed or {})
    parser = ArgumentParser(dataclass_type, prog=prog, description=description)
    try:
        config, argv = _split_config(argv)
        hints = typing.get_type_hints(dataclass_type)
        dict_fields = {name for name, kind in hints.items() if kind is dict or typing.get_origin(kind) is dict
                       or any(typing.get_origin(option) is dict for option in typing.get_args(kind))}
        nested, argv = _split_nested(argv, dict_fields)
        _check_renamed([name for name in map(_flag_name, argv) if name is not None], renamed, flags=True)
        _check_renamed([f"{section}.{key}" for section, keys in nested.items() for key in keys], renamed, flags=True)

        values: dict[str, Any] = {}
        if config is not None:
            try:
                path = resolve_config(config)
            except ConfigError as error:
                if "config_name" not in hints:
                    raise
                # the fine-tuning commands' --config named a random model's architecture before
                raise ConfigError(f"{error}; a random model's architecture is --config_name {config}") from None
            loaded = read_config_file(path)
            _check_renamed(list(loaded), renamed, flags=False, where=f"{path}: ")
            _check_renamed([f"{section}.{key}" for section in dict_fields if isinstance(loaded.get(section), dict)
                            for key in loaded[section]], renamed, flags=False, where=f"{path}: ")
            for key, value in loaded.items():
                if key not in hints:
                    raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(hints))})")
                values[key] = coerce(key, value, hints[key])
        for section, keys in nested.items():
            values[section] = {**(values.get(section) or {}), **keys}
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        args, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True,
                                                           look_for_args_file=False)
        if unknown:
            raise ConfigError(f"unrecognized arguments: {' '.join(unknown)}")
    except ConfigError as error:
        if not from_command_line:
            raise
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    threads = getattr(args, "threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return args


def console_script(main: Callable[..., Any]) -> Callable[[], None]:
    """The console script of an entry point: `main()` on sys.argv, its return value (a path, metrics) dropped, as a
    script's exit status must not be one."""

    def run() -> None:
        main()

    run.__doc__ = main.__doc__
    return run


__all__ = [
    "CONFIG_DIR",
    "ArgumentParser",
    "ConfigError",
    "DataArguments",
    "HubArguments",
    "ModelArguments",
    "OptimisationArguments",
    "RunArguments",
    "RuntimeArguments",
    "SourceArguments",
    "coerce",
    "console_script",
    "parse",
    "read_config_file",
    "resolve_config",
    "shipped_configs",
]
