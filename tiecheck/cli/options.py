"""What every command shares: exit codes, one-line errors, output files, and the options whose
values are checked where Click parses them.

Command modules import from here, never from :mod:`tiecheck.cli.main`, which registers them.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from tiecheck.errors import TiecheckError
from tiecheck.report.text import one_line

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
# Click 8.2 made "no arguments, so show the help" an error of its own; older Clicks exit instead.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def fail(message: str) -> None:
    """Print ``tiecheck: error: <message>`` as one line on stderr and exit 2."""
    click.echo(f"tiecheck: error: {one_line(message)}", err=True)
    sys.exit(EXIT_ERROR)


class OneLineErrors(click.Group):
    """A command group whose usage errors are one line on stderr, like every other error.

    Click prints a usage error as three lines (usage, a hint, the error); a script that reads
    ``tiecheck``'s stderr gets the same ``tiecheck: error: ...`` line for a bad option as for a
    bad file. Everything else (``--help``, exit codes) is Click's own.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except _NO_ARGS_IS_HELP as e:  # `tiecheck CMD` with no arguments: the help
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            where = f" (see 'tiecheck {e.ctx.info_name} --help')" if getattr(e, "ctx", None) and \
                e.ctx.parent is not None else ""
            click.echo(f"tiecheck: error: {one_line(e.format_message())}{where}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("tiecheck: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


def handle_errors(fn: Callable) -> Callable:
    """Turn input errors into one line on stderr and exit 2; ``--debug`` shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except TiecheckError as e:
            if debug:
                traceback.print_exc()
            fail(str(e))
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("tiecheck: interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - a bug or an unforeseen input: still one line unless --debug
            if debug:
                traceback.print_exc()
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            fail(f"unexpected {type(e).__name__}: {msg} (rerun with --debug for the traceback)")

    return wrapper


def write_output(text: str, output: str | None, protect: tuple[object, ...] = ()) -> None:
    """Print, or write to a file atomically, never over an input (see :mod:`tiecheck.report.safewrite`)."""
    if output is None or output == "-":
        click.echo(text, nl=False)
        return
    # zipfile and shutil (safewrite reads zip headers to protect weights): 30 ms off every --help
    from tiecheck.report.safewrite import write_text  # noqa: PLC0415

    write_text(output, text, protect, what="the output")
    # Nothing reaches the terminal otherwise: say where the report went (stderr keeps stdout clean).
    click.echo(f"tiecheck: wrote {output}", err=True)


def trust_options(fn: Callable) -> Callable:
    """``--trust-pickle`` and ``--trust-remote-code``: the two opt-ins that let a target run code."""
    fn = click.option("--trust-remote-code", is_flag=True,
                      help="Let a Hugging Face folder's own Python code build its architecture (runs that code).")(fn)
    return click.option("--trust-pickle", is_flag=True,
                        help="Allow pickled Python objects (full nn.Module files, TorchScript archives). Loading "
                             "them can run arbitrary code.")(fn)


def warn_trust(trust_pickle: bool, trust_remote_code: bool, *, prefix: str = "--") -> None:
    """Say on stderr which opt-in is in force, every time one is.

    ``prefix`` is "--" for command-line flags; ``check`` passes "" because its opt-ins may come
    from the policy's keys (``trust-pickle = true``) as well.
    """
    if trust_pickle:
        click.echo(f"tiecheck: warning: {prefix}trust-pickle lets the file's pickled objects run code", err=True)
    if trust_remote_code:
        click.echo(f"tiecheck: warning: {prefix}trust-remote-code runs the model folder's Python code", err=True)


def parse_expect(values: tuple[str, ...]) -> list[tuple[str, ...]]:
    """``("a,b", "c,d,e")`` as name groups; a group of fewer than two names is a ``TiecheckError``."""
    groups = []
    for v in values:
        names = tuple(n.strip() for n in v.split(",") if n.strip())
        if len(names) < 2:
            raise TiecheckError(f"--expect-tied '{v}': give at least two comma-separated names")
        groups.append(names)
    return groups


def _expect_tied(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, ...]]:
    try:
        return parse_expect(values)
    except TiecheckError as e:
        raise click.BadParameter(str(e).split(": ", 1)[1]) from None


def _key(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    parts = value.split(".")
    if not all(parts):
        raise click.BadParameter(f"'{value}': a dotted key such as 'model' or 'state.model', with no empty part")
    return value


def _ignore(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    # The findings catalogue, only when --ignore is given (every command's --help would pay it otherwise).
    from tiecheck.report.ignore import parse_ignore  # noqa: PLC0415

    for v in values:
        try:
            parse_ignore(v)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return values


ignore_option = click.option(
    "--ignore", multiple=True, metavar="CODE[:GLOB]", callback=_ignore,
    help="Ignore a finding code, or a code for tensor names matching GLOB (TC005:*.rotary_emb.*); repeatable. "
         "Ignored findings stay in the report, marked ignored, and never fail.")
expect_tied_option = click.option(
    "--expect-tied", multiple=True, metavar="A,B[,C]", callback=_expect_tied,
    help="Names that must share memory (repeatable); exit 1 if they do not.")
key_option = click.option("--key", callback=_key, help="Key (dotted) of the model state inside a training checkpoint.")


def format_option(choices: tuple[str, ...], default: str, help: str = "Output format.") -> Callable[[Any], Any]:
    """``--format``: one of ``choices``."""
    return click.option("--format", "fmt", type=click.Choice(list(choices)), default=default, show_default=True,
                        help=help)


output_option = click.option("-o", "--output", metavar="FILE",
                             help="Write to FILE instead of standard output (never over an input).")
debug_option = click.option("--debug", is_flag=True, help="Show tracebacks.")
