"""tiecheck bench: protocol, statistics, device layer, output formats and bad input.

Runs on the CPU with tiny models (gpt-mini cut to 1-2 layers and a 512-token vocabulary):
each bench run is a fraction of a second. Speed itself is never asserted here; the
benchmarks/ suite measures it.
"""

from __future__ import annotations

import io
import json
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from tiecheck import models
from tiecheck.bench import BenchConfig, max_batch, render, run_bench, runner, stats
from tiecheck.bench import device as D
from tiecheck.bench.flops import flops_shape, forward_flops, step_flops
from tiecheck.bench.max_batch import largest_fitting
from tiecheck.bench.plot import plot
from tiecheck.bench.protocol import (
    LossLog,
    Variant,
    diverged,
    identical_weights,
    make_batches,
    optimizer_state_bytes,
    still_tied,
    tie_groups,
)
from tiecheck.bench.run_state import RunState
from tiecheck.bench.runner import bundled_builder, order_of_round, resolve
from tiecheck.cli import main
from tiecheck.cli.bench import Progress
from tiecheck.errors import TiecheckError

from support.bench import TINY, TINY_ARGS, limited_builder

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny(**kw) -> BenchConfig:
    return BenchConfig(**{**TINY_ARGS, **kw})


@pytest.fixture(scope="module")
def train_result():
    return run_bench(tiny(rounds=4, steps=2), command="tiecheck bench (test)")


@pytest.fixture(scope="module")
def infer_result():
    return run_bench(tiny(mode="infer", decode_tokens=4), command="tiecheck bench --mode infer (test)")


# ------------------------------------------------------------------------------------------
# Protocol


def test_variants_start_identical_and_see_the_same_batches(train_result):
    checks = train_result.checks
    assert checks["identical start (same values by name; tied shares, untied copies)"]
    assert checks["same first loss (within 0.0001 relative)"]
    t, u = train_result.records["tied"], train_result.records["untied"]
    assert t.loss_first == pytest.approx(u.loss_first, rel=1e-6)


def test_identical_weights_detects_a_difference():
    build = bundled_builder("gpt-mini", TINY)
    cpu = torch.device("cpu")
    tied, untied = build(True, cpu, 0), build(False, cpu, 0)
    assert identical_weights(tied, untied)
    with torch.no_grad():
        untied.lm_head.weight[0, 0] += 1.0
    assert not identical_weights(tied, untied)
    assert not identical_weights(tied, build(False, cpu, 1))  # another seed, other weights


def test_rounds_are_interleaved_abba(train_result):
    assert [order_of_round(r) for r in range(4)] == [("tied", "untied"), ("untied", "tied"),
                                                      ("tied", "untied"), ("untied", "tied")]
    assert train_result.header["order"] == "A B B A A B B A"
    # Each round contributed one sample list per phase and variant.
    for rec in train_result.records.values():
        assert set(rec.samples) == {"forward", "backward", "optimizer"}
        assert [len(r) for r in rec.samples["forward"]] == [2, 2, 2, 2]
        assert all(x > 0 for r in rec.step_samples() for x in r)


def test_tie_kept_and_untied_diverged_after_steps(train_result):
    checks = train_result.checks
    assert checks["tied still tied after 10 steps (one storage, equal values)"]  # 2 warm-up + 4 x 2
    assert checks["untied diverged after 10 steps (separate storage, different values)"]
    assert checks["tied losses finite"]
    assert checks["untied losses finite"]
    assert train_result.checks_passed()


def test_tie_checks_can_fail():
    build = bundled_builder("gpt-mini", TINY)
    cpu = torch.device("cpu")
    tied, untied = build(True, cpu, 0), build(False, cpu, 0)
    groups = tie_groups(tied)
    assert groups == [("lm_head.weight", "transformer.wte.weight")]
    assert tie_groups(untied) == []
    assert still_tied(tied, groups)
    assert not still_tied(untied, groups)
    assert not diverged(untied, groups)  # a fresh copy: separate memory but equal values
    with torch.no_grad():
        untied.lm_head.weight.mul_(2)
    assert diverged(untied, groups)
    tied.lm_head.weight = torch.nn.Parameter(tied.lm_head.weight.detach().clone())  # break the tie
    assert not still_tied(tied, groups)


def test_memory_is_counted_from_tensors(train_result):
    t, u = train_result.records["tied"], train_result.records["untied"]
    vd = TINY["vocab_size"] * TINY["d_model"]
    assert u.params - t.params == vd
    assert u.weight_bytes - t.weight_bytes == 4 * vd
    assert u.grad_bytes - t.grad_bytes == 4 * vd
    # Fused AdamW keeps two fp32 moments and a 4-byte step per parameter tensor.
    assert u.optimizer_bytes - t.optimizer_bytes == 2 * 4 * vd + 4
    assert t.peak_bytes is None  # no device allocator on the CPU


def test_steps_keep_no_allocation_of_their_own_alive():
    # A kept 0-dim loss per step pinned glibc's heap around it (tiecheck bench grew to 1.5 GB on
    # gpt-mini); every step's loss now lands in one buffer allocated for the run.
    cpu = torch.device("cpu")
    model = bundled_builder("gpt-mini", TINY)(True, cpu, 0)
    v = Variant(name="tied", module=model, fn=model, dev=cpu, dtype="fp32", mode="train",
                optimizer=D.make_adamw(model.parameters(), cpu)[0])
    batches = make_batches("decoder", TINY["vocab_size"], 2, 8, 2, 0, cpu)
    timer = D.PhaseTimer(cpu)
    expected = []
    for i in range(5):
        b = batches[i % 2]
        with torch.no_grad():
            expected.append(model(*b.inputs, targets=b.targets).loss.item())
        timer.mark()
        v.step(b, timer)
    assert len(v.losses) == 5
    assert len({v.losses[i].untyped_storage().data_ptr() for i in range(5)}) == 1
    assert v.losses.values().tolist() == pytest.approx(expected, rel=1e-6)
    assert v.losses_finite()
    assert float(v.losses[-1]) == pytest.approx(expected[-1], rel=1e-6)
    v.release()
    assert v.losses.values().tolist() == pytest.approx(expected, rel=1e-6)


def test_loss_log_grows_past_its_capacity():
    log = LossLog(capacity=2)
    for x in range(5):
        log.append(torch.tensor(float(x)))
    assert (len(log), log.values().tolist(), float(log[-1])) == (5, [0.0, 1.0, 2.0, 3.0, 4.0], 4.0)
    log.clear()
    assert not log
    assert log.values().tolist() == []


def test_optimizer_state_bytes_counts_moments():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.AdamW([p], foreach=False)
    assert optimizer_state_bytes(opt) == 0
    p.grad = torch.ones(10)
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * 40 + opt.state[p]["step"].nbytes


def test_batches_are_a_function_of_the_seed():
    cpu = torch.device("cpu")
    a = make_batches("decoder", 100, 2, 8, 2, 0, cpu)
    b = make_batches("decoder", 100, 2, 8, 2, 0, cpu)
    assert all(torch.equal(x.inputs[0], y.inputs[0]) and torch.equal(x.targets, y.targets) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].inputs[0], a[1].inputs[0])
    assert torch.equal(a[0].inputs[0][:, 1:], a[0].targets[:, :-1])  # targets are the next tokens
    src, tgt = make_batches("encoder-decoder", 100, 2, 8, 1, 0, cpu)[0].inputs
    assert src.shape == tgt.shape == (2, 8)


def test_infer_mode_times_forward_and_decoding(infer_result):
    metrics = {(r.variant, r.metric) for r in infer_result.rows()}
    assert ("tied", "decode_tokens_per_s") in metrics
    assert ("tied/untied", "decode_tokens_per_s") in metrics
    assert ("tied", "backward_ms") not in metrics
    assert ("tied", "optimizer_state_bytes") not in metrics
    assert list(infer_result.records["tied"].samples) == ["forward"]
    assert not any("diverged" in c for c in infer_result.checks)  # nothing trains in infer mode
    assert infer_result.checks_passed()


def test_encoder_decoder_runs():
    over = {"vocab_size": 256, "d_model": 32, "n_head": 2, "d_ff": 64, "n_encoder_layers": 1,
            "n_decoder_layers": 1, "max_len": 32}
    r = run_bench(BenchConfig(model="transformer-mini", device="cpu", batch_size=2, seq_len=8, rounds=2, steps=1,
                              overrides=over))
    assert r.checks_passed()
    assert r.records["untied"].params - r.records["tied"].params == 2 * 256 * 32  # three-way tie
    assert any("target" in n for n in r.notes)


def test_a_variant_that_does_not_fit_is_reported_and_the_other_measured():
    build = bundled_builder("gpt-mini", TINY)

    def huge_forward(self, *args, **kwargs):
        torch.empty(2**45)  # 128 TiB: the CPU allocator refuses it at once
        raise AssertionError("unreachable")

    def builder(tied, dev, seed):
        m = build(tied, dev, seed)
        if not tied:
            m.forward = types.MethodType(huge_forward, m)
        return m

    r = run_bench(tiny(), build=builder)
    assert r.records["tied"].ok
    assert r.records["tied"].step_samples()
    assert not r.records["untied"].ok
    assert "out of memory" in r.records["untied"].status
    assert r.failures() == [f"untied variant: {r.records['untied'].status}"]
    assert not any(row.variant == "tied/untied" and row.metric == "step_ms" for row in r.rows())
    assert "not measured" in render(r, "table")


# ------------------------------------------------------------------------------------------
# Statistics


def _synthetic(true_ratio: float, rounds: int, steps: int, rng: np.random.Generator):
    """Per-round drift shared by both variants, plus step noise; medians in ratio true_ratio."""
    drift = rng.normal(0, 0.2, rounds)
    a = np.exp(drift[:, None] + rng.normal(0, 0.1, (rounds, steps))) * 10 * true_ratio
    b = np.exp(drift[:, None] + rng.normal(0, 0.1, (rounds, steps))) * 10
    return a.tolist(), b.tolist()


def test_bootstrap_interval_covers_the_true_ratio():
    rng = np.random.default_rng(0)
    trials, hits = 60, 0
    for i in range(trials):
        a, b = _synthetic(0.97, 10, 3, rng)
        r = stats.ratio(a, b, n_boot=500, seed=i)
        hits += r.contains(0.97)
    assert hits / trials >= 0.85


def test_bootstrap_interval_narrows_with_more_samples_and_separates_a_real_difference():
    rng = np.random.default_rng(1)
    wide = stats.ratio(*_synthetic(0.9, 6, 2, rng))
    narrow = stats.ratio(*_synthetic(0.9, 40, 10, rng))
    assert narrow.high - narrow.low < wide.high - wide.low
    assert narrow.high < 1.0
    assert narrow.contains(0.9)
    assert "tied faster by" in stats.verdict(narrow, "step time")


def test_pairing_cancels_shared_drift():
    rng = np.random.default_rng(2)
    a, b = _synthetic(1.0, 12, 3, rng)
    paired, unpaired = stats.ratio(a, b, paired=True), stats.ratio(a, b, paired=False)
    assert paired.high - paired.low < unpaired.high - unpaired.low


def test_estimate_median_and_inversion():
    e = stats.estimate([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    assert e.median == 2.0
    assert e.low <= 2.0 <= e.high
    assert e.n == 6
    assert e.rounds == 2
    rate = e.inverted(100.0)
    assert rate.median == 50.0
    assert rate.low == pytest.approx(100 / e.high)
    assert rate.high == pytest.approx(100 / e.low)
    with pytest.raises(ValueError, match="samples must be a non-empty list"):
        stats.estimate([])


def test_verdict_wording():
    same = stats.Estimate(1.002, 0.99, 1.01, 60, 10)
    assert stats.verdict(same, "step time").startswith("step time: no measurable difference (tied/untied 1.002")
    assert "contains 1" in stats.verdict(same, "step time")
    slower = stats.Estimate(1.05, 1.03, 1.07, 60, 10)
    assert stats.verdict(slower, "step time") == "step time: tied slower by 5.0% (tied/untied 1.050, 95% CI 1.030-1.070)"
    assert stats.verdict(slower, "tokens/s", lower_is_better=False).startswith("tokens/s: tied higher by 5.0%")
    few = stats.Estimate(1.5, 1.2, 1.8, 6, 3)
    assert "too few rounds (3)" in stats.verdict(few, "step time")


# ------------------------------------------------------------------------------------------
# Device layer (the CPU side of every call)


def test_device_resolution():
    assert D.resolve_device("cpu") == torch.device("cpu")
    assert D.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TiecheckError, match="the bench runs on cpu or cuda"):
        D.resolve_device("meta")
    with pytest.raises(TiecheckError, match="not a device"):
        D.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(TiecheckError, match="CUDA is not available"):
            D.resolve_device("cuda")


def test_phase_timer_on_cpu():
    t = D.PhaseTimer(torch.device("cpu"))
    t.mark()
    torch.ones(256, 256) @ torch.ones(256, 256)
    t.mark()
    t.mark()
    ms = t.intervals_ms()
    assert len(ms) == 2
    assert ms[0] > 0
    assert ms[1] >= 0
    assert t.intervals_ms() == []  # cleared for the next round


def test_oom_detection_and_cleanup_with_a_real_allocation_failure():
    with pytest.raises(RuntimeError) as failed:
        torch.empty(2**45)
    assert D.is_oom(failed.value)
    assert not D.is_oom(ValueError("out of memory"))
    assert not D.is_oom(RuntimeError("shape mismatch"))
    with D.catch_oom() as caught:
        torch.empty(2**45)
    assert caught == ["tried to allocate 128.00 TiB"]
    with pytest.raises(RuntimeError, match="shape"), D.catch_oom():
        raise RuntimeError("shape mismatch")


def test_cpu_memory_and_precision_helpers():
    cpu = torch.device("cpu")
    D.reset_peak_memory(cpu)
    assert D.memory_allocated(cpu) is None
    assert D.max_memory_allocated(cpu) is None
    assert D.total_memory(cpu) is None
    assert D.default_dtype(cpu) == "fp32"
    assert D.bf16_supported(cpu)
    with D.autocast(cpu, "bf16"):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with D.autocast(cpu, "fp32"):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32
    assert D.grad_scaler(cpu, "fp16") is not None
    assert D.grad_scaler(cpu, "bf16") is None
    with pytest.raises(TiecheckError, match="choose one of"):
        D.check_dtype(cpu, "int8")
    opt, label = D.make_adamw([torch.nn.Parameter(torch.zeros(3))], cpu)
    assert label.startswith("AdamW")
    assert isinstance(opt, torch.optim.AdamW)
    assert D.device_name(cpu)


def test_peak_table():
    assert D.lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert D.lookup_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert D.lookup_peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 66.9
    assert D.lookup_peak_tflops("NVIDIA H100 80GB HBM3", "fp32", tf32=True) == 494.7
    assert D.lookup_peak_tflops("NVIDIA L40S", "bf16") == 362.05  # not the L4 entry
    assert D.lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert D.lookup_peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None
    assert D.lookup_peak_tflops("Some Future GPU", "bf16") is None
    cpu = torch.device("cpu")
    value, why = D.peak_tflops(cpu, "fp32")
    assert value is None
    assert "--peak-tflops" in why
    assert D.peak_tflops(cpu, "fp32", override=1.5) == (1.5, "--peak-tflops")


def test_largest_fitting_batch_search():
    calls = []

    def fits_below(limit):
        def fits(b):
            calls.append(b)
            return b <= limit
        return fits

    assert largest_fitting(fits_below(37), 8, 1024) == (37, False)
    assert largest_fitting(fits_below(5), 8, 1024) == (5, False)
    assert largest_fitting(fits_below(0), 8, 1024) == (0, False)
    assert largest_fitting(fits_below(5000), 8, 1024) == (1024, True)
    assert largest_fitting(fits_below(1), 1, 1024) == (1, False)
    calls.clear()
    largest_fitting(fits_below(700), 16, 1024)
    assert len(calls) < 20  # doubling then bisection, not a linear scan


def test_max_batch_search_on_the_cpu_with_real_allocation_failures():
    # --find-max-batch is refused on the CPU (no fixed device memory to fill), but its search,
    # OOM cleanup and measurement are device-independent: run them here with a model that
    # cannot allocate its activations above 3 sequences.

    st = RunState(plan=resolve(tiny(max_batch_cap=64)))
    for name in ("tied", "untied"):
        st.records[name] = runner.VariantRecord(name=name)
    max_batch.find_max_batch(st, limited_builder())
    t, u = st.records["tied"], st.records["untied"]
    assert (t.max_batch, u.max_batch) == (3, 2)
    assert not t.max_batch_capped
    assert len(t.max_batch_samples) == 6
    assert t.max_batch_status is None
    result = runner._result(st, tiny(), "test")
    rows = {(r.variant, r.metric): r for r in result.rows()}
    assert rows[("tied/untied", "max_batch")].verdict == "largest batch: tied fits 1 more sequences"
    assert ("tied/untied", "max_batch_tokens_per_s") in rows
    assert "largest batch" in render(result, "table")


# ------------------------------------------------------------------------------------------
# FLOPs


def test_flops_are_equal_for_tied_and_untied():
    for name in ("gpt2-124m", "llama-mini", "transformer-mini"):
        tied = models.build(name, tied=True, device="meta")
        untied = models.build(name, tied=False, device="meta")
        assert flops_shape(tied) == flops_shape(untied)
    shape = flops_shape(models.build("gpt2-124m", device="meta"))
    # 12 blocks x (qkv 3d^2 + proj d^2 + mlp 8d^2) + the head V*d
    assert shape.n_matmul_params == 12 * 12 * 768**2 + 50257 * 768
    assert shape.n_attention_layers == 12
    assert shape.d_attn == 768
    assert forward_flops(shape, 1024, 1) == 2 * shape.n_matmul_params * 1024 + 4 * 12 * 1024**2 * 768
    assert step_flops(shape, 1024, 2, "train") == 3 * 2 * forward_flops(shape, 1024, 1)
    encdec = flops_shape(models.build("transformer-base", device="meta"))
    assert encdec.n_attention_layers == 6 + 2 * 6


def test_mfu_with_a_given_peak():
    r = run_bench(tiny(rounds=2, peak_tflops=0.001))
    rows = {(x.variant, x.metric): x for x in r.rows()}
    assert rows[("tied", "mfu")].value == pytest.approx(rows[("tied", "tflops")].value / 0.001)
    assert r.header["peak_source"] == "--peak-tflops"


# ------------------------------------------------------------------------------------------
# Output


def test_frame_columns_and_rows(train_result):
    frame = train_result.to_frame()
    assert list(frame.columns) == ["variant", "metric", "unit", "value", "ci_low", "ci_high", "n", "verdict"]
    assert set(frame.variant) == {"tied", "untied", "tied/untied"}
    tok = frame[(frame.variant == "tied") & (frame.metric == "tokens_per_s")].iloc[0]
    assert tok.ci_low <= tok.value <= tok.ci_high
    assert tok.n == 8
    ratio = frame[(frame.variant == "tied/untied") & (frame.metric == "step_ms")].iloc[0]
    assert ratio.verdict.startswith("step time:")


def test_table_has_the_header_and_every_figure(train_result):
    text = render(train_result, "table")
    assert text.startswith("tiecheck bench: gpt-mini, n_layer=1")
    for needle in ("command    tiecheck bench (test)", f"torch {torch.__version__}", "device     cpu",
                   "precision  fp32", "tokens/s", "step (ms)", "optimizer state", "tied/untied", "verdicts:",
                   "pass  tied still tied"):
        assert needle in text, needle


def test_json_csv_markdown(train_result):
    data = json.loads(render(train_result, "json"))
    assert data["schema_version"] == 1
    assert data["header"]["torch"] == torch.__version__
    assert data["checks"]
    assert all(data["checks"].values())
    assert len(data["samples_ms"]["tied"]["phases"]["forward"]) == 4
    csv = render(train_result, "csv")
    assert csv.startswith("# tiecheck bench:")
    assert "# device: cpu" in csv
    assert "# command: " in csv
    frame = pd.read_csv(io.StringIO(csv), comment="#")
    assert list(frame.columns)[:4] == ["variant", "metric", "unit", "value"]
    assert len(frame) == len(train_result.rows())
    md = render(train_result, "markdown")
    assert md.startswith("## tiecheck bench:")
    assert "- **torch**" not in md
    assert "|---" in md
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        render(train_result, "xml")


def test_plot_writes_a_figure(tmp_path, train_result):
    pytest.importorskip("matplotlib")

    out = tmp_path / "bench.png"
    plot(train_result, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------
# CLI

TINY_CLI = ["bench", "--device", "cpu", "--batch-size", "2", "--seq-len", "16", "--rounds", "2", "--steps", "1"]


def _one_error_line(result) -> str:
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("tiecheck: error: ")
    return lines[0]


@pytest.mark.parametrize(("args", "needle"), [
    (["--model", "gpt-9000"], "unknown model; choose one of: gpt-mini, gpt2-124m"),
    (["--batch-size", "0"], "--batch-size 0: must be a positive integer"),
    (["--seq-len", "-4"], "--seq-len -4: must be a positive integer"),
    (["--rounds", "0"], "--rounds 0: must be a positive integer"),
    (["--steps", "0"], "--steps 0: must be a positive integer"),
    (["--rounds", "1"], "at least 2"),
    (["--seq-len", "100000"], "gpt-mini has 256 positions"),
    (["--peak-tflops", "0"], "--peak-tflops 0"),
    (["--threads", "0"], "--threads 0: must be a positive integer"),
    (["--find-max-batch"], "--find-max-batch needs a CUDA GPU"),
    (["--batch-size", str(2**31)], "does not fit"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert needle in _one_error_line(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda():
    result = CliRunner().invoke(main, ["bench", "--device", "cuda"])
    assert result.exit_code == 2
    assert "CUDA is not available" in _one_error_line(result)


def test_plot_without_matplotlib_fails_before_running(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = CliRunner().invoke(main, [*TINY_CLI, "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "pip install 'tiecheck[plot]'" in _one_error_line(result)
    assert not (tmp_path / "x.png").exists()


def test_output_to_a_folder_fails_before_running(tmp_path):
    result = CliRunner().invoke(main, [*TINY_CLI, "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "is a folder" in _one_error_line(result)


def test_cli_writes_csv_and_plot(tmp_path):
    out, fig = tmp_path / "r.csv", tmp_path / "r.png"
    result = CliRunner().invoke(main, [*TINY_CLI, "--model", "llama-mini", "--format", "csv", "-o", str(out),
                                       "--plot", str(fig)])
    assert result.exit_code == 0, result.output
    # results went to the file, said on stderr; no progress bar without a terminal
    assert result.stdout == ""
    assert result.stderr == f"tiecheck: wrote {out}\n"
    text = out.read_text()
    assert ("# command: tiecheck bench --model llama-mini --device cpu --batch-size 2 --seq-len 16 --rounds 2 "
            "--steps 1 --format csv --output") in text
    assert fig.stat().st_size > 0


def test_progress_bar_draws_only_on_a_terminal(capsys):
    quiet = Progress(10, enabled=False)
    quiet(5, "round 1")
    quiet.close()
    assert capsys.readouterr().err == ""
    bar = Progress(10, enabled=True, width=10)
    bar(5, "round 1/2 tied")
    assert "[#####.....]  50% round 1/2 tied" in capsys.readouterr().err
    bar.close()


def test_resolve_defaults_on_cpu():
    plan = resolve(BenchConfig(device="cpu"))
    assert (plan.model, plan.dtype, plan.batch_size, plan.seq_len, plan.threads) == ("gpt-mini", "fp32", 4, 64, 1)
    assert plan.units() == 2 * (plan.warmup + plan.rounds * plan.steps)
    assert resolve(BenchConfig(device="cpu", compile=True)).warmup == 5


def test_threads_are_set_for_the_run_and_restored():
    before = torch.get_num_threads()
    r = run_bench(tiny(rounds=2, threads=2))
    assert "(2 threads)" in r.header["device"]
    assert torch.get_num_threads() == before
