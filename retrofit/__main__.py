"""``python -m retrofit …``: the CLI without its console script (torchrun, a machine without the entry point)."""

from retrofit.cli import main

main()
