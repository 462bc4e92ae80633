"""Shared helpers for the benchmarks: big fixture files made on the fly, and child-process measurements.

Files named ``bench_*.py`` are collected from here (``pytest_collect_file`` below), so
``pytest benchmarks/ --benchmark-only`` finds them while the normal run (``testpaths = tests``)
never imports them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

# The benchmarks reuse the suite's synthetic builders (tests/support), as the suite itself imports them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

RESULTS = Path(__file__).parent / "results"
_published: dict[str, list[str]] = {}  # benchmark module -> the figure lines its tests printed


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself whatever its name; only
    # the ones found by walking a folder need this hook (else they would run twice).
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def publish(request):
    """Print a figure line (as ``-s`` shows it) and keep it for ``results/<module>.txt``.

    The figures in benchmarks/README.md are copied from these files, so each one has its raw
    output committed beside the command that printed it.
    """
    def emit(text: str) -> None:
        print(text)
        lines = _published.setdefault(request.module.__name__, [])
        lines += [f"{request.node.name}: {line}" for line in text.strip("\n").splitlines()]
    return emit


def pytest_sessionfinish(session, exitstatus):
    """Write each module's published lines, under a header saying how and where they were measured."""
    if not _published:
        return
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    header = (f"command    pytest {' '.join(sys.argv[1:])}\n"
              f"date       {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
              f"host       {platform.machine()}, {os.cpu_count()} CPUs, load average {load} at the end\n"
              f"software   torch {torch.__version__}, python {platform.python_version()}\n"
              f"exit       {int(exitstatus)}\n\n")
    RESULTS.mkdir(exist_ok=True)
    for module, lines in _published.items():
        (RESULTS / f"{module}.txt").write_text(header + "\n".join(lines) + "\n")


def run_child(code: str, setup: str = "") -> dict:
    """Run ``setup`` then ``code`` in a fresh interpreter and measure ``code`` alone.

    Returns what the code put in ``_out`` plus ``wall_s`` (the code, not the setup),
    ``peak_rss_mib``: the child's own high-water mark (VmHWM; getrusage's ru_maxrss would not
    do: Linux keeps it across fork and exec, so a child would inherit the parent's peak), and
    ``rchar``: the bytes the code read as the OS counts them (``/proc/self/io``, every read() and
    pread() of the process, whichever file), the one count a figure that says "read" quotes.
    """
    wrapper = textwrap.dedent("""
        import json, sys, time
        def _hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        def _rchar():
            for line in open("/proc/self/io"):
                if line.startswith("rchar:"):
                    return int(line.split()[1])
        _out = {}
        _g = {"_out": _out}
        exec(compile(sys.argv[1], "<setup>", "exec"), _g)
        _out["setup_rss_mib"] = _hwm()
        _r0 = _rchar()
        _t0 = time.perf_counter()
        exec(compile(sys.argv[2], "<bench>", "exec"), _g)
        _out["wall_s"] = time.perf_counter() - _t0
        _out["rchar"] = _rchar() - _r0
        _out["peak_rss_mib"] = _hwm()
        print(json.dumps(_out))
    """)
    proc = subprocess.run([sys.executable, "-c", wrapper, setup, code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tied_bf16_file(tmp_path_factory):
    """A >= 1 GB tied bf16 state dict shaped like a small Llama (embedding tied to lm_head)."""

    path = tmp_path_factory.mktemp("big") / "tied_bf16.pt"
    g = torch.Generator().manual_seed(0)
    d, ff, vocab, layers = 2048, 5632, 32000, 9
    emb = torch.randn(vocab, d, generator=g, dtype=torch.float32).to(torch.bfloat16)
    sd = {"model.embed_tokens.weight": emb, "lm_head.weight": emb}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = torch.randn(d, d, generator=g).to(torch.bfloat16)
        for n, shape in (("gate_proj", (ff, d)), ("up_proj", (ff, d)), ("down_proj", (d, ff))):
            sd[p + f"mlp.{n}.weight"] = torch.randn(*shape, generator=g).to(torch.bfloat16)
        sd[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    sd["model.norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    torch.save(sd, path)
    del sd, emb
    return path


@pytest.fixture(scope="session")
def planted_duplicate_file(tmp_path_factory):
    """1 GiB of same-shape random float32 tensors, one of which is a copy of another."""

    path = tmp_path_factory.mktemp("dups") / "same_shape.pt"
    g = torch.Generator().manual_seed(1)
    n, shape = 256, (1024, 1024)
    sd = {f"layers.{i}.weight": torch.randn(*shape, generator=g) for i in range(n)}
    sd["layers.200.weight"] = sd["layers.17.weight"].clone()
    torch.save(sd, path)
    del sd
    return path
