"""The tracing engine: FLOPs of a Transformer forward pass, counted with fvcore.

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
* ``experts``: products inside the routed or shared experts of a mixture-of-experts block
  (transformers' experts modules, ``experts``/``shared_experts``/``shared_expert`` children of a
  block that has routed experts), however they are computed (``bmm`` on gathered weights,
  ``_grouped_mm``, one ``linear`` per expert).
* ``router``: products inside the gate/router beside routed experts (the routing logits).
* ``output_projection``: products with a weight, outside the layers, whose result has the
  vocabulary size as its last dimension -- the logits (``lm_head``), tied or not.
* ``other``: everything else (poolers, classifier heads, an activation product outside
  attention, ...).

A weight is a model parameter or buffer reached from the operand through views, casts,
transposes and splits. A module is an attention module when its attribute name or class
name contains "attn" or "attention" (case-insensitive).
"""

from __future__ import annotations

import gc
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tiecheck.flops.analytic import ATTENTION_MODES
from tiecheck.flops.handles import (
    IGNORED,
    NO_ARITHMETIC,
    Classifier,
    describe_error,
    in_table,
    make_handles,
)
from tiecheck.flops.inputs import (
    ModelInputs,
    coerce_inputs,
    has_meta_tensors,
    media_inputs,
    module_device,
    synthesize_inputs,
    token_layouts,
)
from tiecheck.flops.moe import parameter_counts, traceable_experts
from tiecheck.flops.reasons import fallback_note, needed_inputs, unavailable_reason
from tiecheck.flops.repeats import fold_holds, layer_of, plan_layers, traced_prefix
from tiecheck.flops.result import PARTS, FlopsResult
from tiecheck.flops.standins import ZEROS, OneThread, Swapped, small_for_zeros

with warnings.catch_warnings():
    # importing fvcore.nn scripts a few loss functions, which newer torch deprecates
    warnings.simplefilter("ignore", DeprecationWarning)
    from fvcore.nn import FlopCountAnalysis

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
    class _Analysis(FlopCountAnalysis):
        """Reports every aten op it has no handle for; fvcore by default drops some silently."""

        def _should_ignore_node(self, node: Any) -> bool:
            kind = node.kind()
            if kind.startswith(("prim::PythonOp", "prim::CallFunction")):
                return False
            return kind.startswith("prim::") or in_table(kind, NO_ARITHMETIC)

    fca = _Analysis(root, inputs)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    fca.clear_op_handles()
    return fca


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _traced_on_meta(input: Any, dilation: Any, padding: Any) -> bool:
    return (input.device.type == "meta" and torch._C._get_tracing_state() is not None
            and all(d == 1 for d in (dilation if isinstance(dilation, (tuple, list)) else (dilation,)))
            and not isinstance(padding, str))


class _MetaConv:
    """Within the block ``F.conv1d`` and ``F.conv2d`` on meta under the tracer run as unfold + einsum.

    State-space layers (Mamba, Mamba2, Jamba, Bamba, Falcon-H1, ...) run a short causal depthwise
    convolution, speech encoders a strided one over their audio features (Whisper's second
    convolution has stride 2), vision towers a 2-D one over image patches. Under
    ``torch.jit.trace`` the meta convolution kernel, written in Python, reads sizes as traced
    tensors and fails (``cond must be a bool, but got a Tensor``). The same product written as
    ``unfold`` (a window every ``stride`` positions) + ``einsum`` has the same multiply-adds
    (output channels x output positions x input channels per group x kernel size) and traces on meta.
    """

    def __enter__(self) -> None:
        self._orig = F.conv1d, F.conv2d
        orig1, orig2 = self._orig

        def conv1d(input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                   dilation: Any = 1, groups: Any = 1) -> Any:
            if weight.dim() == 3 and _traced_on_meta(input, dilation, padding):
                pad = int(padding[0] if isinstance(padding, (tuple, list)) else padding)
                step = int(stride[0] if isinstance(stride, (tuple, list)) else stride)
                g = int(groups)
                x = torch.constant_pad_nd(input, [pad, pad]) if pad else input
                # windows every `step` positions: conv1d's output length, floor((L + 2p - k) / step) + 1
                x = x.unfold(2, weight.shape[-1], step)  # (B, C_in, L_out, k)
                if weight.shape[1] == 1 and g == weight.shape[0]:  # depthwise
                    out = torch.einsum("bclk,ck->bcl", x, weight[:, 0, :])
                else:  # grouped: (B, G, C_in/G, L_out, k) x (G, C_out/G, C_in/G, k)
                    b, c_in, length, k = x.shape
                    xg = x.reshape(b, g, c_in // g, length, k)
                    wg = weight.reshape(g, weight.shape[0] // g, weight.shape[1], k)
                    out = torch.einsum("bgclk,gock->bgol", xg, wg).reshape(b, weight.shape[0], length)
                return out + bias[:, None] if bias is not None else out
            return orig1(input, weight, bias, stride, padding, dilation, groups)

        def conv2d(input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                   dilation: Any = 1, groups: Any = 1) -> Any:
            if weight.dim() == 4 and input.dim() == 4 and _traced_on_meta(input, dilation, padding):
                (sh, sw), (ph, pw), g = _pair(stride), _pair(padding), int(groups)
                kh, kw = weight.shape[-2:]
                x = torch.constant_pad_nd(input, [pw, pw, ph, ph]) if ph or pw else input
                x = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C_in, H_out, W_out, kh, kw)
                b, c_in, ho, wo = x.shape[:4]
                xg = x.reshape(b, g, c_in // g, ho, wo, kh, kw)
                wg = weight.reshape(g, weight.shape[0] // g, weight.shape[1], kh, kw)
                out = torch.einsum("bgchwij,gocij->bgohw", xg, wg).reshape(b, weight.shape[0], ho, wo)
                return out + bias[:, None, None] if bias is not None else out
            return orig2(input, weight, bias, stride, padding, dilation, groups)

        F.conv1d, F.conv2d = conv1d, conv2d

    def __exit__(self, *exc: object) -> None:
        F.conv1d, F.conv2d = self._orig


class _ScatterBoolValue:
    """Within the block ``Tensor.scatter``/``scatter_`` with a bool value pass it as an int.

    The TorchScript tracer's alias analysis has no schema for ``scatter`` with a bool scalar
    (``x.scatter(-1, idx, False)``: DeepSeek-V3.2's and GLM-MoE-DSA's sparse-attention masks),
    and fails with an internal assert. ``False``/``True`` written into a tensor are ``0``/``1``.
    """

    _NAMES = ("scatter", "scatter_")

    def __enter__(self) -> None:
        self._orig = {n: getattr(torch.Tensor, n) for n in self._NAMES}
        for n, fn in self._orig.items():
            setattr(torch.Tensor, n, self._wrap(fn))

    @staticmethod
    def _wrap(fn: Any) -> Any:
        def scatter(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if len(args) >= 3 and isinstance(args[2], bool):
                args = (*args[:2], int(args[2]), *args[3:])
            if isinstance(kwargs.get("value"), bool):
                kwargs["value"] = int(kwargs["value"])
            return fn(self, *args, **kwargs)

        return scatter

    def __exit__(self, *exc: object) -> None:
        for n, fn in self._orig.items():
            setattr(torch.Tensor, n, fn)


@dataclass
class _Counted:
    by_part: dict[str, int]
    by_operator: dict[str, int]
    calls: dict[str, int]
    uncounted: dict[str, int]
    ignored: dict[str, int]
    notes: list[str]


def _trace_synthesized(module: nn.Module, mi: ModelInputs, attention: str, method: str,
                       failures: list[tuple[str, BaseException]], synthesized: bool,
                       ) -> tuple[_Counted | None, ModelInputs]:
    """One trace; where synthesized token ids were not what the forward needs (images, audio), again with
    those inputs added (``media_inputs``), and with the ids laid out as the config describes
    (``token_layouts``). Failures are appended to ``failures``: the first, and the last
    retry's."""
    try:
        return _trace_count(module, mi, attention, method), mi
    except Exception as e:  # noqa: BLE001 - the model's forward failed under the trace
        failures.append((method, e))
        wanted = needed_inputs(e, module) if synthesized else []
    last = None
    # The token ids laid out as the config says the model reads them (codebooks, channels, image
    # placeholders), alone and with the inputs the error asked for; then those inputs with plain ids.
    # Layouts first: a Q-Former model also runs with images and no placeholders, but its language
    # model then reads only the text, not the queries its processor puts before it.
    candidates = []
    if synthesized:
        for laid_out in token_layouts(module, mi):
            candidates += [laid_out, *(media_inputs(module, laid_out, wanted) if wanted else ())]
    candidates += media_inputs(module, mi, wanted) if wanted else []
    for candidate in candidates:
        try:
            counted = _trace_count(module, candidate, attention, method)
        except Exception as e:  # noqa: BLE001 - the next shape may be the one it reads
            last = e
            continue
        failures.pop()  # token ids alone were not its inputs: the candidate's note says what was added
        return counted, candidate
    if last is not None and wanted:  # a layout alone failing says nothing the first error does not
        failures.append((f"{method} with {' and '.join(wanted)}", last))
    return None, mi


def _trace_count(module: nn.Module, mi: ModelInputs, attention: str, method: str, fold: bool = True) -> _Counted:
    on_meta = method == "meta"
    root = _Call(module, mi)
    flat = root.flat_inputs()
    if not flat:
        raise ValueError("inputs contain no tensor")
    cls = Classifier(module, _PREFIX, len(flat), mi.vocab_size, mi.family, attention)
    handles = make_handles(cls)
    # On meta, identical layers are traced once and multiplied (see tiecheck.flops.repeats).
    plan = plan_layers(module, cls.layer_names) if on_meta and fold else None
    if plan is not None:
        cls.layer_of = lambda owner: layer_of(owner, plan)
    switched = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the trace makes many short-lived objects; collecting them mid-trace is wasted time
    try:
        with warnings.catch_warnings(), torch.no_grad(), _ScatterBoolValue():
            warnings.simplefilter("ignore")
            if on_meta:
                # fvcore names the modules when it is built: build it on the traced prefix
                with Swapped(module), traceable_experts(module) as switched, traced_prefix(module, plan), \
                        _MetaConv():
                    fca = _flop_analysis(root, flat)
                    fca.set_op_handle(**handles)
                    fca.total()
            elif method == ZEROS:
                # the experts as on meta: their products then do not depend on where zero logits route
                with OneThread(), Swapped(module, "cpu"), traceable_experts(module) as switched:
                    fca = _flop_analysis(root, flat)
                    fca.set_op_handle(**handles)
                    fca.total()
            else:
                fca = _flop_analysis(root, flat)
                fca.set_op_handle(**handles)
                fca.total()
    finally:
        if gc_was_enabled:
            gc.enable()
    if plan is not None and not fold_holds(plan, cls.per_layer, cls.per_layer_calls):
        return _trace_count(module, mi, attention, method, fold=False)  # the layers differ in what they are given
    by_part = {p: 0 for p in PARTS}
    by_op: Counter = Counter()
    totals = Counter({k: int(v) for k, v in fca.by_operator().items()})
    calls = Counter(cls.calls)
    if plan is not None:
        for i in range(plan.keep, plan.n):
            totals.update(cls.per_layer.get(plan.rep[i], Counter()))
            calls.update(cls.per_layer_calls.get(plan.rep[i], Counter()))
    for key, v in totals.items():
        part, _, op = key.partition("/")
        by_part[part] += int(v)
        by_op[op] += int(v)
    unsupported = Counter(fca.unsupported_ops())
    if plan is not None:  # the operators of a layer not traced are those of the layer it is counted as
        for i in range(plan.keep, plan.n):
            unsupported.update(fca.unsupported_ops(f"{_PREFIX}{plan.name}.{plan.rep[i]}"))
    uncounted, ignored = {}, {}
    for kind, n in unsupported.items():
        (ignored if in_table(kind, IGNORED) else uncounted)[kind] = int(n)
    for kind, n in cls.failed.items():
        uncounted[kind] = uncounted.get(kind, 0) + n
    notes = [f"{k} not counted: {why}" for k, why in sorted(cls.failures.items())]
    if switched:
        notes.append("experts traced with transformers' batched_mm implementation: the same products as "
                     "grouped_mm, with shapes fixed by the routing config")
    if plan is not None:
        notes.append(f"identical layers traced once: {plan.name} traced as its first {plan.keep} of {plan.n} "
                     f"layers, each later layer counted as the first traced layer of the same structure")
    return _Counted(by_part, dict(by_op), dict(calls), uncounted, ignored, notes)




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
      for meta tensors for the duration, so nothing is allocated or computed. A small model
      (:func:`small_for_zeros`) with synthesized inputs is first traced once on the CPU with
      zero-filled stand-ins for its tensors, and multiplied by ``batch_size``: the same
      products, without the import of torch's compiler a first meta trace pays. If the forward
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

    real_ok = not has_meta_tensors(module)
    home = module_device(module)
    if device is None:
        small = inputs is None and small_for_zeros(module, max(seq_len, tgt_seq_len or 0))
        plan = [(ZEROS, torch.device("cpu"))] if small else []
        plan.append(("meta", torch.device("meta")))
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

    try:
        params = parameter_counts(module)
    except Exception as e:  # noqa: BLE001 - an odd module's parameters; the count goes on without them
        params = {"unavailable": describe_error(e)}
    failures: list[tuple[str, BaseException]] = []
    last_mi: ModelInputs | None = None
    for method, dev in plan:
        b = 1 if method in ("real-batch-1", ZEROS) else batch_size
        tried = len(failures)
        try:
            if inputs is None:
                mi = synthesize_inputs(module, b, seq_len, tgt_seq_len=tgt_seq_len, device=dev)
            else:
                mi = coerce_inputs(module, inputs, b, seq_len, dev)
        except TypeError as e:
            if inputs is not None and not callable(inputs):
                raise
            failures.append(("inputs", e))
            break
        except Exception as e:  # noqa: BLE001 - a user's make_inputs or an odd module
            failures.append(("inputs", e))
            break
        last_mi = mi
        counted, mi = _trace_synthesized(module, mi, attention, method, failures, synthesized=inputs is None)
        if counted is None:
            if method == ZEROS:  # a shortcut, not a try the user asked for: the meta trace decides
                del failures[tried:]
            continue

        scale = 1
        notes = list(mi.notes) + counted.notes
        if method == ZEROS:
            scale = batch_size
            notes.append("traced one example on the CPU with zero-filled weights (a small model)"
                         + (" and scaled by batch_size" if batch_size > 1 else ""))
        elif method == "real-batch-1":
            if inputs is None or callable(inputs):
                scale = batch_size
                notes.append(f"traced one example with real tensors on {dev} and scaled by batch_size")
            else:
                notes.append(f"traced the given inputs with real tensors on {dev}")
        notes.extend(fallback_note(m, e, module, inputs is None) for m, e in failures)
        by_part = {k: v * scale for k, v in counted.by_part.items()}
        saved = counted.calls.get("window_saved", 0) * scale
        if saved:
            notes.append(f"{counted.calls.get('windowed', 0)} attention products of sliding-window or chunked "
                         f"layers counted over their window; attention_full_matrix is the full-matrix figure")
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
            parameters=params,
            attention_full_matrix=by_part.get("attention", 0) + saved if saved else None,
        )

    mi = last_mi
    return FlopsResult(
        available=False,
        reason=unavailable_reason(failures, module, synthesized=inputs is None),
        errors=tuple(f"{m}: {describe_error(e)}" for m, e in failures),
        attention=attention,
        family=mi.family if mi else None,
        batch_size=batch_size,
        seq_len=mi.seq_len if mi else None,
        requested_seq_len=seq_len,
        tgt_seq_len=mi.tgt_seq_len if mi and mi.family == "encoder-decoder" else None,
        notes=tuple(mi.notes) if mi else (),
        parameters=params,
    )
