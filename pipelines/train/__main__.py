"""`python -m pipelines.train`: the same flags as `mga train`."""

from pipelines.train import main

main()
