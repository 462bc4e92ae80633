"""The bench's CUDA paths, checked on the CPU.

No GPU runs these: the ``torch.cuda`` calls are replaced by fakes (monkeypatched), and what is
asserted is what the bench asks of them -- which device, which stream, which API -- and what it
makes of their answers. The source-checkout tests run ``benchmarks/gpu_check.sh`` and
``python -m tiecheck.cli`` the way the GPU machine does: from this tree, without an install.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tiecheck.bench
from tiecheck import models
from tiecheck.bench import BenchConfig, max_batch, render, run_bench, run_state, runner
from tiecheck.bench import device as D
from tiecheck.bench.protocol import make_batches, mark_batch_dynamic
from tiecheck.bench.result_text import header_items
from tiecheck.bench.run_state import RunState
from tiecheck.bench.runner import bundled_builder, resolve
from tiecheck.cli import main
from tiecheck.cli.bench import Progress
from tiecheck.errors import TiecheckError
from tiecheck.models.common import IGNORE_INDEX, lm_loss

from support.bench import TINY, TINY_ARGS, limited_builder

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny(**kw) -> BenchConfig:
    return BenchConfig(**{**TINY_ARGS, **kw})


def _source_env(**extra: str) -> dict[str, str]:
    """This tree first on sys.path, the current folder never (as on the GPU machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(ROOT), PYTHONSAFEPATH="1", **extra)
    return env


# ------------------------------------------------------------------------------------------
# 1. tiecheck.models from a source checkout


def test_a_source_checkout_imports_its_own_models(tmp_path):
    code = ("import tiecheck, tiecheck.models, tiecheck.models.gpt; "
            "print(tiecheck.__file__); print(tiecheck.models.__file__); print(tiecheck.models.gpt.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=_source_env())
    assert proc.returncode == 0, proc.stderr
    package, models_init, gpt = proc.stdout.split()
    assert Path(package) == ROOT / "tiecheck" / "__init__.py"
    # The tree's models/, even where an editable install of another checkout is visible.
    assert Path(models_init) == ROOT / "models" / "__init__.py"
    assert Path(gpt) == ROOT / "models" / "gpt.py"


def test_importing_tiecheck_and_its_models_registry_does_not_import_torch(tmp_path):
    code = "import sys, tiecheck, tiecheck.models; tiecheck.models.param_count('gpt2-124m'); " \
           "assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=_source_env())
    assert proc.returncode == 0, proc.stderr


def test_no_tiecheck_dot_anything_else_from_the_checkout(tmp_path):
    code = "import tiecheck.tests"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=_source_env())
    assert proc.returncode != 0
    assert "No module named 'tiecheck.tests'" in proc.stderr


def test_a_copy_without_models_says_how_to_install(tmp_path):
    pkg = tmp_path / "copy" / "tiecheck"
    pkg.mkdir(parents=True)
    shutil.copy(ROOT / "tiecheck" / "__init__.py", pkg / "__init__.py")
    env = _source_env()
    env["PYTHONPATH"] = str(tmp_path / "copy")
    proc = subprocess.run([sys.executable, "-S", "-c", "import tiecheck.models"], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: tiecheck.models is missing")
    assert "pip install" in last


def test_bench_help_runs_from_the_source_tree_with_a_safe_path():
    proc = subprocess.run([sys.executable, "-m", "tiecheck.cli", "bench", "--help"], capture_output=True,
                          text=True, cwd=ROOT, env=_source_env())
    assert proc.returncode == 0, proc.stderr
    assert "--pad-vocab" in proc.stdout
    assert "--progress-lines" in proc.stdout


def test_the_bench_command_needs_only_what_the_gpu_machine_has(tmp_path):
    # The GPU machine has torch, numpy, click, pandas, tabulate (maybe matplotlib): nothing
    # else may be imported on the way to a measured table -- fvcore included.
    code = textwrap.dedent("""
        import sys
        for name in ("fvcore", "safetensors", "transformers", "accelerate", "hypothesis", "pytest_benchmark"):
            sys.modules[name] = None  # importing it now fails
        from tiecheck.cli import main
        main(["bench", "--device", "cpu", "--batch-size", "2", "--seq-len", "8", "--rounds", "2", "--steps", "1",
              "--model", "gpt-mini", "-o", "table.txt"], standalone_mode=False)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=_source_env())
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in (tmp_path / "table.txt").read_text()


# ------------------------------------------------------------------------------------------
# gpu_check.sh


def test_gpu_check_without_cuda_is_one_line_and_exit_2(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'AssertionError' >&2\nexit 1\n")  # torch.cuda.is_available() is False
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "PYTHON": str(fake)})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"gpu_check: no CUDA GPU visible to {fake} (or no torch); nothing run"]
    assert not out.exists()  # nothing written without a GPU


def test_gpu_check_dry_run_takes_the_whole_path_on_the_cpu_without_fvcore(tmp_path):
    """--dry-run: the four runs, their limits, the log and the tables, on the CPU, from another folder, on an
    image without fvcore (the GPU machines have none): a package of that name that refuses to import."""
    blocker = tmp_path / "no-fvcore" / "fvcore"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('fvcore is not installed on this image')\n")
    out, elsewhere = tmp_path / "out", tmp_path / "cwd"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(blocker.parent), CI="true")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, cwd=elsewhere, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 9, files
    assert "gpu_check.log" in files, files
    runs = ("default", "compile-maxbatch", "converge", "fsdp2-1rank")
    assert {f"bench-{run}-dry-run.txt" for run in runs} <= set(files)
    assert not list(elsewhere.iterdir())  # nothing outside the folder it was given
    log = (out / "gpu_check.log").read_text()
    estimate = log.splitlines()[0]
    assert estimate.startswith("gpu_check: estimate:")
    assert "at most 590 s (9 min 50 s)" in estimate
    assert f"models from {ROOT / 'models' / '__init__.py'}" in log  # this checkout, not an install
    for run in runs:
        assert f"== {run}: exit 0" in log, run
    assert "[  0%] warm-up tied" in log
    assert "tiecheck: converge budget:" in log
    assert log.rstrip().endswith("exit 0")
    assert "fvcore" not in log
    tables = {run: (out / f"bench-{run}-dry-run.txt").read_text() for run in runs}
    assert all(_last_line(t).startswith("verdict: ") for t in tables.values()), tables
    assert "fsdp2 on 1 rank(s) on 1 node(s)" in tables["fsdp2-1rank"]
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    limits = dict(kv.split("=") for kv in next(l for l in text.splitlines() if l.startswith("LIMIT_")).split())
    grace = int(next(l for l in text.splitlines() if l.startswith("GRACE=")).split("=")[1])
    # Every limit, the kill grace of the six steps (5 + 5 + 4 x 10 s), and the second probe: a 10-minute slot.
    assert sum(int(v) for v in limits.values()) + grace + int(limits["LIMIT_PROBE"]) == 590 < 10 * 60
    assert grace == 5 + 5 + 4 * 10


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


# ------------------------------------------------------------------------------------------
# 2. Peak memory: both warmed up, measured per round, each variant first half the time


class FakeAllocator:
    """The CUDA caching allocator's counters, driven by the model's forward calls.

    The first forward in the process allocates a 32 MiB workspace that is never freed (as
    cuBLAS does per handle and stream); every forward allocates ``step`` bytes for the
    duration of the step.
    """

    def __init__(self, step: int) -> None:
        self.step, self.now, self.peak, self.workspace = step, 0, 0, False
        self.order: list[str] = []

    def forward(self, name: str) -> None:
        if not self.workspace:
            self.workspace, self.now = True, self.now + 32 * MiB
        self.now += self.step
        self.peak = max(self.peak, self.now)
        self.now -= self.step
        self.order.append(name)

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(D, "memory_allocated", lambda dev: self.now)
        monkeypatch.setattr(D, "max_memory_allocated", lambda dev: self.peak)
        monkeypatch.setattr(D, "reset_peak_memory", lambda dev: setattr(self, "peak", self.now))


def _counting_builder(fake: FakeAllocator):
    build = bundled_builder("gpt-mini", TINY)

    def builder(tied, dev, seed):
        m = build(tied, dev, seed)
        forward = m.forward

        def counted(self, *args, **kwargs):
            fake.forward("tied" if tied else "untied")
            return forward(*args, **kwargs)

        m.forward = types.MethodType(counted, m)
        return m

    return builder


def test_peak_memory_is_not_charged_with_one_time_allocations(monkeypatch):
    fake = FakeAllocator(step=10 * MiB)
    fake.install(monkeypatch)
    r = run_bench(tiny(), build=_counting_builder(fake))
    t, u = r.records["tied"], r.records["untied"]
    # The tied variant warmed up first and paid for the workspace; its peak does not show it.
    assert fake.order[:2] == ["tied", "tied"]
    assert t.peak_bytes == 10 * MiB + t.weight_bytes + t.optimizer_bytes
    assert u.peak_bytes == 10 * MiB + u.weight_bytes + u.optimizer_bytes
    assert u.peak_bytes - t.peak_bytes == (u.weight_bytes - t.weight_bytes) + (u.optimizer_bytes - t.optimizer_bytes)
    assert any(n.startswith("peak device memory: the most a variant's steps allocated") for n in r.notes)
    rows = {(x.variant, x.metric): x for x in r.rows()}
    assert rows[("tied/untied", "peak_memory_bytes")].value == pytest.approx(t.peak_bytes / u.peak_bytes)


def test_a_round_with_a_one_time_allocation_is_not_the_peak(monkeypatch):
    fake = FakeAllocator(step=10 * MiB)
    fake.install(monkeypatch)
    calls = {"n": 0}
    real_forward = fake.forward

    def forward(name):  # the 9th forward (in the rounds) allocates 5 MiB more, once
        calls["n"] += 1
        fake.step = 15 * MiB if calls["n"] == 9 else 10 * MiB
        real_forward(name)

    fake.forward = forward
    r = run_bench(tiny(), build=_counting_builder(fake))
    for rec in r.records.values():
        assert rec.peak_bytes == 10 * MiB + rec.weight_bytes + rec.optimizer_bytes
    assert any("5.00 MiB more than its smallest round" in n for n in r.notes)


# ------------------------------------------------------------------------------------------
# 3 and 4. --find-max-batch: partial results first, dynamic batch, compiled caches released


def _max_batch_state(compile_: bool) -> RunState:
    plan = dataclasses.replace(resolve(tiny(max_batch_cap=16, compile=compile_)), find_max_batch=True)
    st = RunState(plan=plan)
    for name in ("tied", "untied"):
        st.records[name] = runner.VariantRecord(name=name)
    return st


def test_partial_results_are_handed_out_before_the_max_batch_search(monkeypatch):
    plan = dataclasses.replace(resolve(tiny(max_batch_cap=16)), find_max_batch=True)
    monkeypatch.setattr(runner, "resolve", lambda cfg: plan)
    real = max_batch.largest_fitting
    searched = []

    def search_then_time_out(fits, start, cap):
        searched.append(1)
        if len(searched) == 2:
            raise TimeoutError("simulated time limit, in the untied variant's search")
        return real(fits, start, cap)

    monkeypatch.setattr(max_batch, "largest_fitting", search_then_time_out)
    written = []
    with pytest.raises(TimeoutError):
        run_bench(tiny(), build=limited_builder(), partial=written.append)
    first, second = written
    assert first.notes[0] == "partial result, written before the run ended: --find-max-batch had not started"
    assert first.headline()
    assert first.records["tied"].step_samples()
    assert "tokens/s" in render(first, "table")
    assert not [x for x in first.rows() if x.metric == "max_batch"]
    assert second.records["tied"].max_batch == 3
    assert second.records["untied"].max_batch is None
    assert "untied variant" in second.notes[0]


def test_cli_writes_the_partial_table_before_a_time_limit(monkeypatch, tmp_path):
    real = tiecheck.bench.run_bench

    def run_then_time_out(cfg, *, partial=None, **kw):
        result = real(cfg, **kw)
        partial(result)
        raise KeyboardInterrupt  # what a time limit's signal looks like from here

    monkeypatch.setattr(tiecheck.bench, "run_bench", run_then_time_out)
    out = tmp_path / "table.txt"
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--batch-size", "2", "--seq-len", "16",
                                       "--rounds", "2", "--steps", "1", "-o", str(out)])
    assert result.exit_code == 130
    assert out.read_text().startswith("tiecheck bench: gpt-mini")
    assert "tokens/s" in out.read_text()


def test_compiled_max_batch_marks_the_batch_dynamic_and_resets_the_compiler(monkeypatch):
    compiled, resets, marked = [], [], []
    monkeypatch.setattr(run_state, "compile_step", lambda plan, m: compiled.append(plan.compile) or m)
    monkeypatch.setattr(D, "reset_compiled", lambda: resets.append(1))
    monkeypatch.setattr(max_batch, "mark_batch_dynamic", lambda b: marked.append(b.inputs[0].shape[0]))
    st = _max_batch_state(compile_=True)
    max_batch.find_max_batch(st, limited_builder())
    assert (st.records["tied"].max_batch, st.records["untied"].max_batch) == (3, 2)
    assert compiled == [True, True]
    assert len(resets) == 3  # the interleaved variants, then each max-batch variant
    assert set(marked) >= {2, 3, 4}
    assert all(b >= 1 for b in marked)


def test_compiled_interleaved_graphs_are_the_ones_the_search_reuses(monkeypatch):
    marked = []
    monkeypatch.setattr(runner, "mark_batch_dynamic", lambda b: marked.append(b.inputs[0].shape[0]))
    for compile_, search, expected in ((True, True, [2] * runner.N_BATCHES), (True, False, []), (False, True, [])):
        marked.clear()
        plan = dataclasses.replace(resolve(tiny(compile=compile_)), find_max_batch=search)
        runner._make_pool(RunState(plan=plan))
        assert marked == expected


def test_memory_left_after_a_released_variant_is_reported(monkeypatch):
    allocated = {"now": 100 * MiB}
    monkeypatch.setattr(D, "memory_allocated", lambda dev: allocated["now"])

    def leak(tied):  # building the tied variant leaves 64 MiB behind, as a cached graph could
        if tied:
            allocated["now"] += 64 * MiB

    st = _max_batch_state(compile_=False)
    max_batch.find_max_batch(st, limited_builder(on_build=leak))
    leaks = [n for n in st.notes if "still allocated" in n]
    assert len(leaks) == 2  # after the tied variant, and still after the untied one
    assert leaks[0].startswith("max batch: 64.00 MiB still allocated after releasing the tied variant")


def test_no_leak_note_when_memory_is_back(monkeypatch):
    monkeypatch.setattr(D, "memory_allocated", lambda dev: 100 * MiB)
    st = _max_batch_state(compile_=False)
    max_batch.find_max_batch(st, limited_builder())
    assert not [n for n in st.notes if "still allocated" in n]


def test_mark_batch_dynamic_marks_dimension_0():
    batch = make_batches("decoder", 100, 4, 8, 1, 0, torch.device("cpu"))[0]
    mark_batch_dynamic(batch)
    for t in (*batch.inputs, batch.targets):
        marks = getattr(t, "_dynamo_weak_dynamic_indices", set()) | getattr(t, "_dynamo_dynamic_indices", set())
        assert marks == {0}
    one = make_batches("decoder", 100, 1, 8, 1, 0, torch.device("cpu"))[0]
    mark_batch_dynamic(one)  # a batch of 1 is specialised by torch.compile: left alone
    assert not getattr(one.inputs[0], "_dynamo_weak_dynamic_indices", None)


def test_release_memory_resets_the_compiler_only_after_compiling(monkeypatch):
    resets = []
    monkeypatch.setattr(D, "reset_compiled", lambda: resets.append(1))
    D.release_memory(torch.device("cpu"))
    assert resets == []
    D.release_memory(torch.device("cpu"), compiled=True)
    assert resets == [1]


# ------------------------------------------------------------------------------------------
# 5. --device cuda:N


class FakeCuda:
    """The torch.cuda calls the device layer makes, for two GPUs, device 0 current."""

    def __init__(self, monkeypatch) -> None:
        self.current, self.calls = 0, []
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: 2)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "set_device", self.set_device)
        monkeypatch.setattr(cuda, "current_stream", lambda device=None: ("stream", torch.device(device).index))
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: self.calls.append(("sync", device)))
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self, stream=None):
                # Without a stream, CUDA records on the *current* device's stream.
                self.at = stream if stream is not None else ("stream", fake.current)
                fake.calls.append(("record", self.at))

            def elapsed_time(self, other):
                return 1.0

        monkeypatch.setattr(cuda, "Event", Event)

    def set_device(self, index) -> None:
        self.calls.append(("set_device", index))
        self.current = index


def test_on_device_makes_the_gpu_current_and_restores_it(monkeypatch):
    fake = FakeCuda(monkeypatch)
    with D.on_device(torch.device("cuda", 1)):
        assert fake.current == 1
    assert fake.current == 0
    assert fake.calls == [("set_device", 1), ("set_device", 0)]
    with D.on_device(torch.device("cpu")):
        pass
    assert len(fake.calls) == 2


def test_events_are_recorded_on_the_chosen_gpu(monkeypatch):
    fake = FakeCuda(monkeypatch)
    timer = D.PhaseTimer(torch.device("cuda", 1))  # device 0 is current
    timer.mark()
    timer.mark()
    assert timer.intervals_ms() == [1.0]
    assert [c for c in fake.calls if c[0] == "record"] == [("record", ("stream", 1))] * 2


def test_cuda_resolves_to_an_indexed_device(monkeypatch):
    fake = FakeCuda(monkeypatch)
    fake.current = 1
    assert D.resolve_device("cuda") == torch.device("cuda", 1)
    assert D.resolve_device("auto") == torch.device("cuda", 1)
    assert D.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(TiecheckError, match="only 2 CUDA device"):
        D.resolve_device("cuda:2")


def test_the_run_happens_on_the_plans_device(monkeypatch):
    entered = []
    real = D.on_device

    def recording(dev):
        entered.append(dev)
        return real(dev)

    monkeypatch.setattr(D, "on_device", recording)
    run_bench(tiny(rounds=2))
    assert entered == [torch.device("cpu")]


# ------------------------------------------------------------------------------------------
# 6. bf16 only where it is native


def test_bf16_emulation_does_not_count(monkeypatch):
    FakeCuda(monkeypatch)
    asked = []

    def is_bf16_supported(including_emulation=True):  # a pre-Ampere GPU: emulated only
        asked.append((including_emulation, torch.cuda.current_device()))
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    gpu1 = torch.device("cuda", 1)
    assert not D.bf16_supported(gpu1)
    assert asked == [(False, 1)]  # asked without emulation, of the chosen GPU
    monkeypatch.setattr(D, "device_name", lambda dev: "Tesla V100-SXM2-16GB")
    with pytest.raises(TiecheckError, match="no bfloat16 support"):
        D.check_dtype(gpu1, "bf16")


def test_bf16_check_on_a_torch_without_the_emulation_argument(monkeypatch):
    FakeCuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # old signature: counts emulation
    capability = {"value": (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability["value"])
    monkeypatch.setattr(torch.version, "hip", None)
    assert not D.bf16_supported(torch.device("cuda", 0))
    capability["value"] = (9, 0)
    assert D.bf16_supported(torch.device("cuda", 0))


# ------------------------------------------------------------------------------------------
# 7. The peak table


@pytest.mark.parametrize(("name", "dtype", "peak", "row"), [
    ("NVIDIA L40", "bf16", 181.05, "L40"),  # a substring match gave L4's 121 (MFU 1.5x too high)
    ("NVIDIA L40S", "bf16", 362.05, "L40S"),
    ("NVIDIA L4", "bf16", 121.0, "L4"),
    ("NVIDIA L40", "fp32", 90.5, "L40"),
    ("NVIDIA H200 NVL", "bf16", 835.5, "H200 NVL"),  # not the SXM figures
    ("NVIDIA H200", "bf16", 989.4, "H200"),
    ("NVIDIA H200 NVL", "fp16", 835.5, "H200 NVL"),
    ("NVIDIA GH200 480GB", "bf16", 989.4, "GH200"),
    ("NVIDIA H100 PCIe", "bf16", 756.0, "H100 PCIe"),
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4, "H100"),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0, "A100"),
    ("NVIDIA A10", "bf16", None, None),  # not an A100
    ("Tesla T4", "fp16", 65.0, "T4"),
])
def test_peak_table_matches_whole_tokens(name, dtype, peak, row):
    assert D.lookup_peak_tflops(name, dtype) == peak
    found = D.lookup_peak_row(name)
    assert (found[0] if found else None) == row


def test_the_header_names_the_matched_row(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(D, "device_name", lambda dev: "NVIDIA L40")
    assert D.peak_tflops(gpu, "bf16", tf32=False) == (181.05, "datasheet dense bf16 peak, table row 'L40' "
                                                             "for NVIDIA L40")
    assert D.peak_tflops(gpu, "fp32", tf32=True)[1].startswith("datasheet dense tf32 peak")


def _props(monkeypatch, sms):
    def props(dev):
        if sms is None:
            raise RuntimeError("no device properties")
        return types.SimpleNamespace(multi_processor_count=sms)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)


def test_a_mig_slice_gets_its_share_of_the_peak(monkeypatch):
    """A MIG slice names the whole GPU and has a share of its multiprocessors: MFU against the whole GPU's
    peak was understated up to 7x."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(D, "device_name", lambda dev: "NVIDIA H100 80GB HBM3 MIG 1g.10gb")
    _props(monkeypatch, 16)
    value, source = D.peak_tflops(gpu, "bf16", tf32=False)
    assert value == pytest.approx(989.4 * 16 / 132)
    assert "scaled to this MIG slice's 16 of 132 streaming multiprocessors" in source
    _props(monkeypatch, None)  # the slice's multiprocessors cannot be read: MFU unknown, not the whole GPU's
    value, source = D.peak_tflops(gpu, "bf16", tf32=False)
    assert value is None
    assert source.startswith("MFU unknown: NVIDIA H100 80GB HBM3 MIG 1g.10gb is a MIG slice")
    monkeypatch.setattr(D, "device_name", lambda dev: "NVIDIA H100 80GB HBM3")
    _props(monkeypatch, 132)  # the whole GPU: the table's figure
    assert D.peak_tflops(gpu, "bf16", tf32=False)[0] == 989.4


# ------------------------------------------------------------------------------------------
# 8. TF32, read by whichever API set it


def test_tf32_reading_never_raises_whichever_api_set_it(tmp_path):
    # In a child process: once the new API is used, the legacy readers raise for good.
    code = textwrap.dedent("""
        import torch
        from tiecheck.bench import device as D
        assert D.tf32_matmul() is False
        torch.set_float32_matmul_precision("high")
        assert D.tf32_matmul() is True
        torch.set_float32_matmul_precision("highest")
        assert D.tf32_matmul() is False
        try:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        except AttributeError:
            raise SystemExit(0)  # a torch without the new API: nothing more to check
        assert D.tf32_matmul() is True  # the legacy readers raise now
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert D.tf32_matmul() is False
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=_source_env())
    assert proc.returncode == 0, proc.stderr


def test_tf32_is_read_when_the_run_starts(monkeypatch):
    states = iter([True, False])
    monkeypatch.setattr(D, "tf32_enabled", lambda dev: next(states))
    seen = []
    real = D.peak_tflops
    monkeypatch.setattr(D, "peak_tflops", lambda *a, **kw: seen.append(kw.get("tf32")) or real(*a, **kw))
    run_bench(tiny(rounds=2))
    assert seen == [True]  # the value at the start, not a second read after the run


# ------------------------------------------------------------------------------------------
# 9. torch.OutOfMemoryError only from torch 2.5


def test_oom_detection_without_torch_dot_out_of_memory_error(monkeypatch):
    cuda_oom = torch.cuda.OutOfMemoryError
    monkeypatch.delattr(torch, "OutOfMemoryError")
    assert D.is_oom(cuda_oom("CUDA error: allocation refused"))
    assert not D.is_oom(ValueError("x"))

    class OldCudaOOM(RuntimeError):
        pass

    monkeypatch.setattr(torch.cuda, "OutOfMemoryError", OldCudaOOM)
    assert D.is_oom(OldCudaOOM("Tried to allocate 2.00 GiB"))
    monkeypatch.delattr(torch.cuda, "OutOfMemoryError")
    assert D.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not D.is_oom(RuntimeError("shape mismatch"))


# ------------------------------------------------------------------------------------------
# 10. Padded vocabulary, the loss's memory, the measured matmul


def test_gpu_default_pads_gpt2_vocab_to_50304(monkeypatch):
    assert resolve(BenchConfig(device="cpu", model="gpt2-124m")).model_vocab == 50257  # CPU: as is
    monkeypatch.setattr(D, "resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(D, "check_dtype", lambda dev, dtype: None)
    monkeypatch.setattr(D, "default_dtype", lambda dev: "bf16")
    plan = resolve(BenchConfig(model="gpt2-124m"))
    assert (plan.vocab_size, plan.model_vocab, plan.padded) == (50257, 50304, True)
    assert plan.build_overrides == {"vocab_size": 50304}
    assert plan.overrides == {}
    assert resolve(BenchConfig(model="gpt2-124m", pad_vocab=1)).model_vocab == 50257
    assert resolve(BenchConfig(model="big-vocab")).model_vocab == 128256  # already a multiple of 64


def test_padded_rows_are_never_drawn_and_the_report_says_so():
    seen = {"max": -1}
    build = bundled_builder("gpt-mini", {**TINY, "vocab_size": 512})

    def builder(tied, dev, seed):
        m = build(tied, dev, seed)
        forward = m.forward

        def watched(self, idx, *args, targets=None, **kwargs):
            seen["max"] = max(seen["max"], int(idx.max()), -1 if targets is None else int(targets.max()))
            return forward(idx, *args, targets=targets, **kwargs)

        m.forward = types.MethodType(watched, m)
        return m

    r = run_bench(tiny(overrides={**TINY, "vocab_size": 500}, pad_vocab=64), build=builder)
    assert 0 <= seen["max"] < 500
    assert "vocab 500 padded to 512" in r.header["title"]
    assert r.header["vocab_size"] == 500
    assert r.header["model_vocab_size"] == 512
    assert any(n.startswith("vocabulary padded from 500 to 512 rows") for n in r.notes)


def test_decoding_never_picks_a_padding_row():
    m = models.build("gpt-mini", **{**TINY, "vocab_size": 512}).eval()

    class PaddingWins(torch.nn.Module):  # padding rows that would win every argmax
        def forward(self, logits):
            return logits + torch.where(torch.arange(512) >= 500, 100.0, 0.0)

    m.lm_head = torch.nn.Sequential(m.lm_head, PaddingWins())
    prompt = torch.zeros(2, 4, dtype=torch.long)
    assert (m.generate(prompt, 4)[:, 4:] >= 500).all()
    assert (m.generate(prompt, 4, vocab_limit=500)[:, 4:] < 500).all()
    r = run_bench(tiny(mode="infer", decode_tokens=3, overrides={**TINY, "vocab_size": 500}, pad_vocab=64))
    assert r.records["tied"].decode_samples


def test_half_precision_loss_keeps_no_float32_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 1000, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 1000, (2, 16))
    targets[0, :3] = IGNORE_INDEX
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(logits, targets)
    assert loss.dtype == torch.float32
    assert not [s for s in saved if s == (torch.float32, logits.numel())]
    reference = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                  ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(reference.item(), rel=2e-3)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits.grad.float()).all()
    fp32 = lm_loss(logits.detach().float(), targets)  # float32 logits: the plain path, exact
    assert fp32.item() == pytest.approx(reference.item(), rel=1e-6)


def test_matmul_timing_and_its_place_in_the_header(monkeypatch):
    assert D.matmul_tflops(torch.device("cpu"), "fp32", n=64, iters=2) > 0
    r = run_bench(tiny(rounds=2))
    r.header.update(peak_tflops=989.4, peak_source="datasheet dense bf16 peak, table row 'H200' for NVIDIA H200",
                    matmul_tflops=712.3, matmul_dtype="bf16")
    line = dict(header_items(r))["peak"]
    assert line == ("MFU is against 989.4 TFLOP/s (datasheet dense bf16 peak, table row 'H200' for NVIDIA H200); "
                    "a bf16 8192^3 matmul measured 712 TFLOP/s on this device at the start (72% of that peak)")


def test_progress_lines_for_logs(capsys):
    p = Progress(4, enabled=False, lines=True)
    p(0, "warm-up tied")
    p(1, "warm-up tied")
    p(1, "round 1/2 tied")
    p.close()
    assert capsys.readouterr().err == "[  0%] warm-up tied\n[ 50%] round 1/2 tied\n"
