"""`python -m training.demo` (what `make demo` runs): `plan-demo` from a checkout."""

import os

# Before torch loads OpenMP (plan_hf imports torch): waiting threads sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from plan_hf.cli.demo import main  # noqa: E402

if __name__ == "__main__":
    main()
