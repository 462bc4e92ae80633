"""The tracer under fvcore: ``torch.jit.trace``, deprecated in torch 2.13 (docs/flops.md).

The first test fails on any torch release whose tracer state is not recorded here, so the
release that removes (or starts to warn harder about) ``torch.jit.trace`` is noticed before
counting breaks; the plan for that release is in docs/flops.md. The last test keeps the
fallback's accuracy known: ``FlopCounterMode`` on meta gives the same totals as the fvcore path.
"""

import warnings

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from tiecheck import models
from tiecheck.flops.trace import count_flops

pytestmark = pytest.mark.usefixtures("flops_path")  # both ways of tracing a small model (conftest.py)

# torch major.minor -> state of torch.jit.trace, as checked on that release:
# "supported" (no warning), "deprecated" (DeprecationWarning, still traces), "removed".
KNOWN_TRACER_STATE = {"2.13": "deprecated"}  # checked on 2.13.0+cpu


def _tracer_state() -> str:
    trace = getattr(torch.jit, "trace", None)
    if trace is None:
        return "removed"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        try:
            trace(torch.nn.Linear(2, 2), torch.zeros(1, 2))
        except (DeprecationWarning, FutureWarning) as e:
            return "deprecated" if "torch.jit.trace" in str(e) else f"warns: {e}"
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            return f"removed: {type(e).__name__}"
    return "supported"


def test_tracer_state_of_the_installed_torch_is_known():
    release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert release in KNOWN_TRACER_STATE, (
        f"torch {release}: torch.jit.trace state not recorded; run this test, follow docs/flops.md "
        f"(the torch.jit.trace plan) and record it in KNOWN_TRACER_STATE")
    assert _tracer_state() == KNOWN_TRACER_STATE[release]


def test_count_flops_is_silent_under_deprecations_as_errors():
    # users running with -W error keep their FLOPs: the trace's warnings are contained
    model = models.build("gpt-mini", device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        r = count_flops(model, seq_len=32)
    assert r.available, r.reason
    assert r.forward == _dispatch_total(model, 32)


def _dispatch_total(model: torch.nn.Module, seq_len: int) -> int:
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids)
    return int(fc.get_total_flops())


@pytest.mark.parametrize("name", ["gpt-mini", "tiny-llama"])
def test_dispatch_fallback_equals_the_fvcore_path_on_meta(name):
    if name == "gpt-mini":
        model = models.build("gpt-mini", device="meta")
    else:
        config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    r = count_flops(model, seq_len=64)
    assert r.forward == _dispatch_total(model, 64)
