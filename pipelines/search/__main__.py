"""`python -m pipelines.search`: the same flags as `mga search`."""

from pipelines.search import main

main()
