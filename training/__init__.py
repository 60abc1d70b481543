"""Runnable entry points (run from the repository root): `python -m training.pretrain`, `python -m training.demo`,
`python -m training.export`, and the fine-tuning scripts."""
