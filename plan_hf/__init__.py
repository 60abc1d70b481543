"""plan-hf: PLAN and PLACE chest X-ray + report pre-training as a Hugging Face Transformers model.

Importing the package registers `model_type="plan"` with the Auto classes (zero-shot image classification included), and marks the classes so that
`save_pretrained` writes their code files next to the weights (`trust_remote_code` loading, as on the Hub).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_plan import PlanConfig
from .image_processing_plan import PlanImageProcessor
from .modeling_plan import (
    PlanForImageClassification,
    PlanGroundingOutput,
    PlanModel,
    PlanOutput,
    PlanPreTrainedModel,
)
from .processing_plan import PlanProcessor

__version__ = "0.1.0"

AutoConfig.register("plan", PlanConfig, exist_ok=True)
AutoModel.register(PlanConfig, PlanModel, exist_ok=True)
AutoModelForImageClassification.register(PlanConfig, PlanForImageClassification, exist_ok=True)
# the zero-shot image classification pipeline accepts the models of its Auto class
AutoModelForZeroShotImageClassification.register(PlanConfig, PlanModel, exist_ok=True)
AutoImageProcessor.register(PlanConfig, image_processor_classes={"pil": PlanImageProcessor}, exist_ok=True)
AutoProcessor.register(PlanConfig, PlanProcessor, exist_ok=True)

PlanConfig.register_for_auto_class()
PlanModel.register_for_auto_class("AutoModel")
PlanForImageClassification.register_for_auto_class("AutoModelForImageClassification")
PlanImageProcessor.register_for_auto_class("AutoImageProcessor")
PlanProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "PlanConfig",
    "PlanForImageClassification",
    "PlanGroundingOutput",
    "PlanImageProcessor",
    "PlanModel",
    "PlanOutput",
    "PlanPreTrainedModel",
    "PlanProcessor",
]
