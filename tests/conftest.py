"""Shared fixtures: tiny towers and a WordPiece tokenizer built offline from configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPORTS = [
    "Right lower lobe consolidation. No pneumothorax.",
    "Small left pleural effusion with basilar atelectasis.",
    "The heart is enlarged. No focal consolidation, effusion, or pneumothorax.",
    "Left apical pneumothorax. Heart size is normal.",
    "Lungs are clear. No acute cardiopulmonary process.",
    "Bilateral perihilar opacities consistent with mild pulmonary edema.",
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from plan_hf.tiny import build_tokenizer

    return build_tokenizer(REPORTS, save_dir=tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def image_processor():
    from plan_hf import PlanImageProcessor

    return PlanImageProcessor(size=64)


@pytest.fixture(scope="session")
def processor(tokenizer, image_processor):
    from plan_hf import PlanProcessor

    return PlanProcessor(image_processor=image_processor, tokenizer=tokenizer)


def synthetic_xray(seed: int, height: int = 80, width: int = 64) -> np.ndarray:
    """A uint8 grey image with a bright blob at a seeded place (enough structure for shape/round-trip tests)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.1 * width) ** 2))
    image = 0.3 + 0.5 * blob + 0.05 * rng.standard_normal((height, width))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def batch(processor):
    images = [synthetic_xray(i) for i in range(4)]
    return processor(text=REPORTS[:4], images=images, return_tensors="pt")


@pytest.fixture
def make_model(tokenizer):
    from plan_hf import PlanModel
    from plan_hf.tiny import tiny_plan_config

    def build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        config = tiny_plan_config(vocab_size=len(tokenizer), image_size=64, **overrides)
        return PlanModel(config).eval()

    return build


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on shared cores their sync costs up to 20x
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """Exact comparisons: a reference and the library both run in float64 (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("float64")``)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A PlanModel export (weights + image processor), as `training.pretrain` writes to <output_dir>/model."""
    from plan_hf import PlanImageProcessor, PlanModel
    from plan_hf.tiny import tiny_plan_config

    path = tmp_path_factory.mktemp("plan_export")
    torch.manual_seed(0)
    PlanModel(tiny_plan_config(image_size=64)).save_pretrained(path)
    PlanImageProcessor(size=64).save_pretrained(path)
    return path
