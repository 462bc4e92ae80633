"""``tiecheck diff A B``: the tie structure of B against A's."""

from __future__ import annotations

import sys

import click

from tiecheck.cli.options import (
    debug_option,
    format_option,
    handle_errors,
    key_option,
    output_option,
    trust_options,
    warn_trust,
    write_output,
)
from tiecheck.cli.progress import command_progress


@click.command("diff")
@click.argument("a")
@click.argument("b")
@format_option(("table", "json", "markdown"), "table")
@output_option
@key_option
@click.option("--no-duplicates", is_flag=True,
              help="Skip the content pass (ties broken into equal copies are then reported as plain untied).")
@trust_options
@debug_option
@handle_errors
def diff_command(a, b, fmt, output, key, trust_pickle, trust_remote_code, no_duplicates, debug):
    """Compare the ties of A and B; exit 1 when a tie present in A is missing in B.

    A and B are anything `inspect` accepts, or a report saved with `inspect --format json`.
    """
    warn_trust(trust_pickle, trust_remote_code)
    progress = command_progress(4)  # read A, read B, analyse A, analyse B (then compare)
    try:
        # The boundary where the work starts: diff analyses both targets (torch, transformers).
        from tiecheck.compare import diff, render_diff  # noqa: PLC0415

        result = diff(a, b, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                      duplicates=not no_duplicates, progress=progress if progress.enabled else None)
    finally:
        progress.close()
    write_output(render_diff(result, fmt), output, protect=(a, b))
    sys.exit(result.exit_code)
