"""What a FLOPs count returns: :class:`FlopsResult`, its parts and its conventions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

PARTS = ("embedding", "attention", "attention_projections", "mlp", "experts", "router", "output_projection",
         "other")

UNIT = "FLOP"
NOTE_ON_TYING = (
    "Tied and untied versions of a model have identical FLOPs: the output projection is the "
    "same matrix product whether or not its weight is shared with the embedding. Tying saves "
    "memory (weights, gradients, optimizer state), not compute."
)
CONVENTIONS = {
    "full": (
        "2 FLOPs per multiply-add; matrix products only (elementwise ops, norms and embedding "
        "lookups are not counted); attention counted with the full score matrix even when "
        "causal, as PaLM and torchtitan do; train_step_estimate = 3 x forward."
    ),
    "causal-half": (
        "2 FLOPs per multiply-add; matrix products only (elementwise ops, norms and embedding "
        "lookups are not counted); causal attention halved (only the lower triangle of the score "
        "matrix), the FlashAttention convention; train_step_estimate = 3 x forward."
    ),
}

MOE_CONVENTION = (
    "Mixture of experts: each token runs top_k routed experts plus the shared experts, the "
    "router's matmul counted and dense layers counted dense; with top-k routing and no capacity "
    "limit the total does not depend on how tokens spread over experts. A capacity factor c caps "
    "each expert at c x tokens x top_k / num_experts rows: overflow from an uneven routing is "
    "dropped, making the count routing-dependent and at most min(1, c) x this figure; kernels that "
    "pad every expert to its capacity do c x this figure whatever the routing."
)


@dataclass(frozen=True)
class FlopsResult:
    """FLOPs of one forward pass, or why they could not be counted (``available=False``).

    ``forward`` covers the whole batch. ``tokens`` is the number of token positions fed to
    the model per example (``seq_len``, or ``seq_len + tgt_seq_len`` for an encoder-decoder);
    ``per_token`` divides ``forward`` by ``batch_size * tokens``. ``method`` says how the
    trace ran: "cpu-zeros", "meta", "real" or "real-batch-1" (see :func:`count_flops`).
    ``attention_calls`` counts the attention products in the trace and how many were causal:
    one per SDPA call, two (QK^T and AV) per eager attention. ``attention_full_matrix`` is the
    attention row counted with the full score matrix, set only where sliding-window or chunked
    layers make it differ from ``by_part["attention"]``.
    """

    available: bool
    reason: str | None = None
    attention: str = "full"
    family: str | None = None
    method: str | None = None
    batch_size: int = 1
    seq_len: int | None = None
    requested_seq_len: int | None = None
    tgt_seq_len: int | None = None
    forward: int | None = None
    by_part: Mapping[str, int] | None = None
    by_operator: Mapping[str, int] | None = None
    attention_calls: Mapping[str, int] | None = None
    uncounted_ops: Mapping[str, int] = field(default_factory=dict)
    ignored_ops: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    parameters: Mapping[str, Any] | None = None
    attention_full_matrix: int | None = None
    # Where the count is unavailable: each failed try as "method: exception" (the reason says it in words).
    errors: tuple[str, ...] = ()

    unit = UNIT
    note_on_tying = NOTE_ON_TYING

    @property
    def convention(self) -> str:
        text = CONVENTIONS[self.attention]
        if self.parameters and self.parameters.get("moe_layers"):
            text += " " + MOE_CONVENTION
        return text

    @property
    def tokens(self) -> int | None:
        if self.seq_len is None:
            return None
        return self.seq_len + (self.tgt_seq_len or 0)

    @property
    def per_token(self) -> float | None:
        if self.forward is None or not self.tokens:
            return None
        return self.forward / (self.batch_size * self.tokens)

    @property
    def train_step_estimate(self) -> int | None:
        """Forward plus backward, taken as 3 x forward (backward ~ 2 x forward)."""
        return None if self.forward is None else 3 * self.forward

    @property
    def output_projection_share(self) -> float | None:
        if not self.forward or self.by_part is None:
            return None
        return self.by_part.get("output_projection", 0) / self.forward

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (plain ints, floats, strings, lists and dicts)."""
        d: dict[str, Any] = {
            "available": self.available,
            "reason": self.reason,
            "unit": self.unit,
            "convention": self.convention,
            "attention": self.attention,
            "family": self.family,
            "method": self.method,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "requested_seq_len": self.requested_seq_len,
        }
        if self.family == "encoder-decoder":
            d["tgt_seq_len"] = self.tgt_seq_len
        d.update(
            {
                "tokens": self.tokens,
                "forward": self.forward,
                "per_token": self.per_token,
                "train_step_estimate": self.train_step_estimate,
                "by_part": None if self.by_part is None else {k: int(self.by_part.get(k, 0)) for k in PARTS},
                "output_projection_share": self.output_projection_share,
                "by_operator": None if self.by_operator is None else dict(sorted(self.by_operator.items())),
                "attention_calls": None if self.attention_calls is None else dict(self.attention_calls),
                "attention_full_matrix": self.attention_full_matrix,
                "uncounted_ops": dict(sorted(self.uncounted_ops.items())),
                "ignored_ops": dict(sorted(self.ignored_ops.items())),
                "parameters": None if self.parameters is None else dict(self.parameters),
                "notes": list(self.notes),
                "errors": list(self.errors),
                "note_on_tying": self.note_on_tying,
            }
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlopsResult:
        """A result from its ``to_dict`` (a saved report): the derived figures are computed again."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["notes"], kwargs["errors"] = tuple(d.get("notes", ())), tuple(d.get("errors", ()))
        kwargs["uncounted_ops"], kwargs["ignored_ops"] = dict(d.get("uncounted_ops") or {}), dict(d.get("ignored_ops") or {})
        return cls(**kwargs)


@dataclass(frozen=True)
class NoFlops:
    """FLOPs not counted because the target has no module to trace (a file of tensors): the reason alone."""

    reason: str
    available = False

    def to_dict(self) -> dict[str, Any]:
        return {"available": False, "reason": self.reason}


def flops_from_dict(d: Mapping[str, Any]) -> FlopsResult | NoFlops:
    """A report's ``flops`` section, from its JSON."""
    if set(d) == {"available", "reason"}:
        return NoFlops(d["reason"])
    return FlopsResult.from_dict(d)
