"""``python -m tiecheck.cli``."""

from tiecheck.cli.main import main

if __name__ == "__main__":  # pragma: no cover
    main()
