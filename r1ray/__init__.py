"""The top of the layers: the `r1ray` command (cli.py), which dispatches to the training loop
(cluster/) and the R1 recipes (recipes/). `python -m r1ray ...` runs the same command."""
