"""Running ``scan_target`` over many targets: a local process pool, or Ray tasks on a cluster.

Both engines run the same function (``row.scan_target``) and yield its rows as they finish, with
at most a few targets per worker in flight, so a scan of a million targets holds a few rows in
memory. A worker that dies while reading a target (a crash in native code, the out-of-memory
killer, a spec that calls ``os._exit``) costs that target a row saying so, never the scan:

* the process pool (``concurrent.futures``; see ``process_context``) breaks as a whole
  when one of its processes dies, failing every target in flight; those are run again one at a
  time, each in a process of its own, so the one that crashes is named and the others get their
  rows; the pool is then started again for the rest;
* Ray names the task whose worker died (``WorkerCrashedError``), with retries off, so a crashing
  target is not run again and again.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tiecheck.errors import TiecheckError
from tiecheck.scan.row import ScanOptions, error_row, scan_target

ENGINES = ("pool", "ray")
IN_FLIGHT_PER_WORKER = 2  # targets queued per worker: enough to keep it busy, few to lose to a crash


def crash_text(exitcode: int | None) -> str:
    """What a dead worker's exit code says, for the target's row."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        how = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        how = f"exit code {exitcode}"
    return f"the worker process died while reading this target ({how}); the rest of the scan went on"


def _worker_init() -> None:
    """A pool worker: one torch thread (the pool is the parallelism), Ctrl-C left to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch  # noqa: PLC0415 - the worker's first target would import it anyway

    torch.set_num_threads(1)


def _isolated(target: str, options: ScanOptions, ctx: Any) -> dict[str, Any]:
    """``scan_target`` in a process of its own: its row, or a row saying how the process died."""
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_isolated_child, args=(target, options, send), daemon=True)
    proc.start()
    send.close()
    try:
        row = receive.recv()
    except EOFError:  # the process died before it answered
        row = None
    finally:
        receive.close()
        proc.join()
    return row if row is not None else error_row(target, crash_text(proc.exitcode))


def _isolated_child(target: str, options: ScanOptions, send: Any) -> None:
    _worker_init()
    send.send(scan_target(target, options))
    send.close()


def process_context() -> Any:
    """How workers start: from a fork server that imported torch and tiecheck once (each worker is then
    a fork of it, ready at once), where the platform has one; else spawned, each importing them.
    Never a plain fork of this process, whose threads (a progress bar's timer) a child would copy."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["tiecheck.api", "tiecheck.scan.row"])
        return ctx
    return multiprocessing.get_context("spawn")


def run_pool(targets: Iterable[str], options: ScanOptions, jobs: int) -> Iterator[dict[str, Any]]:
    """Rows of ``targets`` from ``jobs`` local worker processes, as they finish.

    Args:
        targets: what to scan.
        options: how each target is read.
        jobs: worker processes.

    Yields:
        One row per target, in the order they finish.
    """
    ctx = process_context()
    queue = deque(targets)
    while queue:
        suspects: list[str] = []
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init)
        inflight: dict[Future, str] = {}
        try:
            while queue or inflight:
                while queue and len(inflight) < IN_FLIGHT_PER_WORKER * jobs and not suspects:
                    target = queue.popleft()
                    inflight[pool.submit(scan_target, target, options)] = target
                if not inflight:
                    break
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for future in done:
                    target = inflight.pop(future)
                    try:
                        yield future.result()
                    except BrokenProcessPool:
                        suspects.append(target)
                if suspects:  # the pool is broken: everything still in flight failed with it
                    suspects += [inflight.pop(f) for f in list(inflight)]
                    break
        finally:
            for f in inflight:
                f.cancel()
            pool.shutdown(wait=not suspects, cancel_futures=True)
        for target in suspects:  # one at a time, alone: the one that crashes is named
            yield _isolated(target, options, ctx)


def run_ray(targets: Iterable[str], options: ScanOptions, jobs: int, address: str | None) -> Iterator[dict[str, Any]]:
    """Rows of ``targets`` from Ray tasks, as they finish (``ray.wait``).

    Args:
        targets: what to scan.
        options: how each target is read.
        jobs: CPUs of the local cluster started when there is none to join (``ray.init(num_cpus=jobs)``).
        address: the cluster to join (``ray.init(address=...)``); None joins ``RAY_ADDRESS`` when it is
            set, else starts a local cluster.

    Yields:
        One row per target, in the order they finish.
    """
    try:
        import ray  # noqa: PLC0415 - the `ray` extra, only for --engine ray
    except ImportError:
        raise TiecheckError("--engine ray needs Ray: pip install 'tiecheck[ray]'") from None
    started = not ray.is_initialized()
    if started:
        local = address is None and not os.environ.get("RAY_ADDRESS")
        try:
            ray.init(address=address, num_cpus=jobs if local else None, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise TiecheckError(f"cannot start or join a Ray cluster (address {address or 'local'}): {first}") from None
    task = ray.remote(num_cpus=1, max_retries=0)(scan_target)
    window = IN_FLIGHT_PER_WORKER * max(1, int(ray.cluster_resources().get("CPU", jobs)))
    queue = deque(targets)
    inflight: dict[Any, str] = {}
    try:
        while queue or inflight:
            while queue and len(inflight) < window:
                target = queue.popleft()
                inflight[task.remote(target, options)] = target
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                target = inflight.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as e:  # the task's worker died: the row says so
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    yield error_row(target, f"the Ray worker died while reading this target ({type(e).__name__}: "
                                            f"{first}); the rest of the scan went on")
    finally:
        for ref in inflight:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def run(targets: Iterable[str], options: ScanOptions, *, engine: str = "pool", jobs: int = 1,
        address: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of ``targets`` from the chosen engine (``pool`` or ``ray``)."""
    runners: dict[str, Callable[[], Iterator[dict[str, Any]]]] = {
        "pool": lambda: run_pool(targets, options, jobs),
        "ray": lambda: run_ray(targets, options, jobs, address),
    }
    if engine not in runners:
        raise TiecheckError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    return runners[engine]()
