"""FLOPs of a Transformer forward pass, counted by tracing with fvcore.

The count is taken from a TorchScript trace of one forward pass (fvcore's
``FlopCountAnalysis``) on synthesized token ids, with handles for the operators fvcore
gets wrong or does not know. By default the trace runs on the meta device, so a config
the size of an 8B model is counted in seconds without allocating weights.

Conventions
-----------
* Unit: FLOP, two per multiply-add. fvcore's own handles count multiply-adds; every
  handle used here returns FLOPs (2 x MACs), so no part of the total is in another unit.
* Counted: matrix products only -- ``linear``, ``matmul``, ``mm``, ``bmm``, ``addmm``,
  ``baddbmm``, ``addbmm``, ``mv``, ``addmv``, ``dot``, ``einsum``, convolutions, and
  ``scaled_dot_product_attention`` under any backend name. Bias additions inside
  ``addmm``/``baddbmm``/``linear`` are not counted. This is the convention of PaLM
  (appendix B), torchtitan and ``torch.utils.flop_counter``: at Transformer sizes the
  matrix products are all but all of the arithmetic.
* Ignored, and listed in ``ignored_ops`` with their call counts: elementwise arithmetic
  and activations (add, mul by a scale, gelu, softmax, ...), normalisation (layer_norm,
  rms_norm's pow/mean/rsqrt), reductions, comparisons, embedding lookups, indexing and
  data movement (view, reshape, cat, ...). ``prim::`` graph plumbing is skipped.
* Anything else the trace contains (an operator with no handle, a custom
  ``autograd.Function`` -- ``prim::PythonOp.*`` -- that may hide a matmul) is listed in
  ``uncounted_ops``. Nothing is dropped silently.
* Attention: QK^T and AV cost 4·B·H·Tq·Tk·d_head FLOPs (d_head of V may differ from Q/K;
  with grouped-query attention H is the number of query heads). ``attention="full"`` counts
  the whole score matrix even when it is causal, as PaLM and torchtitan do;
  ``attention="causal-half"`` halves causal attention, the FlashAttention benchmark
  convention. An attention call is causal when the nearest enclosing module says so with a
  boolean ``is_causal`` attribute (Hugging Face attention modules do), else when the SDPA
  call passes ``is_causal=True``, else when the model is decoder-only and Tq == Tk.

Parts (``by_part``), a partition of ``forward``
------------------------------------------------
* ``embedding``: always 0 -- a lookup is indexing, not arithmetic.
* ``attention``: QK^T and AV only: SDPA calls, and products of two activations inside an
  attention module (eager attention).
* ``attention_projections``: products with a weight inside an attention module
  (Q, K, V and output projections, fused or not).
* ``mlp``: products with a weight inside a Transformer layer (an item of a ModuleList or
  Sequential that contains attention) but outside its attention.
* ``output_projection``: products with a weight whose result has the vocabulary size as
  its last dimension -- the vocab logits (``lm_head``), tied to the embedding or not.
* ``other``: everything else (poolers, classifier heads, an activation product outside
  attention, ...).

A weight is a model parameter or buffer reached from the operand through views, casts,
transposes and splits. A module is an attention module when its attribute name or class
name contains "attn" or "attention" (case-insensitive).
"""

from __future__ import annotations

import inspect
import math
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "ATTENTION_MODES",
    "PARTS",
    "FlopsResult",
    "ModelInputs",
    "analytic_flops",
    "count_flops",
    "synthesize_inputs",
]

ATTENTION_MODES = ("full", "causal-half")
PARTS = ("embedding", "attention", "attention_projections", "mlp", "output_projection", "other")

UNIT = "FLOP"
NOTE_ON_TYING = (
    "Tied and untied versions of a model have identical FLOPs: the output projection is the "
    "same matrix product whether or not its weight is shared with the embedding. Tying saves "
    "memory (weights, gradients, optimizer state), not compute."
)
_CONVENTIONS = {
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

# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsResult:
    """FLOPs of one forward pass, or why they could not be counted (``available=False``).

    ``forward`` covers the whole batch. ``tokens`` is the number of token positions fed to
    the model per example (``seq_len``, or ``seq_len + tgt_seq_len`` for an encoder-decoder);
    ``per_token`` divides ``forward`` by ``batch_size * tokens``.
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

    unit = UNIT
    note_on_tying = NOTE_ON_TYING

    @property
    def convention(self) -> str:
        return _CONVENTIONS[self.attention]

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
                "uncounted_ops": dict(sorted(self.uncounted_ops.items())),
                "ignored_ops": dict(sorted(self.ignored_ops.items())),
                "notes": list(self.notes),
                "note_on_tying": self.note_on_tying,
            }
        )
        return d


@dataclass(frozen=True)
class ModelInputs:
    """Inputs for one forward pass: call ``module(*args, **kwargs)``.

    ``family`` is "decoder", "encoder", "encoder-decoder" or "unknown"; ``seq_len`` (and
    ``tgt_seq_len`` for an encoder-decoder) are the lengths actually used, after any cap by
    the model's maximum positions (see ``notes``).
    """

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    family: str = "unknown"
    batch_size: int = 1
    seq_len: int | None = None
    tgt_seq_len: int | None = None
    requested_seq_len: int | None = None
    vocab_size: int | None = None
    notes: tuple[str, ...] = ()

    def __call__(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)


# ----------------------------------------------------------------------------------------
# Analytic formula
# ----------------------------------------------------------------------------------------


def analytic_flops(
    n_matmul_params: int,
    n_layers: int,
    seq_len: int,
    d_attn: int,
    batch_size: int = 1,
    attention: str = "full",
) -> int:
    """Forward FLOPs by the formula of PaLM (Chowdhery et al. 2022), appendix B.

    ``forward = batch_size * (2 * N * T + 4 * L * T**2 * d_attn)``

    * ``N`` (``n_matmul_params``): parameters used in matrix products -- every projection
      and MLP weight and the output projection (counted once per use even when tied to the
      embedding), but not embedding lookups, biases or norm gains.
    * ``L`` (``n_layers``): attention layers; ``T``: sequence length; ``d_attn``: query
      heads x head dimension (d_model in most models, also under grouped-query attention,
      whose smaller K/V heads change N but not the score products).
    * The attention term is QK^T plus AV, 2·T²·d_attn multiply-adds per layer, with the
      full score matrix. ``attention="causal-half"`` halves it (all L layers taken as
      causal).

    For an encoder-decoder with equal source and target lengths pass
    ``n_layers = L_enc + 2 * L_dec`` (decoder self- and cross-attention); with unequal
    lengths the formula does not apply as written. The training step is commonly taken
    as 3x the forward (PaLM's 6N + 12LHQT per token).
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    for name, v in (("n_matmul_params", n_matmul_params), ("n_layers", n_layers),
                    ("seq_len", seq_len), ("d_attn", d_attn), ("batch_size", batch_size)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    attn = 4 * n_layers * seq_len * seq_len * d_attn
    if attention == "causal-half":
        attn //= 2
    return batch_size * (2 * n_matmul_params * seq_len + attn)


# ----------------------------------------------------------------------------------------
# Input synthesis
# ----------------------------------------------------------------------------------------

_MAX_POSITION_ATTRS = ("max_positions", "max_position_embeddings", "n_positions", "max_seq_len", "block_size",
                       "max_len", "context_length", "n_ctx", "max_seq_length")


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


def _hf_pretrained(module: nn.Module) -> bool:
    tf = sys.modules.get("transformers")  # loaded already if the module is a HF model
    base = getattr(tf, "PreTrainedModel", None) if tf is not None else None
    return base is not None and isinstance(module, base)


def _is_reference_model(module: nn.Module) -> bool:
    return type(module).__module__.startswith("tiecheck.models.")


def _first_embedding(module: nn.Module) -> nn.Embedding | None:
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            return m
    return None


def _config_int(config: Any, names: Sequence[str]) -> tuple[str, int] | None:
    if config is None:
        return None
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return n, v
    return None


def _required_positional(module: nn.Module) -> int | None:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            n += 1
    return n


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _token_ids(batch: int, seq: int, vocab: int | None, device: torch.device) -> torch.Tensor:
    """Deterministic ids in [0, vocab), avoiding id 0 (often padding) when the vocab allows."""
    v = max(int(vocab or 2), 1)
    row = torch.arange(seq, device=device, dtype=torch.long)
    row = row % (v - 1) + 1 if v > 1 else row * 0
    return row.unsqueeze(0).repeat(batch, 1)


def _any_causal_attr(module: nn.Module) -> bool:
    return any(getattr(m, "is_causal", None) is True for m in module.modules())


def synthesize_inputs(
    module: nn.Module,
    batch_size: int = 1,
    seq_len: int = 128,
    *,
    tgt_seq_len: int | None = None,
    device: torch.device | str | None = None,
) -> ModelInputs:
    """Token-id inputs of shape (batch_size, seq_len) that ``module`` accepts.

    The family is read from the module:

    * a Hugging Face ``PreTrainedModel``: ``config.vocab_size``; ``input_ids``, plus
      ``decoder_input_ids`` when ``config.is_encoder_decoder``; ``use_cache=False`` and
      ``return_dict=False`` where the forward takes them. Decoder-only when an attention
      module has ``is_causal=True``, else encoder.
    * a bundled reference model (``tiecheck.models``): ``.config.vocab_size`` and
      ``.config.kind``; ``(idx,)`` for decoders, ``(src, tgt)`` for the encoder-decoder.
    * anything else: the vocabulary from ``.config.vocab_size`` or the first
      ``nn.Embedding``; ``module(ids)``, or ``module(src, tgt)`` when the forward takes two
      required positional arguments.

    ``seq_len`` (and ``tgt_seq_len``, default ``seq_len``) are capped by the model's maximum
    positions (``max_positions``, ``max_position_embeddings``, ``n_positions``,
    ``block_size``, ..., or a position embedding's size); the cap is
    reported in ``notes``. Tensors are created on ``device``, default the module's device
    (meta for a module built under ``torch.device("meta")``).

    Raises ``ValueError`` when no vocabulary size or calling convention can be found.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    dev = torch.device(device) if device is not None else _module_device(module)
    config = getattr(module, "config", None)
    notes: list[str] = []

    vocab = _config_int(config, ("vocab_size", "n_vocab", "vocab"))
    vocab_size = vocab[1] if vocab else None
    if vocab_size is None:
        emb = _first_embedding(module)
        if emb is not None:
            vocab_size = emb.num_embeddings
            notes.append(f"vocab_size {vocab_size} taken from the first nn.Embedding")
    if vocab_size is None:
        raise ValueError(
            f"cannot synthesize token ids for {type(module).__name__}: no config.vocab_size and "
            "no nn.Embedding; pass inputs= (a tuple or dict of tensors, or a callable)"
        )

    hf = _hf_pretrained(module)
    kind = getattr(config, "kind", None) if _is_reference_model(module) else None
    enc_dec = bool(getattr(config, "is_encoder_decoder", False)) if hf else kind == "encoder-decoder"
    if not hf and kind is None:
        nreq = _required_positional(module)
        if nreq == 2:
            enc_dec = True
        elif nreq not in (0, 1):
            raise ValueError(
                f"cannot synthesize inputs for {type(module).__name__}: its forward takes "
                f"{nreq} required arguments; pass inputs= (a tuple or dict of tensors, or a callable)"
            )

    cap = _config_int(config, _MAX_POSITION_ATTRS)
    if cap is None and not hf:
        pos = None
        for name, m in module.named_modules():
            if isinstance(m, nn.Embedding) and re.search(r"pos", name.rsplit(".", 1)[-1], re.I):
                pos = (f"{name}.num_embeddings", m.num_embeddings)
                break
        cap = pos

    def capped(n: int, what: str) -> int:
        if cap is not None and n > cap[1]:
            notes.append(f"{what} capped from {n} to {cap[1]} by {cap[0]}={cap[1]}")
            return cap[1]
        return n

    src = capped(seq_len, "seq_len")
    tgt = capped(tgt_seq_len if tgt_seq_len is not None else seq_len, "tgt_seq_len") if enc_dec else None

    ids = _token_ids(batch_size, src, vocab_size, dev)
    if hf:
        kwargs: dict[str, Any] = {"input_ids": ids}
        if enc_dec:
            kwargs["decoder_input_ids"] = _token_ids(batch_size, tgt, vocab_size, dev)
        if _accepts(module, "use_cache"):
            kwargs["use_cache"] = False
        if _accepts(module, "return_dict"):
            kwargs["return_dict"] = False
        family = "encoder-decoder" if enc_dec else ("decoder" if _any_causal_attr(module) else "encoder")
        return ModelInputs((), kwargs, family, batch_size, src, tgt, seq_len, vocab_size, tuple(notes))

    if enc_dec:
        args: tuple = (ids, _token_ids(batch_size, tgt, vocab_size, dev))
        family = "encoder-decoder"
    else:
        args = (ids,)
        family = kind or ("decoder" if _any_causal_attr(module) else "unknown")
    return ModelInputs(args, {}, family, batch_size, src, tgt, seq_len, vocab_size, tuple(notes))


def _coerce_inputs(
    module: nn.Module,
    inputs: Any,
    batch_size: int,
    seq_len: int,
    device: torch.device,
) -> ModelInputs:
    """User inputs -> ModelInputs on ``device`` (tensors are moved, other values kept)."""
    if callable(inputs) and not isinstance(inputs, (torch.Tensor, ModelInputs)):
        inputs = inputs(module, batch_size, seq_len)
    if isinstance(inputs, ModelInputs):
        mi = inputs
    elif isinstance(inputs, torch.Tensor):
        mi = ModelInputs(args=(inputs,))
    elif isinstance(inputs, Mapping):
        mi = ModelInputs(kwargs=dict(inputs))
    elif isinstance(inputs, (tuple, list)):
        mi = ModelInputs(args=tuple(inputs))
    else:
        raise TypeError(
            "inputs must be a tensor, a tuple/list or dict of tensors, a ModelInputs, or a callable "
            f"make_inputs(module, batch_size, seq_len) returning one; got {type(inputs).__name__}"
        )

    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, torch.Tensor) else v

    args = tuple(move(a) for a in mi.args)
    kwargs = {k: move(v) for k, v in mi.kwargs.items()}
    first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
    if first is None:
        raise ValueError("inputs contain no tensor")
    bs, sl, tsl = mi.batch_size, mi.seq_len, mi.tgt_seq_len
    family = mi.family
    notes = list(mi.notes)
    if not isinstance(inputs, ModelInputs):
        # read the sizes off the tensors the user gave
        bs = int(first.shape[0]) if first.dim() >= 1 else 1
        sl = int(first.shape[1]) if first.dim() >= 2 else None
        tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        second = tensors[1] if len(tensors) > 1 else None
        if _hf_pretrained(module) and getattr(getattr(module, "config", None), "is_encoder_decoder", False):
            family = "encoder-decoder"
            dec = kwargs.get("decoder_input_ids")
            tsl = int(dec.shape[1]) if isinstance(dec, torch.Tensor) and dec.dim() >= 2 else None
        elif (not _hf_pretrained(module) and _required_positional(module) == 2 and second is not None
              and second.dim() >= 2):
            family = "encoder-decoder"
            tsl = int(second.shape[1])
        else:
            kind = getattr(getattr(module, "config", None), "kind", None) if _is_reference_model(module) else None
            family = kind or ("decoder" if _any_causal_attr(module) else "unknown")
        notes.append("inputs supplied by the caller; sizes read from the first tensor")
    return ModelInputs(args, kwargs, family, bs, sl, tsl, mi.requested_seq_len or sl, mi.vocab_size, tuple(notes))


# ----------------------------------------------------------------------------------------
# Operator handles
# ----------------------------------------------------------------------------------------

# Ops that reach a weight without changing what it is (views, casts, splits).
_PASS_THROUGH = frozenset(
    "aten::" + n
    for n in (
        "t", "transpose", "permute", "view", "reshape", "contiguous", "to", "type_as", "detach",
        "clone", "expand", "expand_as", "unsqueeze", "squeeze", "slice", "select", "narrow",
        "flatten", "unflatten", "numpy_T", "mT", "mH", "adjoint", "chunk", "split",
        "split_with_sizes", "unsafe_chunk", "unsafe_split", "unbind", "alias", "float", "half",
        "bfloat16", "_cast_Float", "_cast_Half", "resolve_conj", "resolve_neg", "view_as",
        "reshape_as", "movedim", "swapaxes", "swapdims", "tensor_split",
    )
) | {"prim::ListUnpack", "prim::TupleUnpack", "prim::ListConstruct", "prim::TupleConstruct"}

# Ops with no arithmetic at all -- shape queries, views, copies, casts, indexing, tensor
# creation. They are skipped like fvcore skips them, and not listed anywhere.
_NO_ARITHMETIC = frozenset(
    """
    size numel dim Int Float Bool ScalarImplicit item is_floating_point _shape_as_tensor
    sym_size contiguous view reshape permute transpose t expand expand_as unsqueeze squeeze
    slice select narrow flatten unflatten chunk split split_with_sizes unbind to type_as
    clone alias view_as reshape_as movedim swapaxes swapdims numpy_T mT mH adjoint
    tensor_split unsafe_chunk unsafe_split as_strided _unsafe_view _reshape_alias
    resolve_conj resolve_neg lift lift_fresh _to_copy to_dense expand_copy detach copy fill
    zero float half bfloat16 _cast_Float _cast_Half cat concat concatenate stack hstack
    vstack repeat repeat_interleave tile roll flip pad constant_pad_nd gather scatter index
    index_select index_put index_fill take take_along_dim masked_select nonzero arange
    linspace ones ones_like zeros zeros_like full full_like empty empty_like new_ones
    new_zeros new_full new_empty new_tensor tensor scalar_tensor eye diagonal diag diag_embed
    tril triu view_as_real view_as_complex __getitem__ _assert_async dropout feature_dropout
    alpha_dropout native_dropout
    """.split()
)

# Ops with arithmetic that is deliberately not counted (see the module docstring). They are
# listed in ``ignored_ops`` with their call counts.
_IGNORED = frozenset(
    """
    add sub rsub mul div true_divide floor_divide neg reciprocal pow sqrt rsqrt exp exp2 expm1
    log log1p log2 log10 abs sign sgn square tanh sigmoid silu gelu relu relu6 leaky_relu elu
    selu celu mish hardswish hardsigmoid hardtanh softplus glu sin cos tan atan atan2 asin
    acos sinh cosh asinh acosh atanh erf erfc erfinv softmax log_softmax _softmax
    _log_softmax layer_norm group_norm batch_norm instance_norm rms_norm native_layer_norm
    masked_fill masked_scatter where clamp clamp_min clamp_max clip minimum maximum fmin fmax
    lerp addcmul addcdiv mean sum prod max min amax amin argmax argmin std var norm
    linalg_vector_norm cumsum cumprod logsumexp topk sort argsort all any eq ne lt le gt ge
    logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_not
    bitwise_xor __and__ __or__ __xor__ __not__ __iand__ __ior__ __ixor__ __lshift__
    __rshift__ __ilshift__ __irshift__ isnan isinf isfinite nan_to_num round floor ceil
    trunc frac fmod remainder embedding embedding_bag one_hot scatter_add index_add diff
    bucketize searchsorted rand randn randint rand_like randn_like bernoulli multinomial
    polar complex real imag angle upsample_nearest2d upsample_bilinear2d adaptive_avg_pool1d
    adaptive_avg_pool2d avg_pool1d avg_pool2d max_pool1d max_pool2d
    """.split()
)


def _op_key(kind: str) -> str:
    return kind.split("::", 1)[-1]


def _in(kind: str, names: frozenset) -> bool:
    if not kind.startswith("aten::"):
        return False
    name = _op_key(kind)
    return name in names or name.rstrip("_") in names


def _shape(v: Any) -> list[int] | None:
    try:
        if v.isCompleteTensor():
            return list(v.type().sizes())
    except RuntimeError:
        pass
    return None


def _const(v: Any) -> Any:
    try:
        return v.toIValue()
    except RuntimeError:
        return None


def _named_input(node: Any, name: str) -> Any:
    try:
        v = node.namedInput(name)
    except (RuntimeError, AttributeError):
        return None
    return _const(v)


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _broadcast(a: Sequence[int], b: Sequence[int]) -> list[int]:
    out = []
    for i in range(max(len(a), len(b))):
        x = a[len(a) - 1 - i] if i < len(a) else 1
        y = b[len(b) - 1 - i] if i < len(b) else 1
        out.append(max(x, y))
    return out[::-1]


def _matmul_macs(a: Sequence[int], b: Sequence[int]) -> int:
    """Multiply-adds of torch.matmul(a, b) with numpy broadcasting and 1-D operands."""
    if not a or not b:
        return 0
    if len(a) == 1 and len(b) == 1:
        return int(a[0])
    if len(a) == 1:
        a = [1, a[0]]
    if len(b) == 1:
        b = [b[0], 1]
    m, k = a[-2], a[-1]
    n = b[-1]
    batch = _broadcast(a[:-2], b[:-2])
    return _prod(batch) * m * k * n


def _einsum_macs(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    """Multiply-adds of an einsum, contracting operands left to right.

    A two-operand einsum costs the product of the sizes of all its distinct indices (the
    usual matmul count). One operand (a sum or permutation) costs nothing here.
    """
    eq = equation.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum {equation!r}: {len(terms)} terms for {len(shapes)} operands")
    # expand "..." into fresh upper-case letters unused by the equation
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    ell = max((len(s) - len(t.replace("...", "")) for t, s in zip(terms, shapes) if "..." in t), default=0)
    ell_letters = "".join(spare[:ell])
    expanded = []
    for t, s in zip(terms, shapes):
        if "..." in t:
            n = len(s) - len(t.replace("...", ""))
            t = t.replace("...", ell_letters[ell - n:] if n else "")
        expanded.append(t)
    if not rhs and "->" not in eq:
        counts = Counter("".join(expanded))
        rhs = "".join(sorted(c for c, k in counts.items() if k == 1))
    rhs = rhs.replace("...", ell_letters)
    size: dict[str, int] = {}
    for t, s in zip(expanded, shapes):
        for c, d in zip(t, s):
            size[c] = max(size.get(c, 1), int(d))
    if len(expanded) < 2:
        return 0
    macs = 0
    cur = expanded[0]
    for i in range(1, len(expanded)):
        nxt = expanded[i]
        macs += _prod(size[c] for c in set(cur) | set(nxt))
        later = set(rhs).union(*[set(t) for t in expanded[i + 1:]])
        cur = "".join(sorted((set(cur) | set(nxt)) & later))
    return macs


class _Classifier:
    """Decides the part of each counted op and records attention calls."""

    def __init__(self, root: nn.Module, prefix: str, n_inputs: int, vocab_size: int | None,
                 family: str, attention: str) -> None:
        self.prefix = prefix
        self.n_inputs = n_inputs
        self.vocab_size = vocab_size
        self.family = family
        self.half_causal = attention == "causal-half"
        self.modules: dict[str, nn.Module] = dict(root.named_modules())
        self.attention_names: set[str] = set()
        self.layer_names: set[str] = set()
        pat = re.compile(r"attn|attention", re.I)
        for name, m in self.modules.items():
            if name and (pat.search(name.rsplit(".", 1)[-1]) or pat.search(type(m).__name__)):
                self.attention_names.add(name)
        for name, m in self.modules.items():
            if isinstance(m, (nn.ModuleList, nn.Sequential)):
                for child, _ in m.named_children():
                    full = f"{name}.{child}" if name else child
                    if any(a == full or a.startswith(full + ".") for a in self.attention_names):
                        self.layer_names.add(full)
        self.calls = Counter()
        self._cache: dict[str, tuple[str, ...]] = {}

    def owner(self, node: Any) -> str:
        scope = node.scopeName().split("/")[-1]
        if scope == self.prefix.rstrip("."):
            return ""
        return scope[len(self.prefix):] if scope.startswith(self.prefix) else scope

    def ancestors(self, name: str) -> tuple[str, ...]:
        """``name`` and its enclosing module names, nearest first."""
        got = self._cache.get(name)
        if got is None:
            parts = name.split(".") if name else []
            got = tuple(".".join(parts[:i]) for i in range(len(parts), 0, -1))
            self._cache[name] = got
        return got

    def is_weight(self, v: Any) -> bool:
        for _ in range(64):
            node = v.node()
            kind = node.kind()
            if kind == "prim::Param":
                return v.offset() >= self.n_inputs
            if kind == "prim::Constant":
                return _shape(v) is not None  # a tensor constant: a captured weight
            if kind in _PASS_THROUGH:
                ins = list(node.inputs())
                if not ins:
                    return False
                v = ins[0]
                continue
            return False
        return False

    def in_attention(self, owner: str) -> bool:
        return any(a in self.attention_names for a in self.ancestors(owner))

    def in_layer(self, owner: str) -> bool:
        return any(a in self.layer_names for a in self.ancestors(owner))

    def causal(self, owner: str, flag: Any, tq: int, tk: int) -> bool:
        if flag is True:
            return True
        for a in self.ancestors(owner):
            v = getattr(self.modules.get(a), "is_causal", None)
            if isinstance(v, bool):
                return v
        return self.family == "decoder" and tq == tk

    def attention_flops(self, owner: str, macs: int, flag: Any, tq: int, tk: int) -> int:
        causal = self.causal(owner, flag, tq, tk)
        self.calls["calls"] += 1
        self.calls["causal"] += int(causal)
        flops = 2 * macs
        if causal and self.half_causal:
            flops //= 2
        return flops

    def part_of_product(self, node: Any, operands: Sequence[Any], out_shape: list[int] | None,
                        vocab_check: bool = True) -> str:
        owner = self.owner(node)
        if any(self.is_weight(v) for v in operands):
            if (vocab_check and self.vocab_size and out_shape and out_shape[-1] == self.vocab_size):
                return "output_projection"
            if self.in_attention(owner):
                return "attention_projections"
            if self.in_layer(owner):
                return "mlp"
            return "other"
        if self.in_attention(owner):
            return "attention"
        return "other"


def _handles(cls: _Classifier) -> dict[str, Callable]:
    """fvcore handles, all returning FLOPs (2 x multiply-adds) keyed "part/op"."""

    def product(name: str, operands_of: Callable, macs_of: Callable, vocab_check: bool = True):
        def handle(inputs: list, outputs: list) -> Counter:
            node = outputs[0].node()
            ops = operands_of(inputs)
            shapes = [_shape(v) for v in ops]
            if any(s is None for s in shapes):
                raise ValueError(f"{name}: operand shapes unknown in the trace")
            macs = int(macs_of(shapes, inputs))
            out_shape = _shape(outputs[0])
            part = cls.part_of_product(node, ops, out_shape, vocab_check)
            if part == "attention":
                s0 = shapes[0]
                tq = s0[-2] if len(s0) >= 2 else 1
                flops = cls.attention_flops(cls.owner(node), macs, None, tq, tq)
            else:
                flops = 2 * macs
            return Counter({f"{part}/{name}": flops})

        return handle

    def mm(shapes, _):
        return _matmul_macs(shapes[0], shapes[1])

    def linear(shapes, _):
        x, w = shapes
        return _prod(x[:-1]) * w[-1] * (w[0] if len(w) == 2 else 1)

    def addmm(shapes, _):  # bias, a, b  (operands passed are a, b)
        return _matmul_macs(shapes[0], shapes[1])

    def addbmm(shapes, _):
        a, b = shapes
        return a[0] * a[1] * a[2] * b[2]

    def einsum(shapes, inputs):
        return _einsum_macs(_const(inputs[0]), shapes)

    def einsum_operands(inputs):
        return list(inputs[1].node().inputs())

    handles: dict[str, Callable] = {
        "aten::linear": product("linear", lambda i: i[:2], linear),
        "aten::matmul": product("matmul", lambda i: i[:2], mm),
        "aten::mm": product("mm", lambda i: i[:2], mm),
        "aten::bmm": product("bmm", lambda i: i[:2], mm),
        "aten::mv": product("mv", lambda i: i[:2], mm),
        "aten::dot": product("dot", lambda i: i[:2], mm),
        "aten::vdot": product("vdot", lambda i: i[:2], mm),
        "aten::addmm": product("addmm", lambda i: i[1:3], addmm),
        "aten::addmv": product("addmv", lambda i: i[1:3], addmm),
        "aten::baddbmm": product("baddbmm", lambda i: i[1:3], addmm),
        "aten::addbmm": product("addbmm", lambda i: i[1:3], addbmm),
        "aten::einsum": product("einsum", einsum_operands, einsum),
    }

    def conv_handle(inputs: list, outputs: list) -> Counter:
        from fvcore.nn.jit_handles import conv_flop_count

        node = outputs[0].node()
        x, w, out = _shape(inputs[0]), _shape(inputs[1]), _shape(outputs[0])
        if x is None or w is None or out is None:
            raise ValueError("convolution: shapes unknown in the trace")
        transposed = "transpose" in node.kind() or _named_input(node, "transposed") is True
        macs = int(conv_flop_count(x, w, out, transposed=transposed))
        part = cls.part_of_product(node, inputs[:2], None, vocab_check=False)
        return Counter({f"{part}/convolution": 2 * macs})

    for k in ("aten::_convolution", "aten::convolution", "aten::conv1d", "aten::conv2d",
              "aten::conv3d", "aten::conv_transpose1d", "aten::conv_transpose2d",
              "aten::conv_transpose3d"):
        handles[k] = conv_handle

    def sdpa(layout: str, causal_arg: str):
        """layout "bhtd": (..., T, d) as SDPA; "bthd": (B, T, H, d) as the raw kernels."""

        def handle(inputs: list, outputs: list) -> Counter:
            node = outputs[0].node()
            q, k, v = (_shape(x) for x in inputs[:3])
            if q is None or k is None or v is None:
                raise ValueError("attention: q/k/v shapes unknown in the trace")
            if layout == "bhtd":
                tq, e, tk, ev = q[-2], q[-1], k[-2], v[-1]
                bh = _prod(q[:-2])
            else:
                tq, e, tk, ev = q[1], q[-1], k[1], v[-1]
                bh = q[0] * q[2]
            macs = bh * tq * tk * (e + ev)
            flag = _named_input(node, causal_arg)
            if causal_arg == "custom_mask_type":
                flag = isinstance(flag, int) and flag > 0
            owner = cls.owner(node)
            flops = cls.attention_flops(owner, macs, flag, tq, tk)
            return Counter({f"attention/{_op_key(node.kind())}": flops})

        return handle

    for k in ("aten::scaled_dot_product_attention",
              "aten::_scaled_dot_product_attention_math",
              "aten::_scaled_dot_product_flash_attention",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_efficient_attention",
              "aten::_scaled_dot_product_cudnn_attention",
              "aten::_scaled_dot_product_fused_attention_overrideable"):
        handles[k] = sdpa("bhtd", "is_causal")
    handles["aten::_flash_attention_forward"] = sdpa("bthd", "is_causal")
    handles["aten::_efficient_attention_forward"] = sdpa("bthd", "custom_mask_type")
    return handles


# ----------------------------------------------------------------------------------------
# Tracing and counting
# ----------------------------------------------------------------------------------------

_PREFIX = "module."


def _flatten_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten_tensors(o)]
    return []


class _Call(nn.Module):
    """Root of the trace: calls the model with the inputs' fixed structure.

    The trace takes a flat tuple of tensors; everything else (``use_cache=False``, ...) is
    held here as a constant. Outputs are flattened to a tuple of tensors, which is all
    the tracer accepts.
    """

    def __init__(self, module: nn.Module, mi: ModelInputs) -> None:
        super().__init__()
        self.module = module
        self._args = list(mi.args)
        self._kwargs = dict(mi.kwargs)
        self.arg_slots = [i for i, a in enumerate(self._args) if isinstance(a, torch.Tensor)]
        self.kw_slots = [k for k, v in self._kwargs.items() if isinstance(v, torch.Tensor)]

    def flat_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._args[i] for i in self.arg_slots) + tuple(self._kwargs[k] for k in self.kw_slots)

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = list(self._args)
        kwargs = dict(self._kwargs)
        it = iter(flat)
        for i in self.arg_slots:
            args[i] = next(it)
        for k in self.kw_slots:
            kwargs[k] = next(it)
        outs = _flatten_tensors(self.module(*args, **kwargs))
        return tuple(outs) if outs else (flat[0],)


def _flop_analysis(root: nn.Module, inputs: tuple):
    from fvcore.nn import FlopCountAnalysis

    class _Analysis(FlopCountAnalysis):
        """Reports every aten op it has no handle for; fvcore by default drops some silently."""

        def _should_ignore_node(self, node: Any) -> bool:
            kind = node.kind()
            if kind.startswith("prim::PythonOp") or kind.startswith("prim::CallFunction"):
                return False
            return kind.startswith("prim::") or _in(kind, _NO_ARITHMETIC)

    fca = _Analysis(root, inputs)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    fca.clear_op_handles()
    return fca


class _OnMeta:
    """Within the block the module's parameters and buffers are meta tensors (ties kept)."""

    def __init__(self, module: nn.Module) -> None:
        from torch.nn.utils.stateless import _reparametrize_module

        memo: dict[int, torch.Tensor] = {}
        state: dict[str, torch.Tensor] = {}
        named = list(module.named_parameters(remove_duplicate=False)) + list(
            module.named_buffers(remove_duplicate=False))
        for name, t in named:
            if id(t) not in memo:
                e = torch.empty_like(t.detach(), device="meta")
                memo[id(t)] = nn.Parameter(e, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else e
            state[name] = memo[id(t)]
        self._ctx = _reparametrize_module(module, state, tie_weights=True)

    def __enter__(self) -> None:
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


@dataclass
class _Counted:
    by_part: dict[str, int]
    by_operator: dict[str, int]
    calls: dict[str, int]
    uncounted: dict[str, int]
    ignored: dict[str, int]


def _trace_count(module: nn.Module, mi: ModelInputs, attention: str, on_meta: bool) -> _Counted:
    root = _Call(module, mi)
    flat = root.flat_inputs()
    if not flat:
        raise ValueError("inputs contain no tensor")
    cls = _Classifier(module, _PREFIX, len(flat), mi.vocab_size, mi.family, attention)
    fca = _flop_analysis(root, flat)
    fca.set_op_handle(**_handles(cls))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if on_meta:
            with _OnMeta(module):
                fca.total()
        else:
            fca.total()
    by_part = {p: 0 for p in PARTS}
    by_op: Counter = Counter()
    for key, v in fca.by_operator().items():
        part, _, op = key.partition("/")
        by_part[part] += int(v)
        by_op[op] += int(v)
    uncounted, ignored = {}, {}
    for kind, n in fca.unsupported_ops().items():
        (ignored if _in(kind, _IGNORED) else uncounted)[kind] = int(n)
    return _Counted(by_part, dict(by_op), dict(cls.calls), uncounted, ignored)


def _describe(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")


def count_flops(
    module: nn.Module,
    *,
    inputs: Any = None,
    batch_size: int = 1,
    seq_len: int = 128,
    attention: str = "full",
    device: torch.device | str | None = None,
    tgt_seq_len: int | None = None,
) -> FlopsResult:
    """Count the FLOPs of one forward pass of ``module`` (see the module docstring).

    ``inputs``: ``None`` to synthesize token ids (:func:`synthesize_inputs`); a tensor, a
    tuple/list (positional) or dict (keyword) of tensors; a :class:`ModelInputs`; or a
    callable ``make_inputs(module, batch_size, seq_len)`` returning one of those. Tensors
    are moved to the device the trace runs on; sizes reported are read from them.

    ``device``:

    * ``None`` (default): trace on the meta device -- the module's parameters are swapped
      for meta tensors for the duration, so nothing is allocated or computed. If the forward
      cannot run on meta (it calls ``.item()``, mixes in a CPU tensor, ...) and the module
      has real weights, trace one example with real tensors on the module's device and
      multiply by ``batch_size`` (FLOPs are linear in the batch).
    * ``"meta"``: the meta trace only.
    * any other device: trace with real tensors there, at the full batch size; the module's
      weights must live there.

    Failures of the model's forward never raise: the result has ``available=False`` and a
    ``reason``. Invalid arguments (an unknown ``attention``, sizes < 1, ``inputs`` of the
    wrong type) raise ``ValueError``/``TypeError``.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if tgt_seq_len is not None and tgt_seq_len < 1:
        raise ValueError(f"tgt_seq_len must be >= 1, got {tgt_seq_len}")

    real_ok = not _has_meta_tensors(module)
    home = _module_device(module)
    if device is None:
        plan = [("meta", torch.device("meta"))]
        if real_ok:
            plan.append(("real-batch-1", home))
    else:
        dev = torch.device(device)
        if dev.type == "meta":
            plan = [("meta", dev)]
        elif not real_ok:
            return FlopsResult(False, reason=f"the module has meta weights; it cannot run on {dev}",
                               attention=attention, batch_size=batch_size, requested_seq_len=seq_len)
        else:
            plan = [("real", dev)]

    failures: list[str] = []
    last_mi: ModelInputs | None = None
    for method, dev in plan:
        b = 1 if method == "real-batch-1" else batch_size
        try:
            if inputs is None:
                mi = synthesize_inputs(module, b, seq_len, tgt_seq_len=tgt_seq_len, device=dev)
            else:
                mi = _coerce_inputs(module, inputs, b, seq_len, dev)
        except TypeError:
            if inputs is not None and not callable(inputs):
                raise
            failures.append(f"inputs: {_describe(sys.exc_info()[1])}")
            break
        except Exception as e:  # noqa: BLE001 - a user's make_inputs or an odd module
            failures.append(f"inputs: {_describe(e)}")
            break
        last_mi = mi
        try:
            counted = _trace_count(module, mi, attention, on_meta=(method == "meta"))
        except Exception as e:  # noqa: BLE001 - the model's forward failed under the trace
            failures.append(f"{method} trace: {_describe(e)}")
            continue

        scale = 1
        notes = list(mi.notes)
        if method == "real-batch-1":
            if inputs is None or callable(inputs):
                scale = batch_size
                notes.append(f"traced one example with real tensors on {dev} and scaled by batch_size")
            else:
                notes.append(f"traced the given inputs with real tensors on {dev}")
        notes.extend(f"fell back after {f}" for f in failures)
        by_part = {k: v * scale for k, v in counted.by_part.items()}
        return FlopsResult(
            available=True,
            attention=attention,
            family=mi.family,
            method=method,
            batch_size=mi.batch_size * scale,
            seq_len=mi.seq_len,
            requested_seq_len=mi.requested_seq_len,
            tgt_seq_len=mi.tgt_seq_len if mi.family == "encoder-decoder" else None,
            forward=sum(by_part.values()),
            by_part=by_part,
            by_operator={k: v * scale for k, v in counted.by_operator.items()},
            attention_calls={"calls": counted.calls.get("calls", 0),
                             "causal": counted.calls.get("causal", 0)},
            uncounted_ops=counted.uncounted,
            ignored_ops=counted.ignored,
            notes=tuple(notes),
        )

    mi = last_mi
    return FlopsResult(
        available=False,
        reason="; ".join(failures) or "nothing to trace",
        attention=attention,
        family=mi.family if mi else None,
        batch_size=batch_size,
        seq_len=mi.seq_len if mi else None,
        requested_seq_len=seq_len,
        tgt_seq_len=mi.tgt_seq_len if mi and mi.family == "encoder-decoder" else None,
        notes=tuple(mi.notes) if mi else (),
    )
