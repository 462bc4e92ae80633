"""FLOPs of a Transformer forward pass, counted by tracing with fvcore.

Split the way fvcore splits its own counter (``flop_count`` / ``jit_handles`` /
``jit_analysis``):

* :mod:`~tiecheck.flops.analytic`: the closed-form formula (PaLM, appendix B), torch-free;
* :mod:`~tiecheck.flops.inputs`: the token ids a forward is traced with;
* :mod:`~tiecheck.flops.handles`: the op -> handle table, every handle returning FLOPs;
* :mod:`~tiecheck.flops.trace`: the tracing engine, :func:`count_flops`, and its conventions;
* :mod:`~tiecheck.flops.result`: :class:`FlopsResult`.

This package imports torch and fvcore; ``tiecheck.api`` imports it only when FLOPs are asked for.
"""

from __future__ import annotations

from tiecheck.flops.analytic import ATTENTION_MODES, analytic_flops
from tiecheck.flops.inputs import ModelInputs, synthesize_inputs
from tiecheck.flops.result import PARTS, FlopsResult
from tiecheck.flops.trace import count_flops

__all__ = [
    "ATTENTION_MODES",
    "PARTS",
    "FlopsResult",
    "ModelInputs",
    "analytic_flops",
    "count_flops",
    "synthesize_inputs",
]
