"""The parent side of ``tiecheck bench --nproc-per-node N``: torchrun launched, its workers watched.

:func:`launch` runs :func:`tiecheck.bench.distributed.worker` on N processes through
``torch.distributed.run`` (torchrun's own module, so ``--nnodes``, ``--rdzv-endpoint`` and
``--node-rank`` mean what they mean there), reads their output as it comes (rank 0's progress
lines feed the bar), and stops the whole process group on Ctrl-C, SIGTERM or ``--timeout``. The
workers' side -- the strategies, the counted collectives, the result -- is
:mod:`tiecheck.bench.distributed`.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tiecheck.bench.distributed import PROGRESS, STRATEGIES, resolve_run
from tiecheck.errors import TiecheckError


@dataclass(frozen=True)
class Launch:
    """How torchrun meets the other nodes: its own options, passed through."""

    nproc_per_node: int
    nnodes: str = "1"
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    node_rank: int | None = None
    max_restarts: int | None = None

    def torchrun_args(self) -> list[str]:
        """torch.distributed.run's options: one node alone runs --standalone (it picks a free port);
        several meet at the rendezvous -- c10d, or torchrun's static one when --node-rank fixes the ranks."""
        if self.rdzv_endpoint is None and str(self.nnodes) == "1":
            out = ["--standalone"]
        else:
            out = ["--nnodes", str(self.nnodes), "--rdzv-endpoint", self.rdzv_endpoint or ""]
            # torchrun reads --node-rank only with its static rendezvous (c10d assigns node ranks as nodes arrive).
            out += (["--rdzv-backend", "static", "--node-rank", str(self.node_rank)] if self.node_rank is not None
                    else ["--rdzv-backend", "c10d"])
            if self.rdzv_id:
                out += ["--rdzv-id", self.rdzv_id]
        if self.max_restarts is not None:
            out += ["--max-restarts", str(self.max_restarts)]
        return [*out, "--nproc-per-node", str(self.nproc_per_node)]


def validate(cfg: dict[str, Any], nnodes: str = "1", rdzv_endpoint: str | None = None,
             nproc_per_node: int | None = None) -> None:
    """Reject bad input with one line before any process starts."""
    if cfg.get("strategy") not in STRATEGIES:
        raise TiecheckError(f"--strategy {cfg.get('strategy')}: choose one of {', '.join(STRATEGIES)}")
    device = (cfg.get("device") or "auto").lower()
    if device in ("auto", "cpu"):
        resolve_run(cfg, torch.device("cpu"))
    if str(nnodes) != "1" and not rdzv_endpoint:
        raise TiecheckError(f"--nnodes {nnodes}: several nodes meet at a rendezvous; give --rdzv-endpoint HOST:PORT")
    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if nproc_per_node and gpus and nproc_per_node > gpus:
        # Each rank takes the GPU of its LOCAL_RANK: a rank without one dies in CUDA ("invalid device ordinal").
        raise TiecheckError(f"--nproc-per-node {nproc_per_node}: this node has {gpus} GPU(s) visible and each rank "
                            f"takes one; use --nproc-per-node {gpus} (one rank runs DDP and FSDP2 too), or "
                            "--device cpu")


def launch(cfg: dict[str, Any], *, nproc_per_node: int, nnodes: str = "1", rdzv_endpoint: str | None = None,
           timeout: float | None = None, env: dict[str, str] | None = None, rdzv_id: str | None = None,
           node_rank: int | None = None, max_restarts: int | None = None,
           progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Run :func:`worker` on ``nproc_per_node`` processes through ``torch.distributed.run``.

    Args:
        cfg: the bench options (as the command line gives them).
        nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, node_rank, max_restarts: torchrun's.
        timeout: seconds before the workers are stopped (None: no limit).
        env: variables added to the workers' environment.
        progress: called with (done, total, label) as rank 0 reports, while the workers run.

    Returns:
        Rank 0's result on the node that holds rank 0; on any other node, ``{"elsewhere": {...}}``
        saying which host holds rank 0 and whether every check passed.

    The launched processes get their own process group, killed when the launcher is interrupted
    (Ctrl-C, SIGTERM) or ``timeout`` passes; the workers' output is read as it comes.
    """
    validate(cfg, nnodes, rdzv_endpoint, nproc_per_node)
    how = Launch(nproc_per_node, str(nnodes), rdzv_endpoint, rdzv_id, node_rank, max_restarts)
    with tempfile.TemporaryDirectory(prefix="tiecheck-dist-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", *how.torchrun_args(),
               "-m", "tiecheck.bench.distributed", "--config", json.dumps(cfg), "--result", result_path]
        code, tail = _run_streaming(cmd, {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}, timeout, progress)
        if code != 0 or not os.path.exists(result_path):
            out = list(tail)
            raised = [line for line in out if re.match(r"^\[rank\d+\]: \w*(Error|Exception)\b", line)]
            errors = [line for line in out if "tiecheck: error:" in line]
            if errors:
                raise TiecheckError(errors[0].split("tiecheck: error:", 1)[1].strip())
            shown = "\n".join(raised[:2] or [line for line in out if line.strip()][-20:])
            raise TiecheckError(f"the {nproc_per_node} worker process(es) failed (exit {code}); "
                                f"their output ends:\n{shown}")
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)


def _run_streaming(cmd: list[str], env: dict[str, str], timeout: float | None,
                   progress: Callable[[int, int, str], None] | None) -> tuple[int, collections.deque]:
    """Run ``cmd`` in a process group of its own, reading its output as it comes; (exit code, last lines).

    Progress lines go to ``progress``; the rest is kept (the last 400 lines) for an error message.
    Past ``timeout``, on Ctrl-C or on SIGTERM the whole group is stopped.
    """
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True)
    reader.start()
    tail: collections.deque = collections.deque(maxlen=400)
    deadline = None if timeout is None else time.monotonic() + timeout
    previous = _stop_on_sigterm()
    try:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                _kill(proc)
                shown = "\n".join([x for x in tail if x.strip()][-10:])
                raise TiecheckError(f"the workers did not finish within {timeout:g} s (--timeout); stopped. "
                                    f"Their output ends:\n{shown}") from None
            if line is None:
                break
            line = line.rstrip("\n")
            m = re.match(rf"^(?:\[[^\]]*\]:?\s*)?{PROGRESS} (\d+)/(\d+) (.*)$", line)
            if m:
                if progress is not None:
                    progress(int(m.group(1)), int(m.group(2)), m.group(3))
            else:
                tail.append(line)
        return proc.wait(), tail
    except BaseException:
        _kill(proc)
        raise
    finally:
        _restore_sigterm(previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM to the launcher: unwinds like Ctrl-C, so the workers are stopped before it exits."""


def _stop_on_sigterm() -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated("stopped by SIGTERM")

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _kill(proc: subprocess.Popen) -> None:
    """The launcher and every worker it started (one process group), then reaped."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
