"""Where a FLOPs trace runs: stand-ins for a module's tensors, and which models the CPU may count.

The trace never reads a module's own tensors. On meta its parameters and buffers are swapped for
meta tensors; a small model is first traced on the CPU with zero-filled stand-ins
(:func:`small_for_zeros` says which models are small, and safe, enough). Ties are kept either way.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from tiecheck.flops.moe import experts_kind, is_hf_experts

# A small model is traced on the CPU with zero-filled stand-ins for its tensors before it is tried on
# meta. The products and their shapes are the same; what differs is torch's cost. On meta, operators
# with no meta kernel in C++ (``arange``, ``remainder``, ``empty_like``, ...) run torch's Python
# decompositions, and the first of them imports ``torch._dynamo`` and sympy: about 1 s, against 0.05 s
# for the whole CPU count of the bundled gpt-mini. CPU kernels are C++ and import nothing. The bounds
# keep the stand-ins and the one example's arithmetic small: 2 x parameters x tokens under 2 GFLOP.
ZEROS = "cpu-zeros"
_ZEROS_MAX_BYTES = 64 * 2**20
_ZEROS_MAX_FLOP = 2 * 10**9
_ZEROS_MAX_SEQ = 512  # attention grows with the square of the sequence, which the bound above ignores
# What zeros do change is where a router sends the tokens: its logits all tie, and every token goes to the
# same experts. transformers' experts modules run batched_mm under the trace (``traceable_experts``), whose
# products do not depend on the routing; any other routed experts run their own routing, and where that
# caps an expert's rows (Switch Transformers' expert_capacity) the overflow is dropped: a zero-filled
# Switch counted 157 MFLOP where its forward does 167. Such a model is left to the meta trace.


class Swapped:
    """Within the block the module's parameters and buffers are stand-ins on ``device`` (ties kept).

    On meta the stand-ins hold nothing; elsewhere they are zero-filled, so a trace reads defined
    values and never the module's own. The module's tensors are not touched.
    """

    def __init__(self, module: nn.Module, device: str = "meta") -> None:
        memo: dict[int, torch.Tensor] = {}
        state: dict[str, torch.Tensor] = {}
        named = list(module.named_parameters(remove_duplicate=False)) + list(
            module.named_buffers(remove_duplicate=False))
        for name, t in named:
            if id(t) not in memo:
                e = (torch.empty_like(t.detach(), device=device) if device == "meta"
                     else torch.zeros(t.shape, dtype=t.dtype, device=device))
                memo[id(t)] = nn.Parameter(e, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else e
            state[name] = memo[id(t)]
        self._ctx = _reparametrize_module(module, state, tie_weights=True)

    def __enter__(self) -> None:
        self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


class OneThread:
    """Within the block torch runs on one thread. The CPU trace of a small model is a few milliseconds
    of arithmetic; with a second thread busy elsewhere, each operator waited for it (gpt-mini's count:
    0.045 s on one thread, 0.27-0.47 s on two, with the other core taken)."""

    def __enter__(self) -> None:
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._threads)


def routes_on_values(module: nn.Module) -> bool:
    """Whether ``module`` holds routed experts that are not transformers' experts modules.

    Args:
        module: the model whose FLOPs are counted.

    Returns:
        True when a routed-experts module runs its own routing under the trace: how many rows each
        expert gets then depends on the router's values, which zero-filled stand-ins tie.
    """
    return any(experts_kind(name, m) == "routed" and not is_hf_experts(m) for name, m in module.named_modules())


def small_for_zeros(module: nn.Module, seq_len: int) -> bool:
    """Whether ``module`` is small enough to be traced on the CPU with zero-filled tensors, and safe to.

    Args:
        module: the model whose FLOPs are counted.
        seq_len: the tokens of the one example traced.

    Returns:
        True when its parameters and buffers hold at most 64 MiB, 2 x parameters x ``seq_len`` is
        at most 2 GFLOP, ``seq_len`` is at most 512 and no experts route on values
        (:func:`routes_on_values`).
    """
    if seq_len > _ZEROS_MAX_SEQ:
        return False
    nbytes = params = 0
    for t in [*module.parameters(), *module.buffers()]:
        nbytes += t.numel() * t.element_size()
        params += t.numel()
        if nbytes > _ZEROS_MAX_BYTES:
            return False  # a large model, told by its first tensors: its modules are never walked
    return 2 * params * seq_len <= _ZEROS_MAX_FLOP and not routes_on_values(module)
