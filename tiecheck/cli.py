"""The ``tiecheck`` command line: thin commands over the library API.

Exit codes: 0 clean, 1 a check failed, 2 usage or input error. Heavy imports (torch, pandas)
happen inside the commands that need them, so ``tiecheck --help`` and ``tiecheck models``
start fast.
"""

from __future__ import annotations

import sys

import click

from tiecheck import __version__

from tiecheck.cliutil import (EXIT_ERROR, EXIT_FAILED, EXIT_OK, handle_errors, parse_expect, trust_options, warn_trust,
                              write_output)

__all__ = ["main", "EXIT_OK", "EXIT_FAILED", "EXIT_ERROR", "handle_errors", "parse_expect", "write_output"]


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
@click.option("--no-duplicates", is_flag=True, help="Skip the content pass that finds untied duplicates.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd", "none"]), default="adamw", show_default=True,
              help="Optimizer assumed for training memory.")
@click.option("--no-flops", is_flag=True, help="Skip counting forward FLOPs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size of the synthesized inputs for FLOPs.")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Sequence length for FLOPs (capped by the model's maximum positions).")
@click.option("--causal-attention-half", is_flag=True,
              help="Count causal attention at half the full score matrix (FlashAttention convention).")
@click.option("--inputs", "inputs_spec", metavar="FILE.py:make_inputs",
              help="Python spec of make_inputs(module, batch_size, seq_len) returning the forward's inputs.")
@trust_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@handle_errors
def inspect(target, fmt, output, fail_on, expect_tied, key, trust_pickle, trust_remote_code, no_duplicates, optimizer,
            no_flops, batch_size, seq_len, causal_attention_half, inputs_spec, debug):
    """Find every tie in TARGET and what it saves.

    TARGET is a checkpoint file or folder (torch.save, safetensors, a Hugging Face model folder,
    torch.export .pt2, TorchScript, a torch.distributed.checkpoint folder), a bundled model name
    (see `tiecheck models`), or a Python spec `path/to/file.py:factory` / `package.module:factory`.
    """
    from tiecheck.api import analyze
    from tiecheck.errors import TiecheckError
    from tiecheck.render import render

    expected = parse_expect(expect_tied)
    warn_trust(trust_pickle, trust_remote_code)
    inputs = None
    if inputs_spec:
        from tiecheck.loaders.spec import resolve_spec

        inputs = resolve_spec(inputs_spec)
        if not callable(inputs):
            raise TiecheckError(f"--inputs {inputs_spec}: names a {type(inputs).__name__}, not a function")
    report = analyze(target, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                     duplicates=not no_duplicates, optimizer=optimizer, expect_tied=expected, flops=not no_flops,
                     batch_size=batch_size, seq_len=seq_len,
                     attention="causal-half" if causal_attention_half else "full", inputs=inputs)
    write_output(render(report, fmt), output, protect=(target, inputs_spec))
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


# Commands that live in their own modules. They import their helpers from tiecheck.cliutil,
# never from this module, so `python -m tiecheck.cli` does not import this file twice.
from tiecheck.check import check as _check  # noqa: E402
from tiecheck.cli_bench import bench as _bench  # noqa: E402
from tiecheck.cli_diff import diff_command as _diff  # noqa: E402

main.add_command(_check)
main.add_command(_diff)
main.add_command(_bench)

if __name__ == "__main__":  # pragma: no cover
    main()
