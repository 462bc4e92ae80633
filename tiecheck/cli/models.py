"""``tiecheck models``: the bundled reference models with their sizes, tied and untied."""

from __future__ import annotations

import json

import click

from tiecheck import models as registry
from tiecheck.cli.options import format_option


@click.command("models")
@format_option(("table", "json", "markdown"), "table")
def models(fmt: str) -> None:
    """List the bundled reference models with their parameter counts, tied and untied."""
    rows = []
    for p in registry.list_presets():
        tied, untied = registry.param_count(p.name, tied=True), registry.param_count(p.name, tied=False)
        rows.append({"name": p.name, "kind": p.kind, "params_tied": tied, "params_untied": untied,
                     "tie_share": (untied - tied) / untied, "description": p.description})
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    from tabulate import tabulate  # noqa: PLC0415 - imports importlib.metadata: 50 ms off every --help

    click.echo(tabulate([[r["name"], r["kind"], f"{r['params_tied']:,}", f"{r['params_untied']:,}",
                          f"{r['tie_share']:.1%}", r["description"]] for r in rows],
                        headers=["name", "kind", "params (tied)", "params (untied)", "tie saves", "description"],
                        tablefmt="github" if fmt == "markdown" else "simple"))
