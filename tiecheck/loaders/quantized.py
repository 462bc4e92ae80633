"""How quantized and packed tensors are stored: their logical shape, format and companions.

Read from each format's own record, never by dequantizing:

* bitsandbytes 4-bit (nf4/fp4): ``W.weight`` is packed uint8 ``[n/2, 1]``; ``W.weight.quant_state.
  bitsandbytes__nf4`` is a uint8 tensor holding JSON (``QuantState.as_dict(packed=True)``) with the
  logical ``shape``; ``W.weight.absmax``, ``quant_map`` and ``nested_*`` are its companions;
* bitsandbytes LLM.int8: ``W.weight`` int8 of the logical shape with ``W.SCB`` (row scales) and
  ``W.weight_format``;
* fp8 and other narrow dtypes: the logical shape is stored, with ``W.weight_scale`` /
  ``W.weight_scale_inv`` / ``W.input_scale`` companions where present;
* GGUF: the loader's tensor types (``token_embd.weight`` is the embedding, ``output.weight`` the head).
"""

from __future__ import annotations

from collections.abc import Sequence

from tiecheck.facts import Packing, TensorFact
from tiecheck.loaders.safejson import parse_json
from tiecheck.loaders.subject import Subject

QUANT_STATE = ".quant_state.bitsandbytes__"
MAX_QUANT_STATE_BYTES = 1 << 16  # the JSON is ~100 bytes; anything far larger is not a quant state
_SCALES = ("_scale", "_scale_inv")
_WIDE = {"float32", "float16", "bfloat16", "float64"}


def packings(subject: Subject, facts: Sequence[TensorFact] | None = None) -> dict[str, Packing]:
    """name -> Packing for the subject's tensors whose stored form is not their logical one.

    Args:
        subject: what the loader read.
        facts: the subject's facts, when built: dtypes and shapes are read from them instead of
            from the tensors (a memory-mapped file makes each tensor object on access).

    Returns:
        The packed tensors by name; a tensor not listed is its own dtype and shape.
    """
    out: dict[str, Packing] = {}
    gguf = subject.extra.get("gguf") if isinstance(subject.extra.get("gguf"), dict) else None
    if gguf:
        roles = {"token_embd.weight": "embedding", "output.weight": "head"}
        for name, t in gguf.get("tensor_types", {}).items():
            if name in roles:
                out[name] = Packing(shape=tuple(t["shape"]), format=f"{t['type']} (GGUF)", role=roles[name])
        return out
    # The mapping itself answers ``in``: a set of a million names would cost a tenth of a second to
    # build for the handful of lookups the few packed tensors make.
    names = subject.tensors
    # Sorted after the filter: a checkpoint of a million names holds a handful of these.
    for name in sorted(n for n in names if QUANT_STATE in n or n.endswith(".SCB")):
        if QUANT_STATE in name:
            base, _, kind = name.partition(QUANT_STATE)
            shape = _quant_state_shape(subject.tensors[name])
            if base in names and shape is not None:
                comp = tuple(sorted(n for n in names if n.startswith(base + ".")))
                out[base] = Packing(shape=shape, format=f"{kind} (bitsandbytes 4-bit)", companions=comp)
        elif name.endswith(".SCB"):
            weight = name[:-len("SCB")] + "weight"
            t = subject.tensors.get(weight)
            if t is not None and str(t.dtype) == "torch.int8":
                comp = tuple(n for n in (name, weight + "_format") if n in names)
                out[weight] = Packing(shape=tuple(t.shape), format="int8 (bitsandbytes LLM.int8)", companions=comp)
    if facts is None:
        layouts = ((n, str(t.dtype).replace("torch.", ""), tuple(t.shape)) for n, t in subject.tensors.items())
    else:
        # Narrow dtypes first, in one comprehension: most tensors are of a wide dtype, and no packed one is.
        layouts = [(f.name, f.dtype, f.shape) for f in facts if f.dtype not in _WIDE]
    for name, dtype, shape in layouts:
        if dtype in _WIDE or len(shape) != 2 or name in out or not name.endswith(".weight"):
            continue
        comp = [name + s for s in _SCALES if name + s in names]
        comp += [n for n in (name[:-len("weight")] + "input_scale",) if n in names]
        if comp:
            out[name] = Packing(shape=tuple(shape), format=f"{dtype} with scales", companions=tuple(comp))
    return out


def _quant_state_shape(t) -> tuple[int, ...] | None:
    """The logical shape a bitsandbytes packed quant state records, or None when it is not one."""
    if t.dim() != 1 or t.numel() > MAX_QUANT_STATE_BYTES or str(t.dtype) != "torch.uint8" or t.device.type == "meta":
        return None
    try:
        state = parse_json(bytes(t.contiguous().numpy().tobytes()))
    except ValueError:
        return None
    shape = state.get("shape") if isinstance(state, dict) else None
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return tuple(shape)
