"""``tiecheck plan TARGET --wrap POLICY``: an FSDP2 wrap plan checked before launch.

Exit codes: 0 ``fully_shard`` accepts the plan and every tie stays in one unit; 1 a tie straddles
units (torch refuses the plan at the first forward, or trains the tie as separate shards);
2 bad input.
"""

from __future__ import annotations

import json
import sys

import click

from tiecheck.cli.options import EXIT_FAILED, EXIT_OK, debug_option, handle_errors, output_option, write_output
from tiecheck.cli.progress import command_progress
from tiecheck.errors import TiecheckError


def _wrap(ctx: click.Context, param: click.Parameter, value: str) -> object:
    if value in ("blocks", "none"):
        return value
    # Only a spec pays for the loaders package.
    from tiecheck.loaders.formats.spec import looks_like_spec, resolve_spec  # noqa: PLC0415

    if not looks_like_spec(value):
        raise click.BadParameter(f"{value}: choose blocks, none, or a Python spec file.py:fn")
    try:
        fn = resolve_spec(value)
    except TiecheckError as e:
        raise click.BadParameter(str(e)) from None
    if not callable(fn):
        raise click.BadParameter(f"{value}: names a {type(fn).__name__}, not a function of the model")
    return fn


@click.command("plan")
@click.argument("target")
@click.option("--wrap", "policy", default="blocks", show_default=True, callback=_wrap, metavar="POLICY",
              help="blocks: every transformer block its own fully_shard unit, the root last; none: the root "
                   "alone; FILE.py:fn: a function of the model returning the module paths to fully_shard in call "
                   "order (a list of paths in the list is one grouped call).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output format.")
@output_option
@debug_option
@handle_errors
def plan(target: str, policy: object, fmt: str, output: str | None, debug: bool) -> None:
    """Will FSDP2 fully_shard accept this wrap plan, and does every tie stay in one unit?

    TARGET is a bundled model name, a Python spec file.py:factory, or a Hugging Face model folder:
    anything that yields a module. The module is built on the meta device and the plan replayed
    without a process group.
    """
    progress = command_progress(2)  # build the module, replay the plan
    try:
        # The boundary where the work starts: the loaders and the planner import torch.
        from tiecheck.loaders import load_target  # noqa: PLC0415
        from tiecheck.plan.wrap import check_plan, render_text  # noqa: PLC0415

        progress(0, f"building {target} on the meta device")
        subject = load_target(target)
        module = subject.module if subject.module is not None else subject.architecture
        if module is None:
            raise TiecheckError(f"{target}: holds tensors but no module to shard; give a bundled model name, a "
                                "Python spec file.py:factory or a Hugging Face model folder")
        progress(1, "replaying the wrap plan")
        check = check_plan(module, policy)  # type: ignore[arg-type]
    finally:
        progress.close()
    text = json.dumps({"target": target, **check.to_dict()}, indent=2) + "\n" if fmt == "json" else \
        render_text(check, target)
    write_output(text, output, protect=(target,))
    sys.exit(EXIT_OK if check.accepted else EXIT_FAILED)
