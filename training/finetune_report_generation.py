"""`python -m training.finetune_report_generation`: `plan-finetune-report-generation` from a checkout."""

from plan_hf.cli.finetune import report_generation as main

if __name__ == "__main__":
    main()
