"""``tiecheck bench``: the command over ``tiecheck.bench.run_bench``.

Exit codes: 0 measured and every check passed; 1 a correctness check failed (the tied variant
came untied, the untied one did not diverge, a loss was not finite); 2 bad input, or a variant
that could not be measured (out of memory) -- the other variant's figures are still printed.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from tiecheck.cli.options import (
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_OK,
    handle_errors,
    write_output,
)
from tiecheck.cli.progress import Progress
from tiecheck.errors import TiecheckError


def _command(ctx: click.Context) -> str:
    """The command as typed when run as ``tiecheck``; otherwise rebuilt from the options given."""
    if os.path.basename(sys.argv[0]) == "tiecheck" and len(sys.argv) > 1 and sys.argv[1] == "bench":
        return shlex.join(["tiecheck", *sys.argv[1:]])
    parts = ["tiecheck", "bench"]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        flag, value = param.opts[-1] if param.opts[-1].startswith("--") else param.opts[0], ctx.params[param.name]
        parts += [flag] if getattr(param, "is_flag", False) else [flag, str(value)]
    return shlex.join(parts)


def _check_writable(option: str, path: str | None) -> None:
    if path is None or path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise TiecheckError(f"{option} {path}: is a folder; give a file name")
    if not p.parent.exists():
        raise TiecheckError(f"{option} {path}: folder {p.parent} does not exist")


@click.command("bench")
@click.option("--model", metavar="NAME|PATH|SPEC", help="A bundled model (see `tiecheck models`), a Hugging Face "
              "folder or its config.json (built from the config, random weights), or path/to/file.py:factory "
              "with factory(tied: bool, vocab_size=..., seed=...) returning the model (every mode; see "
              "docs/bench.md). Default: gpt2-124m on a GPU, gpt-mini on the CPU.")
@click.option("--mode", type=click.Choice(["train", "infer", "converge"]), default="train", show_default=True,
              help="train: forward + backward + AdamW step. infer: no-grad forward, and greedy decoding "
                   "with a KV cache for decoders. converge: train both variants on real text over several "
                   "seeds and compare their loss curves.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Matmul precision (autocast; weights stay fp32; with --strategy fsdp2 also FSDP2's "
                   "MixedPrecisionPolicy). Default: bf16 on a GPU that has it, else fp32.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile both variants.")
@click.option("--batch-size", type=int, help="Sequences per step. Default: 16 on a GPU, 4 on the CPU.")
@click.option("--seq-len", type=int, help="Tokens per sequence. Default: 1024 on a GPU, 64 on the CPU "
              "(at most the model's positions).")
@click.option("--rounds", type=int, help="Interleaved rounds (A B, B A, ...). Default: 20 on a GPU, 24 on the CPU.")
@click.option("--steps", type=int, help="Timed steps per variant per round. Default: 5 on a GPU, 3 on the CPU.")
@click.option("--warmup", type=int, help="Untimed steps per variant first (at least 2 for training). Default: 3 on a GPU, 2 on the "
                   "CPU, 5 with --compile.")
@click.option("--decode-tokens", type=int, help="New tokens per decoding call in infer mode. "
              "Default: 64 on a GPU, 16 on the CPU.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights and the batches.")
@click.option("--threads", type=int, help="CPU threads for torch. Default: 1 on the CPU (steady timings on a "
              "busy machine), torch's own setting with a GPU.")
@click.option("--find-max-batch", is_flag=True, help="GPU only: the largest batch each variant fits alone, "
              "and its throughput there.")
@click.option("--max-batch-cap", type=int, default=1024, show_default=True,
              help="Largest batch --find-max-batch tries.")
@click.option("--peak-tflops", type=float, help="Peak TFLOP/s of the device for MFU, overriding the built-in table.")
@click.option("--pad-vocab", type=int, help="Pad the model's vocabulary to a multiple of N for aligned matmul kernels "
              "(tokens are still drawn from the real vocabulary). Default: 64 on a GPU, 1 (no padding) on the CPU.")
@click.option("--progress-lines", is_flag=True, help="Report progress as plain lines on stderr (for logs), "
              "instead of a bar drawn only on a terminal.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "markdown"]), default="table",
              show_default=True, help="Output format.")
@click.option("-o", "--output", metavar="FILE", help="Write the results to FILE instead of standard output.")
@click.option("--plot", metavar="FILE", help="Plot tokens/s and memory per variant to FILE (png, svg, pdf); "
              "needs matplotlib (pip install 'tiecheck[plot]').")
@click.option("--seeds", type=int, help="converge: seeds (each a new init and data order, shared by both "
              "variants). Default 3.")
@click.option("--eval-every", type=int, help="converge: steps between validation passes. Default 25 on the CPU, 100 on a GPU.")
@click.option("--vocab-size", type=int, help="converge: size of the BPE trained on the corpus (and of the model's "
              "vocabulary). Default 8192.")
@click.option("--text", metavar="FILE|DIR", help="converge: your own text (a file, or a folder of text files) "
              "instead of the standard library's sources.")
@click.option("--tokenizer", metavar="PATH", help="converge: a tokenizer.json (or a folder holding one) instead "
              "of training a BPE.")
@click.option("--no-cache", is_flag=True, help="converge: neither read nor write the tokenizer cache "
              "($XDG_CACHE_HOME/tiecheck/tokenizers, else ~/.cache/tiecheck/tokenizers).")
@click.option("--quick", is_flag=True, help="converge: a smoke test for CI (smaller model, short run, under 30 s).")
@click.option("--nproc-per-node", type=click.IntRange(min=1), help="Run on N processes through "
              "torch.distributed.run (torchrun): DDP or FSDP2, gloo on the CPU, nccl on GPUs; adds bytes "
              "communicated per step. See docs/distributed.md.")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp2"]), default="ddp", show_default=True,
              help="With --nproc-per-node: DistributedDataParallel, or FSDP2 fully_shard (every block a unit, the "
                   "root last, ties kept in one unit by `tiecheck plan`).")
@click.option("--nnodes", default="1", show_default=True, help="With --nproc-per-node: torchrun's --nnodes.")
@click.option("--rdzv-endpoint", metavar="HOST:PORT", help="With --nproc-per-node: torchrun's --rdzv-endpoint "
              "(multi-node); without it one node runs --standalone.")
@click.option("--rdzv-id", metavar="ID", help="With --nproc-per-node: torchrun's --rdzv-id (the same on every node "
              "of one job, e.g. $SLURM_JOB_ID).")
@click.option("--node-rank", type=click.IntRange(min=0), help="With --nproc-per-node: this node's rank (torchrun's "
              "static rendezvous; node 0 hosts it at --rdzv-endpoint). Without it c10d ranks the nodes as they "
              "arrive.")
@click.option("--max-restarts", type=click.IntRange(min=0), help="With --nproc-per-node: torchrun's --max-restarts.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="With --nproc-per-node: stop the workers after SECONDS (default: no limit).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def bench(**options):
    """Tied vs untied: throughput, step phases, memory and MFU of a bundled model.

    Both variants start from identical weights and see identical batches; rounds alternate
    their order (A B, B A, ...) so drift cancels; warm-up is excluded; medians come with 95%
    bootstrap intervals, and the tied/untied ratio with a verdict.
    """
    handle_errors(_bench)(**options)


# Options of the timing modes that --mode converge does not use, and the converge-only ones.
_TIMING_ONLY = ("compile_", "rounds", "warmup", "decode_tokens", "find_max_batch", "peak_tflops", "pad_vocab",
                "max_batch_cap")
_CONVERGE_ONLY = ("seeds", "eval_every", "vocab_size", "text", "tokenizer", "no_cache", "quick")


def _flag(name: str) -> str:
    return "--" + name.rstrip("_").replace("_", "-")


def _check_mode_options(mode: str) -> None:
    ctx = click.get_current_context()
    given = {n for n, v in ctx.params.items()
             if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE and v not in (None, False)}
    wrong = [n for n in (_TIMING_ONLY if mode == "converge" else _CONVERGE_ONLY) if n in given]
    if wrong:
        where = "--mode converge does not use" if mode == "converge" else "only --mode converge uses"
        raise TiecheckError(f"{where} {', '.join(_flag(n) for n in wrong)}; drop it or change --mode")


# The options that say how to launch several processes: meaningless (and once silently ignored) without them.
_LAUNCH_ONLY = ("strategy", "nnodes", "rdzv_endpoint", "rdzv_id", "node_rank", "max_restarts", "timeout")


def _check_launch_options(nproc_per_node: int | None) -> None:
    if nproc_per_node:
        return
    ctx = click.get_current_context()
    given = [n for n in _LAUNCH_ONLY if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise TiecheckError(f"{', '.join(_flag(n) for n in given)} only with --nproc-per-node N (the processes per "
                            "node); add it, or drop them for a single-process run")


def _bench(model, mode, device, dtype, compile_, batch_size, seq_len, rounds, steps, warmup, decode_tokens, seed,
           threads, find_max_batch, max_batch_cap, peak_tflops, pad_vocab, progress_lines, fmt, output, plot,
           seeds, eval_every, vocab_size, text, tokenizer, no_cache, quick, nproc_per_node, strategy, nnodes,
           rdzv_endpoint, rdzv_id, node_rank, max_restarts, timeout, debug):
    _check_mode_options(mode)
    _check_launch_options(nproc_per_node)
    if nproc_per_node:
        _distributed(locals())
        return
    # The boundary where the work starts: the bench imports torch (a plot imports matplotlib when drawn).
    from tiecheck.bench import BenchConfig, converge, render, run_bench, runner  # noqa: PLC0415
    from tiecheck.bench import plot as plots  # noqa: PLC0415 - the module; matplotlib only when drawing

    _check_writable("-o", output)
    _check_writable("--plot", plot)
    if plot:
        plots.require_matplotlib()
    if mode == "converge":
        cfg = converge.ConvergeConfig(model=model, device=device, dtype=dtype, steps=steps, seeds=seeds, eval_every=eval_every,
                                      batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size, text=text,
                                      tokenizer=tokenizer, cache=not no_cache, quick=quick, seed=seed, threads=threads)
        _converge(cfg, fmt, output, plot, progress_lines)
        return
    cfg = BenchConfig(model=model, mode=mode, device=device, dtype=dtype, compile=compile_, batch_size=batch_size,
                      seq_len=seq_len, rounds=rounds, steps=steps, warmup=warmup, decode_tokens=decode_tokens,
                      seed=seed, threads=threads, find_max_batch=find_max_batch, max_batch_cap=max_batch_cap,
                      peak_tflops=peak_tflops, pad_vocab=pad_vocab)
    plan = runner.resolve(cfg)  # bad input fails here, before anything is built
    progress = Progress(plan.units(), lines=progress_lines)
    # With -o FILE, the result so far is written before --find-max-batch starts and after each
    # variant, so a run stopped by a time limit still leaves the interleaved table.
    partial = (lambda r: write_output(render(r, fmt), output)) if output not in (None, "-") else None
    try:
        result = run_bench(cfg, progress=progress, command=_command(click.get_current_context()), partial=partial)
    finally:
        progress.close()
    failures = result.failures()
    if not result.measured():  # nothing to show but the reason
        raise TiecheckError("; ".join(failures) or "nothing was measured")
    write_output(render(result, fmt), output)
    if plot:
        plots.plot(result, plot)
    if failures:
        click.echo(f"tiecheck: error: {'; '.join(failures)}", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_OK if result.checks_passed() else EXIT_FAILED)


def _converge(cfg, fmt: str, output: str | None, plot: str | None, progress_lines: bool = False) -> None:
    """``--mode converge``: train, then print the curves and verdicts; exit 1 when a check failed."""
    # imported by _bench already: the same boundary
    from tiecheck.bench import converge, result_text  # noqa: PLC0415
    from tiecheck.bench import plot as plots  # noqa: PLC0415

    plan = converge.resolve(cfg)  # bad input fails here, before the corpus is read
    progress = Progress(plan.units(), lines=progress_lines)

    def announce(budget: str) -> None:
        # What the run will do, before training starts: a GPU slot's length is known in advance, the run's is not.
        click.echo(f"tiecheck: converge budget: {budget}", err=True)

    try:
        result = converge.run_converge(cfg, progress=progress, command=_command(click.get_current_context()),
                                       announce=announce)
    finally:
        progress.close()
    write_output(result_text.render_converge(result, fmt), output, protect=tuple(p for p in (cfg.text, cfg.tokenizer) if p))
    if plot:
        plots.plot_converge(result, plot)
    sys.exit(EXIT_OK if result.checks_passed() else EXIT_FAILED)


def _distributed(o: dict) -> None:
    """``--nproc-per-node N``: the bench relaunched through torch.distributed.run (tiecheck.bench.distributed)."""
    refused = [flag for flag, on in ((f"--mode {o['mode']}", o["mode"] != "train"), ("--compile", o["compile_"]),
                                     ("--find-max-batch", o["find_max_batch"]), ("--plot", o["plot"]),
                                     ("--format csv", o["fmt"] == "csv")) if on]
    if refused:
        raise TiecheckError(f"--nproc-per-node: {', '.join(refused)} is not supported with several processes; "
                            "drop it, or run without --nproc-per-node")
    _check_writable("-o", o["output"])
    # The boundary where the work starts: the launcher imports torch.distributed.
    from tiecheck.bench import distributed, launcher  # noqa: PLC0415

    cfg = {k: o[k] for k in ("model", "device", "dtype", "batch_size", "seq_len", "rounds", "steps", "warmup",
                             "seed", "threads", "pad_vocab", "strategy")}
    cfg["command"] = _command(click.get_current_context())
    cfg["output"] = os.path.abspath(o["output"]) if o["output"] not in (None, "-") else None
    launcher.validate(cfg, o["nnodes"], o["rdzv_endpoint"], o["nproc_per_node"])
    nodes = f" on {o['nnodes']} nodes" if str(o["nnodes"]) != "1" else ""
    click.echo(f"tiecheck: launching {o['nproc_per_node']} process(es) per node{nodes} ({o['strategy']})", err=True)
    bar: list[Progress] = []

    def progress(done: int, total: int, label: str) -> None:
        # Rank 0's progress, shown as it comes: a bar on a terminal, plain lines with --progress-lines.
        if not bar:
            bar.append(Progress(total, lines=o["progress_lines"]))
        bar[0](done - bar[0].done, label)

    try:
        result = launcher.launch(cfg, nproc_per_node=o["nproc_per_node"], nnodes=o["nnodes"], rdzv_endpoint=o["rdzv_endpoint"],
                        rdzv_id=o["rdzv_id"], node_rank=o["node_rank"], max_restarts=o["max_restarts"],
                        timeout=o["timeout"], progress=progress)
    finally:
        if bar:
            bar[0].close()
    if "elsewhere" in result:
        e = result["elsewhere"]
        where = f"its {e['output']}" if e["output"] else "its standard output"
        click.echo(f"tiecheck: node {e['node']} of {e['nodes']} done; the results are written by the node of rank 0 "
                   f"({e['host']}) to {where}; {'every check passed' if e['passed'] else 'a check FAILED'}", err=True)
        sys.exit(EXIT_OK if e["passed"] else EXIT_FAILED)
    write_output(distributed.render(result, o["fmt"]), o["output"])
    sys.exit(EXIT_OK if all(result["checks"].values()) else EXIT_FAILED)
