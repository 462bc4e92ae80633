"""``tiecheck diff A B``: the tie structure of B against A's (registered in ``cli.py``)."""

from __future__ import annotations

import sys

import click

from tiecheck.cliutil import handle_errors, trust_options, warn_trust, write_output


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]), default="table",
              show_default=True, help="Output format.")
@click.option("-o", "--output", metavar="FILE", help="Write the comparison to FILE instead of standard output.")
@click.option("--key", help="Key (dotted) of the model state inside training checkpoints (both sides).")
@click.option("--no-duplicates", is_flag=True,
              help="Skip the content pass (ties broken into equal copies are then reported as plain untied).")
@trust_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@handle_errors
def diff_command(a, b, fmt, output, key, trust_pickle, trust_remote_code, no_duplicates, debug):
    """Compare the ties of A and B; exit 1 when a tie present in A is missing in B.

    A and B are anything `inspect` accepts, or a report saved with `inspect --format json`.
    """
    from tiecheck.tie_diff import diff, render_diff

    warn_trust(trust_pickle, trust_remote_code)
    result = diff(a, b, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                  duplicates=not no_duplicates)
    write_output(render_diff(result, fmt), output, protect=(a, b))
    sys.exit(result.exit_code)
