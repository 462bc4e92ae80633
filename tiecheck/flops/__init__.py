"""FLOPs of a Transformer forward pass, counted by tracing with fvcore.

Split the way fvcore splits its own counter (``flop_count`` / ``jit_handles`` /
``jit_analysis``):

* :mod:`~tiecheck.flops.analytic`: the closed-form formula (PaLM, appendix B), torch-free;
* :mod:`~tiecheck.flops.inputs`: the token ids a forward is traced with;
* :mod:`~tiecheck.flops.handles`: the op -> handle table, every handle returning FLOPs;
* :mod:`~tiecheck.flops.trace`: the tracing engine, :func:`count_flops`, and its conventions;
* :mod:`~tiecheck.flops.result`: :class:`FlopsResult`.

The formula and the result type are plain Python; the tracer needs torch and fvcore, so it is
loaded on first use of :func:`count_flops`, and the bench (whose GPU machines may lack fvcore)
uses the formula alone.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from tiecheck.flops.analytic import ATTENTION_MODES, analytic_flops
from tiecheck.flops.result import PARTS, FlopsResult

_TRACER = {"count_flops": "trace", "ModelInputs": "inputs", "synthesize_inputs": "inputs"}


def __getattr__(name: str) -> Any:
    if name in _TRACER:
        # the tracer's torch and fvcore, on first use
        return getattr(import_module(f"tiecheck.flops.{_TRACER[name]}"), name)
    raise AttributeError(f"module 'tiecheck.flops' has no attribute {name!r}")

__all__ = [
    "ATTENTION_MODES",
    "PARTS",
    "FlopsResult",
    "ModelInputs",
    "analytic_flops",
    "count_flops",
    "synthesize_inputs",
]
