"""`python -m pipelines.embed`: the same flags as `mga embed`."""

from pipelines.embed import main

main()
