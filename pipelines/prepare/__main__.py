"""`python -m pipelines.prepare`: the same flags as `mga prepare`."""

from pipelines.prepare.job import main

main()
