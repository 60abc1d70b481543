"""`python -m training.finetune_detection`: `plan-finetune-detection` from a checkout (`--help` lists every option)."""

from plan_hf.cli.finetune import detection as main

if __name__ == "__main__":
    main()
