"""``python -m fitune``: the command line (torchrun starts each process of a sharded run this way)."""

from fitune.cli import main

main()
