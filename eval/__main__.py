"""`python -m eval ...` is `plan-eval ...`."""

from plan_hf.cli.eval import main

main()
