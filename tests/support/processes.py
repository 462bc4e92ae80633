"""Child processes for the multi-process tests: a free loopback port, and a command run in its own
process group with a time limit, the whole group killed if it overruns or the test fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(cmd: list[str], timeout: float = 90) -> tuple[int, str]:
    """Run ``cmd`` with this checkout first on PYTHONPATH; (exit code, stdout and stderr together).

    The command starts a process session of its own, so torch.distributed.run and every worker it
    spawned are killed together when the time is up or the caller is interrupted.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


