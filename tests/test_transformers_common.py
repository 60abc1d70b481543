"""transformers' own common tests run against the Plan classes: `ModelTesterMixin` on PlanModel (ResNet and ViT towers,
PLACE on, the text-aware pixel update on) and PlanForImageClassification, `ConfigTester` on PlanConfig,
`ImageProcessingTestMixin` on PlanImageProcessor and `ProcessorTesterMixin` on PlanProcessor.

Wired as transformers wires CLIP's tests: one tester per tower, composed for the dual encoder; every common test that
does not apply to these models is overridden with `unittest.skip` and the reason. The mixins come from the source
distribution of the installed transformers version (`tests/transformers_mixins.py`).
"""

import copy
import pickle
import unittest

import numpy as np
import pytest
import torch

from plan_hf import PlanConfig, PlanForImageClassification, PlanImageProcessor, PlanModel, PlanProcessor
from plan_hf.tiny import build_tokenizer, tiny_text_config, tiny_vision_config
from tests.transformers_mixins import CommonTestsUnavailable, load_common_tests

try:
    common = load_common_tests()
except CommonTestsUnavailable as err:
    pytest.skip(f"transformers' common test mixins are unavailable: {err}", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")

ids_tensor, floats_tensor = common.modeling.ids_tensor, common.modeling.floats_tensor


def skip_common_tests(*names: str, reason: str):
    """Class decorator: skip the named common tests, their parameterized expansions (`name_0_...`) included."""

    def decorate(cls):
        for attribute in dir(cls):
            if any(attribute == name or attribute.startswith(name + "_") for name in names):
                setattr(cls, attribute, unittest.skip(reason=reason)(lambda self: None))
        return cls

    return decorate


# --------------------------------------------------------------------------------------------------------------------
# Model testers: one per tower, composed for the dual encoder (as CLIPModelTester composes CLIP's)
# --------------------------------------------------------------------------------------------------------------------


class PlanTextModelTester:
    def __init__(self, parent, batch_size=3, seq_length=9, vocab_size=40, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=2):
        self.parent = parent
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.num_attention_heads = num_attention_heads

    def get_config(self) -> dict:
        return tiny_text_config(self.vocab_size, hidden_size=self.hidden_size, layers=self.num_hidden_layers,
                                heads=self.num_attention_heads, max_position_embeddings=32)

    def prepare_config_and_inputs_for_common(self):
        # Right-padded reports of different lengths, as the tokenizer pads them ([CLS] ... [SEP] [PAD] ...).
        lengths = torch.tensor([self.seq_length - 2 * (i % 3) for i in range(self.batch_size)])
        attention_mask = (torch.arange(self.seq_length)[None, :] < lengths[:, None]).long()  # (B, L)
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size) * attention_mask
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class PlanVisionModelTester:
    def __init__(self, parent, kind="resnet", batch_size=3, image_size=32, num_channels=3):
        self.parent = parent
        self.kind, self.batch_size, self.image_size, self.num_channels = kind, batch_size, image_size, num_channels
        config = self.get_config()
        # hidden_states: the embedding output and one per ResNet stage / ViT layer
        self.num_hidden_layers = len(config["depths"]) if kind == "resnet" else config["num_hidden_layers"]
        self.hidden_size = config["hidden_sizes"][-1] if kind == "resnet" else config["hidden_size"]

    def get_config(self) -> dict:
        config = tiny_vision_config(self.kind, width=8, image_size=self.image_size, patch_size=8)
        if self.kind == "vit":
            config["num_attention_heads"] = 2
        return config

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values}


class PlanModelTester:
    def __init__(self, parent, vision="resnet", batch_size=3, **config_overrides):
        self.parent = parent
        self.text_model_tester = PlanTextModelTester(parent, batch_size=batch_size)
        self.vision_model_tester = PlanVisionModelTester(parent, kind=vision, batch_size=batch_size)
        self.batch_size = batch_size  # for the batching-equivalence test
        self.seq_length = self.text_model_tester.seq_length
        self.is_training = True
        self.config_overrides = config_overrides

    def get_config(self) -> PlanConfig:
        overrides = dict(self.config_overrides)
        if self.vision_model_tester.kind == "resnet":
            overrides.setdefault("local_vision_feature_layer", -2)  # a 2x2 grid at 32 px (the last stage is 1x1)
        return PlanConfig(text_config=self.text_model_tester.get_config(),
                          vision_config=self.vision_model_tester.get_config(), projection_dim=16, **overrides)

    def prepare_config_and_inputs_for_common(self):
        _, text_inputs = self.text_model_tester.prepare_config_and_inputs_for_common()
        _, vision_inputs = self.vision_model_tester.prepare_config_and_inputs_for_common()
        mask = text_inputs["attention_mask"]
        positions = torch.arange(mask.shape[1])[None, :]  # (1, L)
        inside = (positions >= 1) & (positions < mask.sum(dim=1, keepdim=True) - 1)  # between [CLS] and [SEP]
        # Words of two word pieces each, the first word a stop-word (-1); two sentences per report.
        word = (positions - 1) // 2  # (1, L)
        word_ids = torch.where(inside & (word > 0), word - 1, -1)  # (B, L)
        sentence_ids = torch.where(inside, (word >= 2).long(), -1)  # (B, L)
        inputs = {**text_inputs, **vision_inputs, "word_ids": word_ids, "sentence_ids": sentence_ids,
                  "return_loss": True}
        return self.get_config(), inputs


class PlanForImageClassificationModelTester(PlanModelTester):
    def __init__(self, parent, vision="resnet", batch_size=3, num_labels=3):
        super().__init__(parent, vision=vision, batch_size=batch_size)
        self.num_labels = num_labels

    def get_config(self) -> PlanConfig:
        config = super().get_config()
        config.num_labels = self.num_labels
        return config

    def prepare_config_and_inputs_for_common(self):
        _, vision_inputs = self.vision_model_tester.prepare_config_and_inputs_for_common()
        return self.get_config(), vision_inputs


# --------------------------------------------------------------------------------------------------------------------
# Model tests
# --------------------------------------------------------------------------------------------------------------------


class PlanModelTest(common.modeling.ModelTesterMixin, unittest.TestCase):
    """PlanModel with ResNet towers and PLAN's local alignment (the defaults)."""

    all_model_classes = (PlanModel,)
    vision = "resnet"
    config_overrides: dict = {}
    _is_composite = True
    test_resize_embeddings = False  # the towers own their embeddings; CLIP's composite test does the same
    test_attention_outputs = False  # attentions are the towers' (tested by their own models), as CLIP's
    additional_model_inputs = ["pixel_values"]  # besides input_ids, in the eager-vs-SDPA comparison
    # A ResNet's last_hidden_state is a (B, C, h, w) map: its channels are not on the last axis the mixin reads.
    skip_test_image_features_output_shape = True

    def setUp(self):
        self.model_tester = PlanModelTester(self, vision=self.vision, **self.config_overrides)
        self.config_tester = common.configuration.ConfigTester(
            self, config_class=PlanConfig, has_text_modality=False,
            common_properties=["projection_dim", "local_projection_dim", "logit_scale_init_value"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = PlanModel(config).eval()
        with torch.no_grad():
            out = model(**inputs)
        batch = self.model_tester.batch_size
        self.assertEqual(out.logits_per_image.shape, (batch, batch))
        torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())
        self.assertEqual(out.image_embeds.shape, (batch, config.projection_dim))
        torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(batch))
        self.assertTrue(torch.isfinite(out.loss) and out.loss.dim() == 0)

    @unittest.skip(reason="Hidden states are the towers' (BERT, ResNet, ViT), tested by transformers' own tests of "
                          "those models; PlanModel adds no layers to them")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="PlanModel has no inputs_embeds: the word-level losses pool token states by word_ids, "
                          "which need input_ids")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="PlanModel has no inputs_embeds: the word-level losses pool token states by word_ids, "
                          "which need input_ids")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(reason="Retaining gradients of hidden states and attentions is tested on the towers' own models")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    def test_get_image_features_attentions(self):
        if self.vision == "resnet":
            self.skipTest(reason="A ResNet image tower has no attention layers")
        super().test_get_image_features_attentions()


# The variants below change the image tower or add PLAN/PLACE modules; what only concerns the text tower's attention
# or the loading machinery is not repeated for each.
VARIANT_REPEATS = ("test_bc_torch_dtype", "test_eager_matches_sdpa_inference")


@skip_common_tests("test_bc_torch_dtype", reason="The `torch_dtype`/`dtype` loading keywords are `from_pretrained`'s, "
                                                 "whatever the tower: run once, in PlanModelTest")
class PlanModelViTTest(PlanModelTest):
    """PlanModel with a ViT image tower."""

    vision = "vit"
    skip_test_image_features_output_shape = False


@skip_common_tests(*VARIANT_REPEATS, reason="The towers and their attention are PlanModelTest's; PLACE's modules use "
                                             "no transformers attention implementation; `dtype` loading is run once")
class PlanModelPlaceTest(PlanModelTest):
    """PlanModel with PLACE's objectives on: pathology-level alignment (PCMA) and correlation exploration."""

    config_overrides = dict(pcma_loss_weight=0.5, correlation_loss_weight=0.5, pcma_num_queries=4,
                            pcma_decoder_layers=1, pcma_decoder_heads=2, correlation_predictor_heads=2)


@skip_common_tests(*VARIANT_REPEATS, reason="The towers and their attention are PlanModelTest's; the pixel update "
                                             "uses no transformers attention implementation; `dtype` loading is run "
                                             "once")
class PlanModelPixelUpdateTest(PlanModelTest):
    """PlanModel with the text-aware pixel update between PLAN's stages."""

    config_overrides = dict(local_pixel_update=True)


@skip_common_tests("test_bc_torch_dtype", reason="The `torch_dtype`/`dtype` loading keywords are `from_pretrained`'s, "
                                                 "whatever the model: run once, in PlanModelTest")
class PlanForImageClassificationTest(common.modeling.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (PlanForImageClassification,)
    test_resize_embeddings = False  # a vision model: no token embeddings
    test_attention_outputs = False
    has_attentions = False  # a ResNet tower

    def setUp(self):
        self.model_tester = PlanForImageClassificationModelTester(self)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # The mixin adds labels for the classes of transformers' own Auto mappings only.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels:
            inputs_dict["labels"] = torch.arange(self.model_tester.batch_size) % self.model_tester.num_labels
        return inputs_dict

    def test_hidden_states_output(self):
        # As transformers' ResNet tests: one (B, C, h, w) map per stage after the stride-4 embedding.
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        vision = self.model_tester.vision_model_tester
        for flag_on_config in (False, True):
            config.output_hidden_states = flag_on_config
            self._set_subconfig_attributes(config, "output_hidden_states", flag_on_config)
            model = PlanForImageClassification(config).eval()
            with torch.no_grad():
                out = model(**inputs, output_hidden_states=None if flag_on_config else True)
            self.assertEqual(len(out.hidden_states), vision.num_hidden_layers + 1)
            self.assertEqual(out.hidden_states[0].shape,
                             (vision.batch_size, config.vision_config.embedding_size, vision.image_size // 4,
                              vision.image_size // 4))

    def test_copies_run_their_own_weights(self):
        # A deep copy (what Trainer's and the common tests' model copies are) must run its own tower, with activation
        # checkpointing on or off, exactly as a model loaded with its weights does; and the model pickles
        # (multiprocessing, torch.save of a whole model).
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for checkpointing in (False, True):
            model = PlanForImageClassification(config).train()
            if checkpointing:
                model.gradient_checkpointing_enable()
            twin = copy.deepcopy(model)
            with torch.no_grad():
                for parameter in twin.parameters():
                    parameter.mul_(-1.5)
            reference = PlanForImageClassification(config).train()
            reference.load_state_dict(twin.state_dict())
            torch.testing.assert_close(twin(**inputs).logits, reference(**inputs).logits)
            self.assertGreater(len(pickle.dumps(model)), 0)

    def test_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = PlanForImageClassification(config).eval()
        labels = torch.tensor([0, 2, 1])
        with torch.no_grad():
            out = model(**inputs, labels=labels)
        self.assertEqual(out.logits.shape, (self.model_tester.batch_size, self.model_tester.num_labels))
        torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))

    @unittest.skip(reason="PlanForImageClassification takes pixel_values only")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="PlanForImageClassification takes pixel_values only")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(reason="A vision tower: no input or output token embeddings")
    def test_model_get_set_embeddings(self):
        pass


# --------------------------------------------------------------------------------------------------------------------
# Image processor
# --------------------------------------------------------------------------------------------------------------------


class PlanImageProcessingTester(common.image_processing.ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"height": 32, "width": 32})
        kwargs.setdefault("pad_mode", "center")
        kwargs.setdefault("do_normalize", True)
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.25, 0.25, 0.25])
        super().__init__(parent, batch_size=4, min_resolution=20, max_resolution=60, **kwargs)

    def _get_image_processing_classes(self):
        # The mixin looks the classes up by the test folder's model name; PlanImageProcessor is this package's.
        return {"pil": PlanImageProcessor}


class PlanImageProcessingTest(common.image_processing.ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = PlanImageProcessingTester

    @unittest.skip(reason="PlanImageProcessor reads every image as grey (colour becomes luma, alpha is composited onto "
                          "black) and replicates it to its configured num_channels: a 4-channel input does not give "
                          "4 output channels")
    def test_call_numpy_4_channels(self):
        pass

    @unittest.skip(reason="A rule for image processors added to transformers itself; PlanImageProcessor's chest-X-ray "
                          "loading (16-bit depth, DICOM LUTs, MONOCHROME1) works on numpy arrays and has no "
                          "torchvision backend (torchvision is not a dependency of this package)")
    def test_new_models_require_torchvision_backend(self):
        pass


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------

PROCESSOR_TEXTS = ["lower newer", "upper older longer string", "Right lower lobe consolidation. No pneumothorax."]


class PlanProcessorTest(common.processing.ProcessorTesterMixin, unittest.TestCase):
    processor_class = PlanProcessor

    @classmethod
    def _setup_tokenizer(cls):
        return build_tokenizer(PROCESSOR_TEXTS)

    @classmethod
    def _setup_image_processor(cls):
        return PlanImageProcessor(size=32)

    @staticmethod
    def prepare_processor_dict():
        return {"max_length": 96}

    @unittest.skip(reason="`max_length` is saved with the processor (processor_config.json) as the default length of "
                          "its reports and stays a call-time text option that overrides it, the case this test's "
                          "own docstring leaves open; published processors carry it")
    def test_init_arguments_not_in_processor_kwargs(self):
        pass


# --------------------------------------------------------------------------------------------------------------------
# Auto classes
# --------------------------------------------------------------------------------------------------------------------


def test_zero_shot_pipeline_knows_the_model():
    """`import plan_hf` registers PlanModel for zero-shot image classification: the stock pipeline runs it without
    logging that the model is not supported."""
    from PIL import Image
    from transformers import pipeline
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    tokenizer = build_tokenizer(PROCESSOR_TEXTS)
    config, _ = PlanModelTester(None).prepare_config_and_inputs_for_common()
    config.text_config.vocab_size = len(tokenizer)
    with CaptureLogger(logging.get_logger("transformers.pipelines.base")) as captured:
        classifier = pipeline("zero-shot-image-classification", model=PlanModel(config).eval(), tokenizer=tokenizer,
                              image_processor=PlanImageProcessor(size=32))
        results = classifier(Image.fromarray(np.zeros((40, 30), np.uint8)), candidate_labels=["lower", "upper"])
    assert sorted(result["label"] for result in results) == ["lower", "upper"]
    assert "not supported" not in captured.out
