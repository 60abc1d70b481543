"""The pieces of `python -m training.pretrain`: config parsing, model/data builders, the cached-feature accumulation
step, atomic rotated checkpoints and the training loop. Each is usable (and tested) on its own."""
