"""`python -m training.finetune_classification`: `plan-finetune-classification` from a checkout (`--help` lists every option)."""

from plan_hf.cli.finetune import classification as main

if __name__ == "__main__":
    main()
