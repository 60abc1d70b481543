"""`python -m training.pretrain`, `training.demo`, `training.export` and `training.finetune_*` from a checkout: thin
shims over the installed console scripts' code in `plan_hf.cli`."""
