"""Memory: parameters and bytes counted once and per name, and what ties save.

A per-name sum (what torchinfo and many scripts report) counts a tied matrix once per name.
Here every byte of memory is counted once: identical extents are one tensor, nested views
add nothing beyond their container, and partial overlaps count their union.

Training cost per trainable element, in bytes (``--optimizer``):

    weight (w) + gradient (w) + optimizer state + fp32 master copy for 16-bit weights
    adamw: two moments; sgd: one momentum buffer; none: no state and no master copy

States are fp32 when the weights are 16-bit (mixed precision), else the weight's dtype:
fp32 AdamW is 4 + 4 + 8 = 16 bytes, bf16 AdamW 2 + 2 + 4 + 8 = 16 bytes.

A tie saves the whole per-element cost only when the names are one Parameter object.
Distinct Parameter objects over one memory share the weight bytes but each gets its own
gradient and optimizer state, so they save the weight bytes alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from tiecheck.analyses.ties import IdentityIndex, TieGroup, group_by_identity
from tiecheck.facts import TensorFact
from tiecheck.findings import Finding, SeverityCounts, finding

OPTIMIZERS = ("adamw", "sgd", "none")
_STATES = {"adamw": 2, "sgd": 1, "none": 0}


@dataclass(frozen=True)
class DtypeBytes:
    """Parameters and bytes of one dtype, counted once and per name (a ``summary.by_dtype`` row)."""

    dtype: str
    params_unique: int = 0
    params_counted: int = 0
    bytes_unique: int = 0
    bytes_counted: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DtypeBytes:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class Summary:
    """A report's ``summary``: the figures of this memory analysis, then the counts ``inspect`` adds from the
    other analyses (the bytes duplicates, transposed copies, packed heads and unreachable storage take,
    the findings by severity). A report of an older schema read back has the figures it lacked at 0."""

    params_unique: int = 0
    params_counted: int = 0
    params_saved: int = 0
    bytes_unique: int = 0
    bytes_counted: int = 0
    bytes_saved: int = 0
    bytes_nested_views: int = 0
    tie_groups: int = 0
    tied_names: int = 0
    optimizer: str = "adamw"
    training_bytes: int = 0
    training_bytes_counted: int = 0
    training_bytes_saved: int = 0
    training_bytes_nested_views: int = 0
    by_dtype: tuple[DtypeBytes, ...] = ()
    bytes_wasted_by_duplicates: int = 0
    bytes_wasted_by_transposed_copies: int = 0
    bytes_in_packed_head_copies: int = 0
    bytes_unreachable: int = 0
    findings: SeverityCounts = field(default_factory=SeverityCounts)
    findings_ignored: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["by_dtype"] = [row.to_dict() for row in self.by_dtype]
        d["findings"] = self.findings.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Summary:
        known = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        # Schema 1 had no params_saved: what a per-name sum counts beyond the parameters counted once.
        known.setdefault("params_saved", d.get("params_counted", 0) - d.get("params_unique", 0))
        known["by_dtype"] = tuple(DtypeBytes.from_dict(row) for row in d.get("by_dtype", ()))
        known["findings"] = SeverityCounts.from_dict(d.get("findings") or {})
        return cls(**known)


@dataclass(frozen=True)
class Unreachable:
    """One storage whose stored bytes no listed name fully reaches (a view saved alone keeps its whole storage)."""

    names: tuple[str, ...]
    storage_bytes: int
    reachable_bytes: int

    @property
    def unreachable_bytes(self) -> int:
        return self.storage_bytes - self.reachable_bytes


def training_bytes_per_element(itemsize: int, optimizer: str = "adamw") -> int:
    if optimizer not in _STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    mixed = itemsize < 4 and optimizer != "none"
    state_size = 4 if mixed else itemsize
    return itemsize + itemsize + _STATES[optimizer] * state_size + (4 if mixed else 0)


def is_trainable(f: TensorFact) -> bool:
    """Live modules say so; in a file, floating-point tensors are taken to be parameters."""
    if f.role == "parameter":
        return f.requires_grad
    if f.role == "buffer":
        return False
    return f.is_floating


def _restrict(by_identity: IdentityIndex, keep: Callable[[TensorFact], bool]) -> IdentityIndex:
    """The index of the facts ``keep`` accepts, without grouping them again."""
    out: IdentityIndex = {}
    dropped = False
    for identity, members in by_identity.items():
        if len(members) == 1:  # most memories have one name: no list to build
            if keep(members[0]):
                out[identity] = members
            else:
                dropped = True
            continue
        kept = [m for m in members if keep(m)]
        dropped = dropped or len(kept) != len(members)
        if kept:
            out[identity] = kept
    # The same index object when nothing was dropped, so callers can reuse what they derived from it.
    return out if dropped else by_identity


def _not_buffer(f: TensorFact) -> bool:
    return f.role != "buffer"


def _start_longest_first(f: TensorFact) -> tuple[int, int]:
    return f.byte_start, -f.byte_end


def _sorted_extents(by_identity: IdentityIndex) -> dict:
    """storage -> the first fact of each of its identities, by start, longest first: every
    container comes before what it contains."""
    by_storage: dict = defaultdict(list)
    for members in by_identity.values():
        f = members[0]
        if f.storage is not None:  # indexed facts are never empty: a storage means an extent
            by_storage[f.storage].append(f)
    for extents in by_storage.values():
        extents.sort(key=_start_longest_first)
    return by_storage


def nested_identities(facts: Sequence[TensorFact], by_identity: IdentityIndex | None = None,
                      extents_by_storage: dict | None = None) -> set[tuple]:
    """Identities of extents lying wholly inside another, dense, extent of the same storage.

    Their bytes are already counted with their container (a flat buffer and its views, a
    fused QKV weight and its slices), whatever their own strides. ``extents_by_storage``:
    ``_sorted_extents(by_identity)``, when the caller already sorted them.
    """
    if extents_by_storage is None:
        extents_by_storage = _sorted_extents(by_identity if by_identity is not None else group_by_identity(facts))
    nested = set()
    for extents in extents_by_storage.values():
        reach = -1  # furthest end of a dense extent seen so far
        for f in extents:
            if f.byte_end <= reach:
                nested.add(f.identity)
            elif f.byte_end - f.byte_start == f.numel * f.itemsize:  # dense
                reach = f.byte_end
    return nested


def _unique_bytes(by_identity: IdentityIndex, nested: set[tuple],
                  extents_by_storage: dict | None = None) -> dict[str, int]:
    """Bytes of distinct memory per dtype (dtype of the tensor that starts each merged range).
    ``extents_by_storage``: ``_sorted_extents(by_identity)``, when the caller already sorted them."""
    out: dict[str, int] = defaultdict(int)
    by_storage: dict = defaultdict(list)
    for members in by_identity.values():
        f = members[0]
        if f.storage is not None and extents_by_storage is not None:
            continue  # merged below, from the extents already sorted
        if f.identity in nested:
            continue  # counted with its container
        nbytes = f.numel * f.itemsize
        if f.storage is None or f.byte_end - f.byte_start != nbytes:
            out[f.dtype] += nbytes  # no memory to merge (meta), or a strided view: count its elements
        else:
            by_storage[f.storage].append(f)
    if extents_by_storage is None:
        for extents in by_storage.values():
            extents.sort(key=_start_longest_first)
    else:
        by_storage = {}
        for key, extents in extents_by_storage.items():
            dense = []
            for f in extents:
                if f.identity in nested:
                    continue
                nbytes = f.numel * f.itemsize
                if f.byte_end - f.byte_start != nbytes:
                    out[f.dtype] += nbytes  # a strided view: count its elements
                else:
                    dense.append(f)
            by_storage[key] = dense
    for extents in by_storage.values():
        cur, end = None, -1
        for f in extents:
            if cur is None or f.byte_start >= end:
                cur, end = f, f.byte_end
                out[f.dtype] += f.byte_end - f.byte_start
            elif f.byte_end > end:
                out[cur.dtype] += f.byte_end - end
                end = f.byte_end
    return dict(out)


def memory_summary(facts: Sequence[TensorFact], groups: Sequence[TieGroup], optimizer: str = "adamw",
                   by_identity: IdentityIndex | None = None) -> Summary:
    """Parameters, bytes and training bytes, counted once and per name.

    Args:
        facts: the facts of one subject.
        groups: its tie groups.
        optimizer: one of OPTIMIZERS.
        by_identity: ``group_by_identity(facts)``, when the caller already built it.

    Returns:
        The report's ``summary``, its counts from the other analyses left at 0.
    """
    if by_identity is None:
        by_identity = group_by_identity(facts)
    itemsize_of = {f.dtype: f.itemsize for f in facts}
    counted_bytes: dict[str, int] = defaultdict(int)
    counted_params: dict[str, int] = defaultdict(int)
    # Parameters exclude a live module's buffers (RoPE tables, BatchNorm statistics); bytes
    # include them. Files do not say which tensors were buffers, so there every tensor counts.
    buffers = False
    all_trainable = True  # then the trainable index is the whole index: no pass to restrict it
    for f in facts:
        counted_bytes[f.dtype] += f.numel * f.itemsize
        if f.role != "buffer":
            counted_params[f.dtype] += f.numel
        else:
            buffers = True
        if all_trainable and not (f.is_floating if f.role == "tensor" else is_trainable(f)):
            all_trainable = False
    params = _restrict(by_identity, _not_buffer) if buffers else by_identity
    extents = _sorted_extents(by_identity)  # sorted once for both passes below
    nested_all = nested_identities(facts, by_identity, extents)
    unique_bytes = _unique_bytes(by_identity, nested_all, extents)
    # A file has no buffers: then the parameters are every tensor and nothing is recomputed.
    if params is by_identity:
        unique_param_bytes = unique_bytes
    else:
        unique_param_bytes = _unique_bytes(params, nested_identities(facts, params))
    unique_params = {d: b // itemsize_of[d] for d, b in unique_param_bytes.items()}

    # Training: each trainable memory once, unless distinct Parameters split its gradients.
    # In a file, a view inside another tensor is part of it (one parameter, one gradient); live
    # Parameters that are views each get their own gradient, so they count.
    train_unique = 0
    train_counted = 0
    train_nested = 0  # per-name training bytes of views inside a container: not tie savings
    per_element: dict[int, int] = {}  # itemsize -> training bytes per element
    trainable_index = by_identity if all_trainable else _restrict(by_identity, is_trainable)
    in_container = nested_all if trainable_index is by_identity else nested_identities(facts, trainable_index)
    for identity, members in by_identity.items():
        trainable = members if all_trainable or (len(members) == 1 and is_trainable(members[0])) else \
            [m for m in members if is_trainable(m)]
        if not trainable:
            continue
        f = trainable[0]
        per = per_element.get(f.itemsize)
        if per is None:
            per = per_element[f.itemsize] = training_bytes_per_element(f.itemsize, optimizer)
        if identity in in_container and all(m.obj_id is None for m in trainable):
            train_counted += len(trainable) * f.numel * per
            train_nested += len(trainable) * f.numel * per
            continue
        objects = 1 if len(trainable) == 1 else len({m.obj_id for m in trainable if m.obj_id is not None}) or 1
        train_counted += len(trainable) * f.numel * per
        train_unique += f.numel * f.itemsize + objects * f.numel * (per - f.itemsize)

    total_counted = sum(counted_bytes.values())
    total_unique = sum(unique_bytes.values())
    dtypes = sorted(set(counted_bytes) | set(unique_bytes))
    # Ties only: names that are one memory. What else a per-name sum counts twice is views nested
    # in (or overlapping) another listed tensor, a figure of its own.
    tie_bytes = sum(g.bytes_saved for g in groups)
    return Summary(
        params_unique=sum(unique_params.values()),
        params_counted=sum(counted_params.values()),
        params_saved=sum((len(g.names) - 1) * g.numel for g in groups),
        bytes_unique=total_unique,
        bytes_counted=total_counted,
        bytes_saved=tie_bytes,
        bytes_nested_views=max(0, total_counted - total_unique - tie_bytes),
        tie_groups=len(groups),
        tied_names=sum(len(g.names) for g in groups),
        optimizer=optimizer,
        training_bytes=train_unique,
        training_bytes_counted=train_counted,
        training_bytes_saved=train_counted - train_unique - train_nested,
        training_bytes_nested_views=train_nested,
        by_dtype=tuple(DtypeBytes(d, params_unique=unique_params.get(d, 0), params_counted=counted_params.get(d, 0),
                                  bytes_unique=unique_bytes.get(d, 0), bytes_counted=counted_bytes.get(d, 0))
                       for d in dtypes),
    )


def unreachable_bytes(facts: Sequence[TensorFact], skip: set[str] = frozenset()) -> list[Unreachable]:
    """Per storage, the bytes no listed tensor reaches (a view saved alone keeps its whole storage).

    ``skip`` names tensors whose storage is not what is stored (a mapping of a whole file).
    Returns one entry per storage with unreachable bytes, largest first.
    """
    by_storage: dict = defaultdict(list)
    for f in facts:
        # storage_bytes first: most facts of a mapped file have none, and are skipped at once
        if f.storage_bytes and f.name not in skip and f.extent is not None:
            by_storage[f.storage].append(f)
    out = []
    for members in by_storage.values():
        size = members[0].storage_bytes
        covered, end = 0, -1
        for f in sorted(members, key=lambda f: (f.byte_start, -f.byte_end)):
            start = max(f.byte_start, end)
            if f.byte_end > start:
                covered += f.byte_end - start
                end = f.byte_end
        if size > covered:
            out.append(Unreachable(tuple(sorted({f.name for f in members})), size, covered))
    return sorted(out, key=lambda u: (-u.unreachable_bytes, u.names))


# A view saved alone is reported when its storage's unreachable bytes pass both bars.
UNREACHABLE_MIN_BYTES = 4096


def unreachable_findings(entries: Sequence[Unreachable]) -> list[Finding]:
    """TC021 for each storage whose unreachable bytes pass ``UNREACHABLE_MIN_BYTES`` and outweigh the reachable ones."""
    out = []
    for u in entries:
        if u.unreachable_bytes >= UNREACHABLE_MIN_BYTES and u.unreachable_bytes > u.reachable_bytes:
            one = len(u.names) == 1
            out.append(finding("TC021", f"{', '.join(u.names[:3])} reach{'es' if one else ''} {u.reachable_bytes:,} "
                                        f"of the {u.storage_bytes:,} bytes stored for {'its' if one else 'their'} "
                                        f"storage: {u.unreachable_bytes:,} bytes on disk no name reaches",
                               u.names, bytes=u.unreachable_bytes))
    return out
