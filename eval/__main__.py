"""`python -m eval ...` is `python -m eval.run ...`."""

from eval.run import main

main()
