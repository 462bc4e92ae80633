"""Helpers every CLI command shares: exit codes, one-line errors, safe output files.

Kept apart from ``tiecheck.cli`` so command modules can import them without importing the
module that registers them.
"""

from __future__ import annotations

import functools
import sys
import traceback

import click

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


# Control characters (C0, DEL, C1) and the other characters str.splitlines() breaks at.
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_UNPRINTABLE.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """``text`` as one printable line: names and values quoted from a hostile file may hold
    newlines or terminal escape sequences, which must neither split the error nor reach the terminal."""
    return text.strip().translate(_UNPRINTABLE)


def _fail(message: str) -> None:
    click.echo(f"tiecheck: error: {one_line(message)}", err=True)
    sys.exit(EXIT_ERROR)


def handle_errors(fn):
    """Turn input errors into one line on stderr and exit 2; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        from tiecheck.errors import TiecheckError

        try:
            return fn(*args, **kwargs)
        except TiecheckError as e:
            if debug:
                traceback.print_exc()
            _fail(str(e))
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("tiecheck: interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # a bug or an unforeseen input: still one line unless --debug
            if debug:
                traceback.print_exc()
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            _fail(f"unexpected {type(e).__name__}: {msg} (rerun with --debug for the traceback)")

    return wrapper


def write_output(text: str, output: str | None, protect: tuple[object, ...] = ()) -> None:
    """Print, or write to a file atomically, never over an input (see ``tiecheck.safewrite``)."""
    if output is None or output == "-":
        click.echo(text, nl=False)
        return
    from tiecheck.safewrite import write_text

    write_text(output, text, protect, what="the output")


def trust_options(fn):
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
    from tiecheck.errors import TiecheckError

    groups = []
    for v in values:
        names = tuple(n.strip() for n in v.split(",") if n.strip())
        if len(names) < 2:
            raise TiecheckError(f"--expect-tied '{v}': give at least two comma-separated names")
        groups.append(names)
    return groups


