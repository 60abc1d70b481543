"""`python -m training.pretrain` (and `accelerate launch -m training.pretrain`): `plan-pretrain` from a checkout."""

from plan_hf.cli.pretrain import main

if __name__ == "__main__":
    main()
