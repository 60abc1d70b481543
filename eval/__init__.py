"""Evaluation protocols run from the repository root (`python -m eval.<protocol>`); `eval/metrics/` holds the `evaluate` modules."""
