"""Speed and memory of `tiecheck fix` on a 1 GiB broken-tie safetensors file, against a plain copy.

Run: pytest benchmarks/bench_fix.py --benchmark-only -s
Targets: the whole fix (write and verification) within 1.5x a `shutil.copyfile` of the same file
measured in the same run on a warm page cache (figures for a cold input beside it), and peak RSS
under the import baseline + 10% of the file.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import run_child

SETUP = "import shutil, torch, safetensors, tiecheck, tiecheck.repair, tiecheck.api, tiecheck.loaders.content"
COPY = "shutil.copyfile({src!r}, {dst!r})"
# The whole fix, and its write and verification phases timed apart (wrapping the functions fix() calls).
FIX = """
import sys, time
_ns = sys.modules["tiecheck.repair"].__dict__
def _timed(name, f):
    def g(*a, **k):
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            _out[name + "_s"] = time.perf_counter() - t0
    return g
_ns["write"], _ns["verify"] = _timed("write", _ns["write"]), _timed("verify", _ns["verify"])
_r = tiecheck.fix({src!r}, {dst!r})
_out["verified"], _out["actions"] = _r.verified, [a.kind for a in _r.plan.actions]
_out["saved"] = _r.plan.totals()["disk_saved"]
"""

EMB, LAYER = (32768, 2048), (4096, 4096)  # bf16: 128 MiB each embedding copy, 32 MiB a layer
LAYERS = 24


def _bf16_block(nbytes: int, seed: int) -> bytes:
    """Pseudo-random bytes, cheap to make: a 1 MiB random block repeated (every tensor distinct by seed)."""
    block = bytearray(os.urandom(1 << 20))
    block[:8] = seed.to_bytes(8, "little")
    return bytes(block) * (nbytes >> 20)


@pytest.fixture(scope="module")
def broken_tie_file(tmp_path_factory):
    """~1 GiB safetensors whose __metadata__ says lm_head.weight is model.embed_tokens.weight (as
    safetensors.torch.save_model writes it) while the file still stores both, equal (TC016)."""
    path = tmp_path_factory.mktemp("fix") / "broken.safetensors"
    entries, off = [], 0
    names = [("model.embed_tokens.weight", EMB), ("lm_head.weight", EMB)]
    names += [(f"model.layers.{i}.mlp.weight", LAYER) for i in range(LAYERS)]
    header: dict = {"__metadata__": {"format": "pt", "lm_head.weight": "model.embed_tokens.weight"}}
    for name, shape in names:
        n = shape[0] * shape[1] * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        entries.append((name, n))
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        emb = _bf16_block(entries[0][1], 0)
        for i, (_, n) in enumerate(entries):
            f.write(emb if i < 2 else _bf16_block(n, i))
    return path


def _evict(path: str) -> None:
    """Drop ``path``'s pages from the page cache (written back first), so the next read is cold."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_fix_vs_copy(benchmark, broken_tie_file, tmp_path, publish):
    src = str(broken_tie_file)
    size_mib = os.path.getsize(src) / 2**20
    base = run_child("", setup=SETUP)

    def once(code: str, dst: str, cold: bool = False) -> dict:
        if os.path.exists(dst):
            os.remove(dst)
        if cold:
            _evict(src)
        # The last run's output written back first: otherwise the kernel throttles this run's writes
        # while it flushes a gigabyte it did not write (a copy measured 0.25 s or 1.47 s by that alone).
        os.sync()
        return run_child(code.format(src=src, dst=dst), setup=SETUP)

    def best(runs: list[dict]) -> dict:
        return min(runs, key=lambda r: r["wall_s"])

    # Warm: the input in the page cache; copy and fix interleaved, five of each, the fastest of each.
    run_child(COPY.format(src=src, dst=str(tmp_path / "warm")), setup=SETUP)
    copies, fixes = [], []
    for _ in range(5):
        copies.append(once(COPY, str(tmp_path / "copy.safetensors")))
        fixes.append(once(FIX, str(tmp_path / "fixed.safetensors")))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    copy_s, fixed = best(copies)["wall_s"], best(fixes)
    # Cold: the input's pages dropped before each run (the output is new either way).
    cold_copy = best([once(COPY, str(tmp_path / "copy.safetensors"), cold=True) for _ in range(2)])["wall_s"]
    cold_fix = best([once(FIX, str(tmp_path / "fixed.safetensors"), cold=True) for _ in range(2)])
    over = fixed["peak_rss_mib"] - base["peak_rss_mib"]
    benchmark.extra_info.update(file_mib=round(size_mib), copy_s=copy_s, fix_s=fixed["wall_s"],
                                write_s=fixed["write_s"], verify_s=fixed["verify_s"],
                                import_rss_mib=round(base["peak_rss_mib"]), fix_rss_mib=round(fixed["peak_rss_mib"]))
    publish(f"\nfile {size_mib:.0f} MiB, warm page cache, fastest of 5 interleaved | copyfile {copy_s:.2f} s | fix "
            f"{fixed['wall_s']:.2f} s ({fixed['wall_s'] / copy_s:.2f}x the copy): write {fixed['write_s']:.2f} s "
            f"({fixed['write_s'] / copy_s:.2f}x), verify {fixed['verify_s']:.2f} s | import {base['peak_rss_mib']:.0f} "
            f"MiB, fix peak {fixed['peak_rss_mib']:.0f} MiB ({over:.0f} MiB over the import = {over / size_mib:.1%} of "
            f"the file) | saved {fixed['saved'] / 2**20:.0f} MiB")
    publish(f"cold input (its pages dropped before each run), fastest of 2 | copyfile {cold_copy:.2f} s | fix "
            f"{cold_fix['wall_s']:.2f} s ({cold_fix['wall_s'] / cold_copy:.2f}x the copy): write "
            f"{cold_fix['write_s']:.2f} s, verify {cold_fix['verify_s']:.2f} s")
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert fixed["verified"]
    assert fixed["actions"] == ["retie"]
    assert fixed["saved"] == EMB[0] * EMB[1] * 2
    assert fixed["peak_rss_mib"] <= base["peak_rss_mib"] + 0.10 * size_mib
    assert fixed["wall_s"] <= 2 * copy_s  # the target is 1.5x (see benchmarks/README.md); 2x leaves room for noise
