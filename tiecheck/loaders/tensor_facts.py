"""TensorFacts read from torch: a module's parameters and buffers, a state dict's tensors.

Every loader's subject is described here (or by its tensor mapping's own ``facts()``, where a format
reader describes its tensors from the file's records without making them). Nothing reads a tensor's
values: a fact is where the bytes live, not what they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from tiecheck.facts import ModuleFact, TensorFact, span_elements

if TYPE_CHECKING:  # pragma: no cover
    from tiecheck.loaders.subject import Subject


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def fact_of(name: str, t, *, role: str = "tensor", obj_id: int | None = None, owner: str | None = None,
            owner_type: str | None = None, persistent: bool = True) -> TensorFact:
    """Describe one tensor without reading its values."""
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
