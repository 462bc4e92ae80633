"""``python -m tiecheck``: the same as the ``tiecheck`` command."""

from tiecheck.cli import main

main()
