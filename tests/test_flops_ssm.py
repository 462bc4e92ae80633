"""State-space layers on meta: the depthwise causal convolution and the scan count like FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from tiecheck.flops import count_flops

pytestmark = pytest.mark.usefixtures("flops_path")  # both ways of tracing a small model (conftest.py)

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Mamba2Config, MambaConfig  # noqa: E402

T = 16


def _configs() -> dict:
    return {
        "mamba": MambaConfig(num_hidden_layers=2, hidden_size=16, state_size=4, vocab_size=50,
                             intermediate_size=32, conv_kernel=4),
        "mamba2": Mamba2Config(num_hidden_layers=2, hidden_size=16, state_size=4, vocab_size=50, num_heads=4,
                               head_dim=8, n_groups=1, chunk_size=8, conv_kernel=4),
    }


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_meta_count_equals_flop_counter_mode(family):
    # On the CPU both run transformers' reference path: projections (mm), the depthwise causal
    # convolution, and the scan's matmuls/einsums; FlopCounterMode counts them all exactly.
    torch.manual_seed(0)
    # Frozen: transformers >= 5 routes these layers' functions through the `kernels` package's
    # nn.Module wrappers, and FlopCounterMode's module tracker fails on them ("Expected gradient
    # function to be set") when parameters require grad under no_grad. The count is the same.
    model = AutoModelForCausalLM.from_config(_configs()[family]).eval().requires_grad_(False)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(input_ids=torch.randint(0, 50, (1, T)), use_cache=False)
    conv1d = F.conv1d
    r = count_flops(model, seq_len=T, device="meta")
    assert r.available, r.reason
    assert r.forward == fc.get_total_flops()
    assert r.uncounted_ops == {}
    assert F.conv1d is conv1d  # the meta rewrite of the convolution is undone after the trace
    # the mixer is the token-mixing part: its projections and convolution count as attention projections
    assert r.by_part["attention_projections"] > 0
    assert r.by_part["other"] == 0


@pytest.mark.parametrize(("groups", "out_channels"), [(8, 8), (2, 6)])
def test_grouped_conv1d_on_meta_counts_like_the_convolution(groups, out_channels):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(8, out_channels, 3, groups=groups, padding=2)
    x = torch.randn(2, 8, 16)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        conv(x)
    r = count_flops(conv, inputs=x, device="meta")
    assert r.available, r.reason
    assert r.forward == fc.get_total_flops() == 2 * 2 * out_channels * 18 * (8 // groups) * 3
    assert set(r.by_operator) == {"einsum"}  # the meta rewrite ran (a real trace says convolution)
