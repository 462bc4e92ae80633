"""The ``tiecheck`` command line: thin commands over the library API.

Exit codes: 0 clean, 1 a check failed, 2 usage or input error. Heavy imports (torch, pandas)
happen inside the commands that need them, so ``tiecheck --help`` and ``tiecheck models``
start fast.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path

import click

from tiecheck import __version__

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


def _fail(message: str) -> None:
    click.echo(f"tiecheck: error: {message}", err=True)
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


def write_output(text: str, output: str | None, protect: tuple[str, ...] = ()) -> None:
    """Print, or write to a file atomically, never over one of the inputs."""
    if output is None or output == "-":
        click.echo(text, nl=False)
        return
    from tiecheck.errors import TiecheckError

    out = Path(output)
    for p in protect:
        if p and os.path.exists(p) and out.exists() and os.path.samefile(p, out):
            raise TiecheckError(f"refusing to write the output over the input {p}")
    if out.is_dir():
        raise TiecheckError(f"-o {output}: is a folder; give a file name")
    tmp = out.with_name(f".{out.name}.tiecheck-tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TiecheckError(f"-o {output}: cannot write ({e.strerror or e})") from e


def parse_expect(values: tuple[str, ...]) -> list[tuple[str, ...]]:
    from tiecheck.errors import TiecheckError

    groups = []
    for v in values:
        names = tuple(n.strip() for n in v.split(",") if n.strip())
        if len(names) < 2:
            raise TiecheckError(f"--expect-tied '{v}': give at least two comma-separated names")
        groups.append(names)
    return groups


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tiecheck")
def main() -> None:
    """Find, measure and guard weight tying in PyTorch Transformers."""


@main.command()
@click.argument("target")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown", "csv"]), default="table",
              show_default=True, help="Output format.")
@click.option("-o", "--output", metavar="FILE", help="Write the report to FILE instead of standard output.")
@click.option("--fail-on", type=click.Choice(["error", "warning", "never"]), default="error", show_default=True,
              help="Exit 1 when a finding of this severity or worse is present.")
@click.option("--expect-tied", multiple=True, metavar="A,B[,C]",
              help="Names that must share memory (repeatable); exit 1 if they do not.")
@click.option("--key", help="Key (dotted) of the model state inside a training checkpoint.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow pickled Python objects (full nn.Module files). Loading them can run arbitrary code.")
@click.option("--no-duplicates", is_flag=True, help="Skip the content pass that finds untied duplicates.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd", "none"]), default="adamw", show_default=True,
              help="Optimizer assumed for training memory.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@handle_errors
def inspect(target, fmt, output, fail_on, expect_tied, key, trust_pickle, no_duplicates, optimizer, debug):
    """Find every tie in TARGET and what it saves.

    TARGET is a checkpoint file or folder, a bundled model name (see `tiecheck models`), or a
    Python spec `path/to/file.py:factory` / `package.module:factory`.
    """
    from tiecheck.api import analyze
    from tiecheck.render import render

    expected = parse_expect(expect_tied)
    if trust_pickle:
        click.echo("tiecheck: warning: --trust-pickle lets the file's pickled objects run code", err=True)
    report = analyze(target, key=key, trust_pickle=trust_pickle, duplicates=not no_duplicates,
                     optimizer=optimizer, expect_tied=expected)
    write_output(render(report, fmt), output, protect=(target,))
    sys.exit(report.exit_code(fail_on))


@main.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]), default="table",
              show_default=True)
def models(fmt):
    """List the bundled reference models with their parameter counts, tied and untied."""
    from tiecheck import models as registry

    rows = []
    for p in registry.list_presets():
        tied, untied = registry.param_count(p.name, tied=True), registry.param_count(p.name, tied=False)
        rows.append({"name": p.name, "kind": p.kind, "params_tied": tied, "params_untied": untied,
                     "tie_share": (untied - tied) / untied, "description": p.description})
    if fmt == "json":
        import json

        click.echo(json.dumps(rows, indent=2))
        return
    from tabulate import tabulate

    click.echo(tabulate([[r["name"], r["kind"], f"{r['params_tied']:,}", f"{r['params_untied']:,}",
                          f"{r['tie_share']:.1%}", r["description"]] for r in rows],
                        headers=["name", "kind", "params (tied)", "params (untied)", "tie saves", "description"],
                        tablefmt="github" if fmt == "markdown" else "simple"))


from tiecheck.cli_bench import bench as _bench  # noqa: E402  (the module imports helpers from here)

main.add_command(_bench)


if __name__ == "__main__":  # pragma: no cover
    main()
