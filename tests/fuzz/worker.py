"""A long-lived process that runs ``tiecheck`` commands in-process for the fuzz tests.

Starting Python with torch costs seconds, so the fuzz tests keep one worker and send it one
command per case, a JSON line on stdin. The answer, a JSON line on the original stdout, carries
the exit code, everything the command printed — through click, and straight to file descriptors
1 and 2, where C++ warnings and crashes go — and how much the case raised the peak resident
memory. The parent enforces the time bound: a case that does not answer in time is killed with
its worker (faulthandler first dumps where it hung into the capture file).

Run as ``python fuzz_worker.py CAPTURE_FILE``.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import resource
import sys
import time
import traceback


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (VmRSS, VmHWM, VmSize)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs), so each case has its own peak.

    False where the kernel does not allow it; the case's growth is then measured on VmRSS after
    the case, which misses memory freed before it ends.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    capture = sys.argv[1]
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)

    # Imported once stdout points at /dev/null: nothing printed while importing reaches the protocol.
    from click.testing import CliRunner  # noqa: PLC0415

    from tiecheck.cli import main as cli  # noqa: PLC0415

    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("limit_as_extra_mb"):
            # A backstop for the machine running the tests, never the thing under test: peak RSS is.
            limit = status_kb("VmSize") * 1024 + req["limit_as_extra_mb"] * (1 << 20)
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        fd = os.open(capture, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        faulthandler.dump_traceback_later(req.get("timeout", 60), exit=False, file=sys.__stderr__)
        out: dict = {"escaped": None}
        try:
            peak = "VmHWM" if reset_peak() else "VmRSS"
            rss0 = status_kb("VmRSS")
            t0 = time.perf_counter()
            res = CliRunner().invoke(cli, req["args"], catch_exceptions=True)
            out["elapsed"] = time.perf_counter() - t0
            out["exit_code"] = res.exit_code
            out["stdout"], out["stderr"] = res.stdout, res.stderr
            if res.exception is not None and not isinstance(res.exception, SystemExit):
                out["escaped"] = "".join(traceback.format_exception(res.exception))
            gc.collect(1)  # young garbage only: a full collection costs ~0.3 s with torch loaded
            out["peak_growth_mb"] = (status_kb(peak) - rss0) / 1024
        except BaseException:  # noqa: BLE001 - the worker itself must answer whatever happens
            out["escaped"] = traceback.format_exc()
        finally:
            faulthandler.cancel_dump_traceback_later()
            sys.__stdout__.flush()
            sys.__stderr__.flush()
            os.dup2(null, 1)
            os.dup2(null, 2)
        proto.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
