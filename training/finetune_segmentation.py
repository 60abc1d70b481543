"""`python -m training.finetune_segmentation`: `plan-finetune-segmentation` from a checkout (`--help` lists every option)."""

from plan_hf.cli.finetune import segmentation as main

if __name__ == "__main__":
    main()
