"""Tied vs untied training step, with pytest-benchmark.

    pytest benchmarks/ --benchmark-only                       # CPU: gpt-mini; GPU: gpt2-124m too
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # keep the run for comparisons
    pytest benchmarks/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%  # as benchmarks/README.md

The step is the one ``tiecheck bench`` times (``Variant.step``: forward with the loss,
backward, AdamW step): both variants from the same seed, on the same batch. This suite is for
regression gating over commits; ``tiecheck bench`` is the controlled tied/untied comparison
(interleaved rounds, bootstrap intervals).
"""

from __future__ import annotations

import pytest
import torch

from tiecheck import models
from tiecheck.bench import device as D
from tiecheck.bench.protocol import Variant, make_batches

VARIANTS = pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])


class _NoTimer:
    """Variant.step marks phase boundaries; pytest-benchmark times the whole step instead."""

    def mark(self) -> None:
        pass


def _train_step(name: str, tied: bool, dev: torch.device, dtype: str, batch_size: int, seq_len: int):
    module = models.build(name, tied=tied, device=dev, seed=0)
    optimizer, _ = D.make_adamw(module.parameters(), dev)
    v = Variant(name="tied" if tied else "untied", module=module, fn=module, dev=dev, dtype=dtype, mode="train",
                optimizer=optimizer, scaler=D.grad_scaler(dev, dtype))
    config = models.get_config(name)
    batch = make_batches(config.kind, config.vocab_size, batch_size, seq_len, 1, 0, dev)[0]
    timer = _NoTimer()

    def step() -> None:
        v.step(batch, timer)
        v.losses.clear()  # keep no per-step tensors alive across thousands of iterations

    for _ in range(2):  # warm-up: allocate the AdamW state, settle the allocator
        step()
    return step


@pytest.fixture
def one_cpu_thread():
    # As `tiecheck bench` does on the CPU: one thread is steady on a busy machine, where two
    # wait on each other at every operator and a baseline compares against noise.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@VARIANTS
def test_train_step_gpt_mini_cpu(benchmark, tied, one_cpu_thread):
    benchmark.group = "train step: gpt-mini, cpu, fp32, batch 4 x 64"
    benchmark.extra_info.update(model="gpt-mini", tied=tied, tokens=4 * 64)
    step = _train_step("gpt-mini", tied, torch.device("cpu"), "fp32", 4, 64)
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@VARIANTS
def test_train_step_gpt2_124m_cuda(benchmark, tied):
    dev = torch.device("cuda")
    dtype = D.default_dtype(dev)
    benchmark.group = f"train step: gpt2-124m, cuda, {dtype}, batch 8 x 1024"
    benchmark.extra_info.update(model="gpt2-124m", tied=tied, tokens=8 * 1024, device=D.device_name(dev))
    step = _train_step("gpt2-124m", tied, dev, dtype, 8, 1024)

    def synced_step() -> None:
        # CUDA launches return before the work is done: synchronise so the timer sees the step.
        step()
        D.synchronize(dev)

    benchmark.pedantic(synced_step, setup=lambda: D.synchronize(dev), rounds=30, iterations=1, warmup_rounds=3)
