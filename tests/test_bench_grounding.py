"""The grounding benchmark's bookkeeping: mean and 95% t-interval over seeds (hand values), variants routing model
fields to the model and anything else to pre-training, and the regimes' training configs."""

import math

import pytest

from benchmarks.bench_grounding import REGIMES, mean_interval, metric
from benchmarks.bench_quality import Variant, train_command
from plan_hf.training.config import PretrainConfig


def test_mean_interval_is_the_student_t_interval():
    stat = mean_interval([0.2, 0.4, 0.6])  # mean 0.4, sd 0.2, n 3: half-width 4.303 * 0.2 / sqrt(3)
    half = 4.303 * 0.2 / math.sqrt(3)
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(0.4)
    assert (stat["low"], stat["high"]) == (pytest.approx(0.4 - half), pytest.approx(0.4 + half))
    assert mean_interval([0.5]) == {"mean": 0.5, "low": None, "high": None, "n": 1}
    assert mean_interval([])["mean"] is None


def test_metric_reads_a_path_and_skips_what_is_missing_or_not_finite():
    metrics = {"grounding": {"local": {"macro": {"pointing": 0.25, "cnr": float("nan")}}}}
    assert metric(metrics, ("grounding", "local", "macro", "pointing")) == 0.25
    assert metric(metrics, ("grounding", "local", "macro", "cnr")) is None
    assert metric(metrics, ("grounding", "global", "macro", "pointing")) is None


def test_variant_options_go_to_the_model_or_to_pre_training(tmp_path):
    variant = Variant.parse("plan_noaug=plan:local_within_pair=true,augment=false")
    assert variant.describe() == "preset `plan`, local_within_pair=True, augment=False"
    command = train_command(variant, tmp_path / "c.yaml", tmp_path / "out", 7)
    assert command[command.index("--model.local_within_pair") + 1] == "true"
    assert command[command.index("--augment") + 1] == "false"
    assert command[command.index("--max_steps") + 1] == "7" and "--model.augment" not in command


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_each_regime_is_a_valid_pretraining_config(regime):
    settings = REGIMES[regime]
    config = PretrainConfig(**settings)
    assert config.image_size == (224 if regime == "pretrained" else 128)
    assert (config.vision_model == "offline:mobilenet_v2") == (regime == "pretrained")
