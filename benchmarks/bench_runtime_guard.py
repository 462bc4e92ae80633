"""The cost of ``TieGuard.check()``: against one optimizer step of gpt-mini, and on an 8B model.

    pytest benchmarks/bench_runtime_guard.py --benchmark-only -s

A check looks only at the guarded names (Parameter identity while the tie holds), so its cost
does not grow with the model: the 8B Llama on the meta device checks as fast as gpt-mini.
Building the guard runs the full tie analysis once; it is timed too.
"""

from __future__ import annotations

import time

import pytest
import torch

from tiecheck import models
from tiecheck.bench import device as D
from tiecheck.bench.protocol import Variant, make_batches
from tiecheck.runtime import TieGuard


class _NoTimer:
    def mark(self) -> None:
        pass


def _median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@pytest.fixture
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_check_vs_one_gpt_mini_step(benchmark, one_cpu_thread, publish):
    dev = torch.device("cpu")
    module = models.build("gpt-mini", tied=True, device=dev, seed=0)
    optimizer, _ = D.make_adamw(module.parameters(), dev)
    v = Variant(name="tied", module=module, fn=module, dev=dev, dtype="fp32", mode="train", optimizer=optimizer,
                scaler=D.grad_scaler(dev, "fp32"))
    config = models.get_config("gpt-mini")
    batch = make_batches(config.kind, config.vocab_size, 4, 64, 1, 0, dev)[0]

    def step() -> None:
        v.step(batch, _NoTimer())
        v.losses.clear()

    guard = TieGuard(module, optimizer=optimizer)
    assert len(guard.ties) == 1
    for _ in range(2):  # warm-up: AdamW state, allocator
        step()
    step_s = _median(step, 15)
    benchmark.group = "TieGuard.check: gpt-mini, cpu"
    benchmark(guard.check, where="after the step")
    check_s = benchmark.stats.stats.median
    benchmark.extra_info.update(step_s=step_s, check_s=check_s, ratio=check_s / step_s)
    publish(f"\ngpt-mini: one train step (fwd+bwd+AdamW, batch 4 x 64) {step_s * 1e3:.2f} ms; guard.check() "
            f"{check_s * 1e6:.2f} us; ratio {check_s / step_s:.1e}")
    assert check_s < step_s / 100


def test_check_on_an_8b_llama_on_meta(benchmark, publish):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.tie_weights()
    n = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    guard = TieGuard(model)
    build_s = time.perf_counter() - t0
    assert [t.names for t in guard.ties] == [("lm_head.weight", "model.embed_tokens.weight")]
    benchmark.group = "TieGuard.check: 8B Llama, meta"
    benchmark(guard.check, where="step")
    check_s = benchmark.stats.stats.median
    benchmark.extra_info.update(params=n, build_s=build_s, check_s=check_s)
    publish(f"\n{n / 1e9:.2f}B-param Llama on meta: TieGuard() {build_s * 1e3:.1f} ms (the full tie analysis, once); "
            f"guard.check() {check_s * 1e6:.2f} us")
