"""`python -m kvsweep <stage>`: the `kvsweep` command."""

from kvsweep.cli import main

main()
