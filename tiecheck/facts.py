"""Per-tensor facts: everything the analyses need, read from torch once.

Analyses never touch torch; they read these records. That keeps them fast, pure and
testable with hand-made facts (see tests/test_analyses.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from tiecheck.loaders.subject import Subject

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


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def fact_of(name: str, t, *, role: str = "tensor", obj_id: int | None = None, owner: str | None = None,
            owner_type: str | None = None, persistent: bool = True) -> TensorFact:
    """Describe one tensor without reading its values."""
    import torch  # noqa: PLC0415 - TensorFact is torch-free so analyses stay torch-free; building facts reads tensors

    shape = tuple(int(n) for n in t.shape)
    try:
        stride = tuple(int(s) for s in t.stride())
    except (RuntimeError, NotImplementedError):  # sparse and other layouts without strides
        stride = ()
    itemsize = t.element_size()
    device = str(t.device)
    storage = None
    start = end = storage_bytes = 0
    if t.device.type != "meta" and t.layout == torch.strided:
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):  # fake / functional tensors
            ptr = 0
        if ptr:
            storage = (device, ptr)
            storage_bytes = st.nbytes()
            start = t.storage_offset() * itemsize
            end = start + span_elements(shape, stride) * itemsize
    if owner is None:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
    return TensorFact(
        name=name,
        shape=shape,
        stride=stride,
        dtype=_dtype_name(t.dtype),
        itemsize=itemsize,
        device=device,
        storage=storage,
        byte_start=start,
        byte_end=end,
        obj_id=obj_id,
        role=role,
        owner=owner,
        owner_type=owner_type,
        requires_grad=bool(getattr(t, "requires_grad", False)),
        is_floating=bool(t.is_floating_point() or t.is_complex()),
        storage_bytes=storage_bytes,
        persistent=persistent,
    )


@dataclass(frozen=True)
class ModuleFact:
    """The few module attributes the lint rules need (e.g. a Linear's declared features)."""

    path: str
    type: str
    attrs: tuple[tuple[str, object], ...] = ()

    def get(self, key: str, default=None):
        return dict(self.attrs).get(key, default)


_MODULE_ATTRS = ("in_features", "out_features", "num_embeddings", "embedding_dim", "padding_idx")


def build_module_facts(module) -> dict[str, ModuleFact]:
    if module is None:
        return {}
    out = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        # Plain attributes live in __dict__; reading them there avoids nn.Module.__getattr__,
        # which is slow on a miss and would dominate on models with thousands of modules.
        own = vars(sub)
        attrs = tuple((a, own[a]) for a in _MODULE_ATTRS if a in own and isinstance(own[a], (int, type(None))))
        out.setdefault(path, ModuleFact(path=path, type=type(sub).__name__, attrs=attrs))
    return out


def tensor_facts(tensors: Mapping) -> list[TensorFact]:
    """Facts of a name -> tensor mapping read from files (role ``"tensor"``): from the mapping's own
    ``facts()`` when it has one (a loader that describes its tensors without making them), else
    one ``fact_of`` per tensor."""
    described = getattr(tensors, "facts", None)
    if callable(described):
        return described()
    return [fact_of(name, t, role="tensor") for name, t in tensors.items()]


def build_facts(subject: Subject, modules: dict[str, ModuleFact] | None = None) -> list[TensorFact]:
    """Facts for every named tensor of a subject, in the subject's order."""
    module = subject.module
    if module is None:
        return tensor_facts(subject.tensors)

    if modules is None:
        modules = build_module_facts(module)
    owners = {path: m.type for path, m in modules.items()}
    param_names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    transient = non_persistent_buffers(module)
    facts = []
    for name, t in subject.tensors.items():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        is_param = name in param_names
        facts.append(
            fact_of(
                name,
                t,
                role="parameter" if is_param else "buffer",
                obj_id=id(t),
                owner=owner,
                owner_type=owners.get(owner),
                persistent=is_param or name not in transient,
            )
        )
    return facts


def non_persistent_buffers(module) -> set[str]:
    """Names of the buffers ``module`` keeps out of its state dict (``persistent=False``), under every path."""
    out = set()
    for path, sub in module.named_modules(remove_duplicate=False):
        # torch's own record of them: what state_dict() leaves out.
        for b in getattr(sub, "_non_persistent_buffers_set", ()):
            out.add(f"{path}.{b}" if path else b)
    return out


def module_tensors(module) -> dict:
    """Every parameter and buffer of a module under every name it is reachable by."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    for name, b in module.named_buffers(remove_duplicate=False):
        tensors.setdefault(name, b)
    return tensors
