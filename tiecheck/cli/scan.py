"""``tiecheck scan ROOT`` / ``tiecheck scan --from targets.txt``: one row per checkpoint of a fleet."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from tiecheck.cli.options import EXIT_FAILED, EXIT_OK, debug_option, handle_errors
from tiecheck.cli.progress import command_progress
from tiecheck.errors import TiecheckError

# Kept here (not imported from tiecheck.scan) so `tiecheck --help` imports nothing of the scan.
ENGINES = ("pool", "ray")
FORMATS = ("csv", "jsonl", "parquet")


@click.command("scan")
@click.argument("root", required=False, type=click.Path(path_type=str))
@click.option("--from", "from_file", metavar="FILE", help="Scan the targets FILE lists (one per line: paths, Hub ids, "
                                                          "URLs), instead of a folder tree.")
@click.option("-o", "--output", metavar="FILE", help="Write the rows to FILE as they come (a folder for Parquet); "
                                                     "default: standard output.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Row format (default: from the output's suffix, else csv).")
@click.option("--resume", is_flag=True, help="Go on with an existing output: targets already in it are skipped.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes (pool), or CPUs of a local Ray cluster (default: this machine's CPUs).")
@click.option("--engine", type=click.Choice(ENGINES), default="pool", show_default=True,
              help="pool: local worker processes; ray: Ray tasks (the ray extra).")
@click.option("--ray-address", metavar="ADDRESS", default=None,
              help="The Ray cluster to join (ray.init(address=...)); default: RAY_ADDRESS, else a local cluster.")
@click.option("--no-duplicates", is_flag=True, help="Skip the content pass (bytes stored twice are then not found).")
@click.option("--fail-on", type=click.Choice(["error", "warning", "never"]), default="error", show_default=True,
              help="Exit 1 when a target has a finding of this severity or worse, or could not be read.")
@debug_option
@handle_errors
def scan(root: str | None, from_file: str | None, output: str | None, fmt: str | None, resume: bool,
         jobs: int | None, engine: str, ray_address: str | None, no_duplicates: bool, fail_on: str,
         debug: bool) -> None:
    """One row per checkpoint under ROOT (or listed by --from): format, tensors, bytes, bytes stored
    twice, tie verdict, findings by severity, or the error that made it unreadable.

    Rows are written as each target finishes; --resume continues a scan that was cut short.
    """
    # The boundary where the work starts: target discovery reads the loaders' format detection.
    from tiecheck.scan import ScanOptions, Summary, discover, read_list, run  # noqa: PLC0415
    from tiecheck.scan.writers import RowWriter, format_for  # noqa: PLC0415

    if (root is None) == (from_file is None):
        raise TiecheckError("give a folder to scan (ROOT) or a list of targets (--from FILE), not both")
    if resume and not output:
        raise TiecheckError("--resume goes on with an output file: give it with -o")
    if ray_address and engine != "ray":
        raise TiecheckError("--ray-address is for --engine ray")
    targets = read_list(Path(from_file)) if from_file else list(discover(Path(root)))
    fmt = format_for(output, fmt)
    if output:
        _refuse_unsafe_output(Path(output), targets)
    writer = RowWriter(output, fmt, resume=resume, stream=sys.stdout)
    todo = [t for t in dict.fromkeys(targets) if t not in writer.done]
    summary = Summary(fail_on=fail_on, skipped=len(targets) - len(todo))
    progress = command_progress(len(todo))
    try:
        rows = run(todo, ScanOptions(duplicates=not no_duplicates), engine=engine, jobs=jobs or os.cpu_count() or 1,
                   address=ray_address)
        for row in rows:
            try:
                writer.write(row)
            except BrokenPipeError:  # rows to a pipe whose reader stopped (`| head`): stop as Unix tools do
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.exit(EXIT_FAILED)
            summary.add(row)
            progress(1, f"scanned {summary.rows:,}/{len(todo):,}" +
                     (f" ({summary.unreadable:,} unreadable)" if summary.unreadable else ""))
    finally:
        progress.close()
        writer.close()
    click.echo(summary.line(output), err=output is None)
    sys.exit(EXIT_FAILED if summary.failed else EXIT_OK)


def _refuse_unsafe_output(output: Path, targets: list[str]) -> None:
    """The rows never go over a target, into a checkpoint folder, or over a file holding model data."""
    from tiecheck.report.safewrite import UnsafeOutputError, refusal  # noqa: PLC0415 - reads zip headers

    why = refusal(output, targets) if not output.is_dir() else refusal(output, [t for t in targets
                                                                                if not Path(t).is_dir()])
    if why:
        raise UnsafeOutputError(f"refusing to write the rows to {output}: {why}; choose another file")
