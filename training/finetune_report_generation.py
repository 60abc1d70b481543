"""Fine-tune a pre-trained PLAN vision tower + a new text decoder to write chest X-ray reports (PLACE's report
generation), then score BLEU-1..4, METEOR and ROUGE-L on the test split.

    python -m training.finetune_report_generation --model PATH_OR_HUB_ID|random [--config ...] \
        --dataset synthetic|mimic --data DIR --out DIR [--epochs E --max-steps N --batch-size B --decoder-layers K]

Writes OUT/metrics.json, OUT/report.md (with example reports), OUT/predictions.jsonl and OUT/model (the generator:
`VisionEncoderDecoderModel.from_pretrained` after `import plan_hf.generation`, and its PlanProcessor). Needs the
`generation` extra (pycocoevalcap; METEOR also needs `java`). The protocol lives in `plan_hf.generation.finetune`;
`--help` lists every option.
"""

from plan_hf.generation.finetune import main

if __name__ == "__main__":
    main()
