"""The entry points, installed as console scripts (and `python -m training.* / eval.run` from a checkout):
`plan-pretrain`, `plan-demo`, `plan-eval`, `plan-finetune-classification`, `plan-finetune-detection`,
`plan-finetune-segmentation`, `plan-finetune-report-generation`, `plan-export`. One command-line system serves them
all (`arguments`); `configs/` holds the training configs users pass by name (`--config smoke`)."""
