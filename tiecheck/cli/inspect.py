"""``tiecheck inspect TARGET``: every tie in a target and what it saves."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

import click

from tiecheck.cli.options import (
    debug_option,
    expect_tied_option,
    format_option,
    handle_errors,
    ignore_option,
    key_option,
    output_option,
    trust_options,
    warn_trust,
    write_output,
)
from tiecheck.cli.progress import command_progress
from tiecheck.errors import TiecheckError


class InputsSpec(NamedTuple):
    """``--inputs FILE.py:make_inputs``: the spec as typed (an input the output must not overwrite)
    and the function it names."""

    text: str
    make_inputs: Callable


def _inputs(ctx: click.Context, param: click.Parameter, value: str | None) -> InputsSpec | None:
    if value is None:
        return None
    # The loaders package (file formats, bundled models) costs 0.1 s: only a given --inputs pays it here.
    from tiecheck.loaders.formats.spec import resolve_spec  # noqa: PLC0415

    try:
        fn = resolve_spec(value)
    except TiecheckError as e:
        raise click.BadParameter(str(e)) from None
    if not callable(fn):
        raise click.BadParameter(f"{value}: names a {type(fn).__name__}, not a function")
    return InputsSpec(value, fn)


@click.command("inspect")
@click.argument("target")
@format_option(("table", "json", "markdown", "csv"), "table")
@output_option
@click.option("--fail-on", type=click.Choice(["error", "warning", "never"]), default="error", show_default=True,
              help="Exit 1 when a finding of this severity or worse is present.")
@expect_tied_option
@ignore_option
@key_option
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
@click.option("--inputs", "inputs_spec", metavar="FILE.py:make_inputs", callback=_inputs,
              help="Python spec of make_inputs(module, batch_size, seq_len) returning the forward's inputs.")
@click.option("--base", metavar="PATH", default=None,
              help="For a PEFT adapter folder: the base model whose ties the adapter is held against.")
@trust_options
@debug_option
@handle_errors
def inspect(target: str, fmt: str, output: str | None, fail_on: str, expect_tied: list[tuple[str, ...]],
            ignore: tuple[str, ...], key: str | None, trust_pickle: bool, trust_remote_code: bool, no_duplicates: bool, optimizer: str,
            no_flops: bool, batch_size: int, seq_len: int, causal_attention_half: bool,
            inputs_spec: InputsSpec | None, base: str | None, debug: bool) -> None:
    """Find every tie in TARGET and what it saves.

    TARGET is a checkpoint file or folder (torch.save, safetensors, a Hugging Face model folder,
    torch.export .pt2, TorchScript, a torch.distributed.checkpoint folder), a bundled model name
    (see `tiecheck models`), or a Python spec `path/to/file.py:factory` / `package.module:factory`.
    """
    warn_trust(trust_pickle, trust_remote_code)
    # phases: reading, the content pass, counting FLOPs; the bar is cleared before the report is written
    progress = command_progress(1 + (not no_duplicates) + (not no_flops))
    try:
        # The boundary where the work starts: the API imports torch, the renderers pandas.
        from tiecheck.api import analyze  # noqa: PLC0415
        from tiecheck.report.render import render  # noqa: PLC0415

        report = analyze(target, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                         duplicates=not no_duplicates, optimizer=optimizer, expect_tied=expect_tied,
                         flops=not no_flops, batch_size=batch_size, seq_len=seq_len,
                         attention="causal-half" if causal_attention_half else "full",
                         inputs=inputs_spec.make_inputs if inputs_spec else None, base=base,
                         progress=progress if progress.enabled else None, ignore=ignore)
    finally:
        progress.close()
    write_output(render(report, fmt), output, protect=(target, inputs_spec.text if inputs_spec else None, base))
    sys.exit(report.exit_code(fail_on))
