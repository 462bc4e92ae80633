"""The records the loaders hand to the analyses: one TensorFact per name, and what a name says of itself.

Analyses never touch torch; they read these records. That keeps them fast, pure and testable with
hand-made facts (see tests/test_analyses.py). The loaders describe tensors
(``loaders/tensor_facts.py`` reads them from torch, a format reader from its file's header) and the
analyses read the descriptions; this module imports neither, nor torch.

Beside ``TensorFact``: ``ModuleFact`` (a module's declared features), ``Packing`` (how a quantized
tensor is stored), ``Source`` (where the tensors came from), the role a tensor's name and owner give it (input embedding, output
projection) and the Python path that reaches a name from the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Key that identifies one allocation: (device, address of the storage's first byte).
StorageKey = tuple[str, int]


@dataclass(slots=True, unsafe_hash=True)
class TensorFact:
    """One named tensor, described by where its bytes live rather than by its values.

    Slotted, with ``numel`` and ``identity`` computed once at construction: a checkpoint of
    100,000 tensors holds 100,000 facts, a per-instance ``__dict__`` would double their memory,
    and the analyses read those two values millions of times. Treat a fact as immutable (it is
    hashed by value); it is not a frozen dataclass because frozen construction sets each of its
    20 fields through ``object.__setattr__``, which made building 100,000 facts take four times
    as long. Use ``dataclasses.replace`` for a changed copy.
    """

    name: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str  # e.g. "float32", "bfloat16"
    itemsize: int
    device: str  # e.g. "cpu", "cuda:0", "meta"
    # Storage identity; None where there is no real memory (meta device, fake tensors).
    storage: StorageKey | None = None
    # Byte extent inside the storage: [byte_start, byte_end) covers every element.
    byte_start: int = 0
    byte_end: int = 0
    # Identity of the Parameter or buffer object (id()), when a live module is analysed.
    obj_id: int | None = None
    role: str = "tensor"  # "parameter" | "buffer" | "tensor" (from a state dict)
    owner: str = ""  # module path owning it ("" for the root)
    owner_type: str | None = None  # class name of the owning module, when known
    requires_grad: bool = False
    is_floating: bool = True
    # Bytes of the whole storage the tensor views (a torch.save file writes all of them).
    storage_bytes: int = 0
    # False for a module's non-persistent buffer (``register_buffer(..., persistent=False)``): never in a
    # state dict, so never stored, never a tie candidate, never a broken tie (e.g. RoPE's inv_freq).
    persistent: bool = True
    numel: int = field(init=False, repr=False, compare=False)
    # What makes two names 'the same memory': the extent, else the Parameter object, else the name.
    identity: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        numel = self.numel = math.prod(self.shape)
        if self.storage is not None and numel:
            self.identity = ("mem", self.storage, self.byte_start, self.byte_end)
        elif self.obj_id is not None:
            self.identity = ("object", self.obj_id)
        else:
            self.identity = ("name", self.name)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def attr(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def dense(self) -> bool:
        """True when the elements fill their extent with no gaps (any dimension order)."""
        return self.byte_end - self.byte_start == self.nbytes

    @property
    def extent(self) -> tuple[StorageKey, int, int] | None:
        if self.storage is None or self.numel == 0:
            return None
        return (self.storage, self.byte_start, self.byte_end)


def span_elements(shape: Iterable[int], stride: Iterable[int]) -> int:
    """Number of storage elements between a view's first and last element, inclusive."""
    shape = tuple(shape)
    if math.prod(shape) == 0:
        return 0
    return 1 + sum((n - 1) * abs(s) for n, s in zip(shape, stride, strict=True))


@dataclass(frozen=True)
class ModuleFact:
    """The few module attributes the lint rules need (e.g. a Linear's declared features)."""

    path: str
    type: str
    attrs: tuple[tuple[str, object], ...] = ()

    def get(self, key: str, default=None):
        return dict(self.attrs).get(key, default)


@dataclass(frozen=True)
class Packing:
    """How a tensor is stored when its stored shape or dtype is not its logical one."""

    shape: tuple[int, ...]  # the logical shape (e.g. [vocab, hidden]) whatever the stored one
    format: str  # e.g. "nf4 (bitsandbytes 4-bit)", "Q8_0 (GGUF)", "int8 (bitsandbytes LLM.int8)"
    companions: tuple[str, ...] = ()  # names stored with it that only it needs (scales, quant state)
    role: str | None = None  # "embedding" or "head" where the format names the role (GGUF)

@dataclass(frozen=True)
class Source:
    """Where a subject came from: the report's ``source``.

    Frozen like the rest of a report; ``notes`` is the one list a loader still adds to while it reads
    (a note on the folder a file belongs to, a warning the file raised).
    """

    target: str
    format: str
    key: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "format": self.format, "key": self.key, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Source:
        return cls(target=d["target"], format=d["format"], key=d.get("key"), notes=list(d.get("notes", ())))


def attr_path(name: str, var: str = "model") -> str:
    """The Python expression that reaches a dotted name from ``var``: ``model.transformer.h[0].weight``
    for ``transformer.h.0.weight`` (``var`` alone for the root's empty path)."""
    out = var
    for part in name.split(".") if name else ():
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


_EMBEDDING_HINT = re.compile(r"emb|wte|shared|word", re.I)


def assignment(names: Iterable[str]) -> str:
    """The line that re-ties the names: every name assigned the embedding's Parameter."""
    names = sorted(names)
    source = next((n for n in names if _EMBEDDING_HINT.search(n)), names[0])
    return "; ".join(f"{attr_path(n)} = {attr_path(source)}" for n in names if n != source)


# -- roles: what a name and its owning module say a tensor is ----------------------------------

# Conventional names; transformers' own among them (CTRL's transformer.w, GPT's tokens_embed, XLNet's
# word_embedding and lm_loss, DistilBERT's vocab_projector, ELECTRA's generator_lm_head, XLM's
# pred_layer.proj, T5Gemma's lm_head.out_proj): a bare state dict has nothing but its names.
_EMBED_NAME = re.compile(
    r"(^|\.)(wte|tok_embeddings|tok_emb|embed_tokens|word_embeddings|embed_in|shared|embedding|embeddings|"
    r"src_embed|tgt_embed|src_emb|tgt_emb|encoder_embed|decoder_embed|token_embedding|input_embedding|"
    r"tokens_embed|word_embedding|transformer\.w)"
    r"(\.weight)?$")
_HEAD_NAME = re.compile(
    r"(^|\.)(lm_head|head|output|output_projection|out|generator|decoder|embed_out|proj_out|logits|"
    r"pre_softmax|output_layer|generator_lm_head|vocab_projector|lm_loss|pred_layer\.proj|lm_head\.out_proj)"
    r"\.weight$")
_NOT_TOKEN_EMBED = re.compile(r"(pos|position|wpe|token_type|segment|type_emb|rel|bucket)", re.I)


def _alternatives(pattern: re.Pattern) -> dict[str, tuple[str, ...]]:
    """The names a role pattern's alternatives spell (``pred_layer\\.proj``: ``pred_layer.proj``), by their last part."""
    found = re.search(r"\(\^\|\\\.\)\((.*?)\)(\(\\\.weight\)\?|\\\.weight)\$", pattern.pattern)
    assert found is not None, pattern.pattern
    out: dict[str, tuple[str, ...]] = {}
    for alt in found.group(1).replace("\\.", ".").split("|"):
        out[alt.rsplit(".", 1)[-1]] = (*out.get(alt.rsplit(".", 1)[-1], ()), alt)
    return out


# A ``*.weight`` name matches a role pattern only where the module path before ``.weight`` ends with
# one of its alternatives: a dict lookup and a suffix test turn most names away before the pattern is
# searched (a million expert weights).
_EMBED_ALTS = _alternatives(_EMBED_NAME)
_HEAD_ALTS = _alternatives(_HEAD_NAME)


def _may_spell(name: str, alternatives: dict[str, tuple[str, ...]]) -> bool:
    """False when ``name`` (a ``*.weight``) cannot match the pattern ``alternatives`` come from."""
    path = name[:-7]
    alts = alternatives.get(path.rsplit(".", 1)[-1])
    return alts is not None and any(path == a or path.endswith("." + a) for a in alts)


_ROLE_ALTS = {part: _EMBED_ALTS.get(part, ()) + _HEAD_ALTS.get(part, ()) for part in {*_EMBED_ALTS, *_HEAD_ALTS}}
# ``_may_spell(name, _ROLE_ALTS)`` as one C call: the name is an alternative's ``.weight``, or ends with one
# after a dot (a million expert weights are asked, none of which has a role).
_ROLE_WEIGHTS = frozenset(f"{a}.weight" for alts in _ROLE_ALTS.values() for a in alts)
_ROLE_ENDINGS = tuple(sorted(f".{a}.weight" for alts in _ROLE_ALTS.values() for a in alts))


def may_have_role(f: TensorFact) -> bool:
    """False when neither :func:`is_embedding` nor :func:`is_output_projection` can hold for ``f``: a
    2-D tensor of an ``Embedding``, or a ``*.weight`` whose module path one of the role patterns'
    alternatives ends. One check, where the two cost several calls each: the analyses ask it of
    every tensor before asking the two (a file of a million expert weights has no role)."""
    if len(f.shape) != 2:
        return False
    name = f.name
    return f.owner_type == "Embedding" or name.endswith(_ROLE_ENDINGS) or name in _ROLE_WEIGHTS


def is_embedding(f: TensorFact) -> bool:
    if len(f.shape) != 2 or f.attr != "weight":
        return False
    if f.owner_type != "Embedding" and not _may_spell(f.name, _EMBED_ALTS):
        return False  # neither the module type nor the name can make it one
    if _NOT_TOKEN_EMBED.search(f.owner.rsplit(".", 1)[-1] or ""):
        return False
    if f.owner_type is not None:
        return f.owner_type == "Embedding" or bool(_EMBED_NAME.search(f.name) and "Embedding" in f.owner_type)
    return bool(_EMBED_NAME.search(f.name))


def is_output_projection(f: TensorFact) -> bool:
    if len(f.shape) != 2 or not f.name.endswith(".weight") or not _may_spell(f.name, _HEAD_ALTS) \
            or not _HEAD_NAME.search(f.name):
        return False
    return f.owner_type is None or f.owner_type == "Linear" or "Linear" in f.owner_type
