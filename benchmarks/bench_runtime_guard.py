"""The cost of ``TieGuard.check()`` and of the training callbacks' per-step hook, against a training step.

    pytest benchmarks/bench_runtime_guard.py --benchmark-only -s

A check looks only at the guarded names (Parameter identity while the tie holds), so its cost
does not grow with the model: the 8B Llama on the meta device checks as fast as gpt-mini.
Building the guard runs the full tie analysis once; it is timed too. The callbacks check after
every optimizer step by default: their hook (``on_step_end`` for transformers' Trainer,
``on_train_batch_end`` for Lightning) is timed against one step of gpt-mini, and against one
Trainer step of the 1-layer GPT-2 the tests train (the smallest step a user could guard).
"""

from __future__ import annotations

import itertools
import time
import types

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


def _gpt_mini_step(dev: torch.device):
    """gpt-mini, its AdamW, and one train step of it (forward with the loss, backward, AdamW)."""
    module = models.build("gpt-mini", tied=True, device=dev, seed=0)
    optimizer, _ = D.make_adamw(module.parameters(), dev)
    v = Variant(name="tied", module=module, fn=module, dev=dev, dtype="fp32", mode="train", optimizer=optimizer,
                scaler=D.grad_scaler(dev, "fp32"))
    config = models.get_config("gpt-mini")
    batch = make_batches(config.kind, config.vocab_size, 4, 64, 1, 0, dev)[0]

    def step() -> None:
        v.step(batch, _NoTimer())
        v.losses.clear()

    return module, optimizer, step


def test_check_vs_one_gpt_mini_step(benchmark, one_cpu_thread, publish):
    module, optimizer, step = _gpt_mini_step(torch.device("cpu"))
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


def _tiny_trainer_step_s(tmp_path) -> float:
    """One optimizer step of a Trainer run of the tests' 1-layer GPT-2, no callback of ours."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 8))]

    def run(steps: int) -> float:
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                                              report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                                              logging_strategy="no")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0

    run(5)  # warm-up
    return (run(105) - run(5)) / 100  # the steps alone, without the run's set-up


def test_callback_hooks_vs_one_step(benchmark, one_cpu_thread, publish, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    from tiecheck.integrations import lightning as lit_cb  # noqa: PLC0415 - after the importorskip that guards it
    from tiecheck.integrations import transformers as hf_cb  # noqa: PLC0415 - idem

    dev = torch.device("cpu")
    module, optimizer, step = _gpt_mini_step(dev)
    for _ in range(2):
        step()
    step_s = _median(step, 15)
    tiny_s = _tiny_trainer_step_s(tmp_path)

    hf = hf_cb.TiecheckCallback(module)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    steps = itertools.count(1)

    def hf_hook() -> None:  # what the Trainer runs after each optimizer step: a check, no save due
        state.global_step = next(steps)
        hf.on_step_end(args, state, control, model=module, optimizer=optimizer)

    lit = lit_cb.TiecheckCallback(module)
    trainer = types.SimpleNamespace(global_step=0, optimizers=[optimizer])

    def lit_hook() -> None:
        trainer.global_step += 1
        lit.on_train_batch_end(trainer, module, None, None, 0)

    lit_s = _median(lit_hook, 2001)
    benchmark.group = "TiecheckCallback hook: gpt-mini, cpu"
    benchmark(hf_hook)
    hf_s = benchmark.stats.stats.median
    assert hf.guard.checks > 1000
    assert lit.guard.checks == 2001
    benchmark.extra_info.update(step_s=step_s, tiny_trainer_step_s=tiny_s, hf_hook_s=hf_s, lightning_hook_s=lit_s)
    publish(f"\ngpt-mini train step {step_s * 1e3:.2f} ms; 1-layer GPT-2 Trainer step {tiny_s * 1e3:.2f} ms | "
            f"Trainer on_step_end {hf_s * 1e6:.2f} us ({hf_s / step_s:.1e} of the gpt-mini step, "
            f"{hf_s / tiny_s:.1e} of the Trainer step) | Lightning on_train_batch_end {lit_s * 1e6:.2f} us "
            f"({lit_s / step_s:.1e}, {lit_s / tiny_s:.1e})")
    assert max(hf_s, lit_s) < tiny_s / 100
