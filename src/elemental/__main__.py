"""`python -m elemental` is the `elemental` command."""

from .cli import main

main()
