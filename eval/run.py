"""`python -m eval.run`: `plan-eval` from a checkout."""

from plan_hf.cli.eval import main

if __name__ == "__main__":
    main()
