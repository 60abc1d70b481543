"""`python -m training.export`: `plan-export` from a checkout."""

from plan_hf.cli.export import main

if __name__ == "__main__":
    main()
