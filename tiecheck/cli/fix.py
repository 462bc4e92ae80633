"""``tiecheck fix``: the command over ``tiecheck.fix``.

Exit codes: 0 the copy was written and verified (or --dry-run printed the plan); 1 a check of
the copy failed (nothing is left under the output name); 2 bad input or a refused output.
"""

from __future__ import annotations

import sys

import click

from tiecheck.cli.options import EXIT_FAILED, EXIT_OK, handle_errors, write_output
from tiecheck.cli.progress import command_progress


def _tie_values(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for v in values:
        left, sep, right = v.partition("=")
        if not sep or not left.strip() or not right.strip() or "=" in right or left.strip() == right.strip():
            raise click.BadParameter(f"{v!r}: write DROPPED=KEPT with two different names, e.g. "
                                     f"lm_head.weight=model.embed_tokens.weight")
        out.append((left.strip(), right.strip()))
    return out


def _untie_values(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for v in values:
        parts = [p.strip() for p in v.split(",")]
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise click.BadParameter(f"{v!r}: write two different names separated by a comma, e.g. "
                                     f"lm_head.weight,model.embed_tokens.weight")
        out.append((parts[0], parts[1]))
    return out


@click.command("fix")
@click.argument("target", metavar="TARGET")
@click.option("-o", "--output", metavar="OUT", help="Where the corrected copy goes (a file for a file, a folder "
              "for a folder or an index); never the input or inside it.")
@click.option("--dry-run", is_flag=True, help="Print the plan only; write nothing.")
@click.option("--tie", "tie", multiple=True, metavar="A=B", callback=_tie_values,
              help="Tie A to B on your word: A is dropped and becomes B (B's bytes win; the plan says what is lost).")
@click.option("--untie", "untie", multiple=True, metavar="A,B", callback=_untie_values,
              help="Give two tied names their own copies (for tools that cannot load aliases).")
@click.option("--force", is_flag=True, help="Replace an existing output that tiecheck fix wrote (never the input, "
              "nor a file or folder fix did not write).")
@click.option("--drop-optimizer", is_flag=True, help="Drop a training checkpoint's optimizer state when "
              "parameters merge or split (its entries are indexed by parameter position).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]), default="table",
              show_default=True, help="Output format of the plan and the checks.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def fix(**options):
    """Write a corrected copy of TARGET: ties restored, copies dropped, declarations made true.

    The plan is printed first (each action, the finding it answers, the bytes it saves); the copy
    is written under a temporary name, verified (ties, findings, every tensor byte for byte, the
    libraries that read it) and only then renamed to OUT.
    """
    handle_errors(_fix)(**options)


def _fix(target, output, dry_run, tie, untie, force, drop_optimizer, fmt, debug):
    progress = command_progress(3 if dry_run else 5)  # read, analyse, plan (then write, verify)
    try:
        # The boundary where the work starts: fix imports torch.
        from tiecheck.repair import fix as run_fix  # noqa: PLC0415
        from tiecheck.repair.fix_text import render  # noqa: PLC0415

        result = run_fix(target, output, dry_run=dry_run, tie=tie, untie=untie, force=force,
                         drop_optimizer=drop_optimizer, progress=progress if progress.enabled else None)
    finally:
        progress.close()
    write_output(render(result, fmt), None)
    sys.exit(EXIT_OK if result.exit_code() == 0 else EXIT_FAILED)
