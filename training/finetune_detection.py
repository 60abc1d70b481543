"""Fine-tune a pre-trained PLAN vision tower for detection on 1% / 10% / 100% of a training split.

    python -m training.finetune_detection --model PATH_OR_HUB_ID|random [--config ...] --dataset ... --data DIR \
        --fraction 0.01|0.1|1.0 [--linear-probe] --out DIR

Writes OUT/metrics.json, OUT/summary.md, a picture, OUT/subset.json (the seeded subset) and OUT/model.
The protocol itself lives in `plan_hf.downstream.finetune`; `--help` lists every option.
"""

from plan_hf.downstream.finetune import Task, main

if __name__ == "__main__":
    main(Task.DETECTION)
