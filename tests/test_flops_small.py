"""A small model's FLOPs are counted on the CPU with zero-filled weights (``small_for_zeros``).

On meta, torch's first Python decomposition imports torch._dynamo and sympy; on the CPU nothing is
imported. These tests hold the bounds, that the module's own tensors are never read or changed, and
that a failed CPU trace leaves the decision to the meta trace. That both ways count the same is
held by every FLOPs test, which runs both (the ``flops_path`` fixture of conftest.py).
"""

from __future__ import annotations

import torch
from test_flops import TinyLM, tiny_lm_flops
from torch import nn

from tiecheck.flops import count_flops
from tiecheck.flops.standins import small_for_zeros


def test_a_small_model_is_one_within_every_bound():
    with torch.device("meta"):
        at_bytes = nn.Linear(4096, 4096, bias=False)  # 64 MiB of float32
        over_bytes = nn.Linear(4096, 4097, bias=False)
        four_m = nn.Linear(4000, 1000, bias=False)  # 2 x 4M parameters x 250 tokens = 2 GFLOP
        one_m = nn.Linear(1000, 1000, bias=False)
    assert small_for_zeros(at_bytes, 1)
    assert not small_for_zeros(over_bytes, 1)
    assert small_for_zeros(four_m, 250)
    assert not small_for_zeros(four_m, 251)
    assert small_for_zeros(one_m, 512)
    assert not small_for_zeros(one_m, 513)  # attention grows as seq², which the FLOP bound leaves out
    with torch.device("meta"):
        untied = nn.Sequential(nn.Embedding(4096, 2049), nn.Linear(2049, 4096, bias=False))  # 32 MiB + 32 KiB each
        tied = nn.Sequential(nn.Embedding(4096, 2049), nn.Linear(2049, 4096, bias=False))
    tied[1].weight = tied[0].weight
    assert not small_for_zeros(untied, 1)
    assert small_for_zeros(tied, 1)  # one tensor, one stand-in
    with torch.device("meta"):
        buffered = nn.Module()
        buffered.register_buffer("table", torch.empty(16 * 2**20 + 1))
    assert not small_for_zeros(buffered, 1)  # buffers are stand-ins too


def test_the_cpu_trace_leaves_the_weights_and_batch_scales():
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = count_flops(model, batch_size=4, seq_len=16)
    assert (r.method, r.forward, r.batch_size) == ("cpu-zeros", tiny_lm_flops(4, 16), 4)
    assert r.notes[-1] == "traced one example on the CPU with zero-filled weights (a small model) and scaled by batch_size"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.head.weight is model.tok.weight
    given = count_flops(model, inputs=torch.ones(2, 16, dtype=torch.long))
    assert given.method == "meta"  # inputs the caller made are traced as given, never on stand-ins


class FailsOnCpu(TinyLM):
    def forward(self, idx):
        if idx.device.type == "cpu":
            raise RuntimeError("no CPU kernel for this")
        return super().forward(idx)


def test_a_failed_cpu_trace_leaves_the_meta_trace_to_decide():
    with torch.device("meta"):
        model = FailsOnCpu()
    r = count_flops(model, seq_len=16)
    assert (r.method, r.forward) == ("meta", tiny_lm_flops(1, 16))
    assert not any("CPU" in n or "fell back" in n for n in r.notes)


class SeesThreads(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, idx):
        self.seen.append(torch.get_num_threads())
        return super().forward(idx)


def test_the_cpu_trace_runs_on_one_thread_and_gives_the_others_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = SeesThreads()
        assert count_flops(model, seq_len=16).method == "cpu-zeros"
        assert model.seen == [1]  # a small model's arithmetic, without waiting on a second thread
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
