"""The ``tiecheck`` command group: one thin command per module over the library API.

Exit codes: 0 clean, 1 a check failed, 2 usage or input error. The command modules are
imported here, but each imports torch, pandas or transformers only inside its body (the
boundary where the work starts), so ``tiecheck --help`` and ``tiecheck models`` start fast.
"""

from __future__ import annotations

import click

from tiecheck import __version__
from tiecheck.cli import bench, check, diff, fix, inspect, models, plan, scan
from tiecheck.cli.options import OneLineErrors

__all__ = ["main"]


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tiecheck")
def main() -> None:
    """Find, measure and guard weight tying in PyTorch Transformers."""


for _command in (inspect.inspect, models.models, diff.diff_command, check.check, bench.bench, fix.fix, plan.plan,
                 scan.scan):
    main.add_command(_command)
