"""``torch.export`` archives (``.pt2``, written by ``torch.export.save``), read without running code.

``torch.export.load`` is not safe on an untrusted file: for parts of the archive it falls
back to ``torch.load(weights_only=False)`` (torch/_export/serde/serialize.py, and
torch/export/pt2_archive/_package.py for pickled weights, opaque constants and sample inputs).
So the archive is read here piece by piece, the way the package writer laid it out:
    <root>/archive_format                          "pt2"
    <root>/models/<model>.json                     the serialized program: graph and signature
    <root>/data/weights/<model>_weights_config.json    fqn -> {path_name, use_pickle, tensor_meta}
    <root>/data/weights/weight_<i>                 raw bytes of one storage (aliases share a file)
    <root>/data/constants/<model>_constants_config.json, tensor_<i>, custom_obj_<i>, opaque_obj_<i>
    <root>/data/sample_inputs/<model>.pt           example inputs (a pickle: never read here)

Raw weights are stored uncompressed, so each tensor becomes a view into one memory mapping of
the archive, with the sizes, strides and storage offset of its ``tensor_meta``: names that the
writer stored in one record come back sharing memory, exactly as ``torch.export.load`` would
rebuild them. Pickled entries (tensor subclasses) go through the weights-only unpickler;
anything it refuses needs ``--trust-pickle``. Custom script objects are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tiecheck.errors import TargetError
from tiecheck.facts import Source
from tiecheck.loaders.fileview import FileSpan
from tiecheck.loaders.formats.torchfile import load_payload, pick_state
from tiecheck.loaders.safejson import parse_json
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.tensor_facts import fact_of
from tiecheck.loaders.zipcheck import MAX_INFLATE, ZipArchive

# torch._export.serde.schema.ScalarType -> torch dtype name (the schema is versioned; values are stable).
SCALAR_TYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32",
                8: "float64", 9: "complex32", 10: "complex64", 11: "complex128", 12: "bool", 13: "bfloat16",
                28: "uint16", 29: "float8_e4m3fn", 30: "float8_e5m2", 31: "float8_e4m3fnuz", 32: "float8_e5m2fnuz",
                33: "float8_e8m0fnu", 34: "uint32", 35: "uint64"}

_SPEC_TARGET = {"parameter": "parameter_name", "buffer": "buffer_name", "tensor_constant": "tensor_constant_name",
                "custom_obj": "custom_obj_name"}


class _Archive:
    """The zip's records, located by name under the archive's single root folder (see ``zipcheck``)."""

    def __init__(self, path: Path):
        self.path = path
        self.zip = ZipArchive(path, str(path))
        self.infos = self.zip.infos
        roots = {n.split("/", 1)[0] for n in self.infos if "/" in n}
        if len(roots) != 1:
            self.zip.close()
            raise TargetError(f"{path}: a torch.export archive has one root folder; this zip has {len(roots)}")
        self.root = roots.pop()
        self._storage = None

    def has(self, rel: str) -> bool:
        return f"{self.root}/{rel}" in self.infos

    def names(self, prefix: str) -> list[str]:
        p = f"{self.root}/{prefix}"
        return sorted(n[len(self.root) + 1:] for n in self.infos if n.startswith(p))

    def read(self, rel: str, limit: int | None = None) -> bytes:
        return self.zip.read(f"{self.root}/{rel}", MAX_INFLATE if limit is None else limit)

    def read_json(self, rel: str) -> Any:
        try:
            return parse_json(self.read(rel))
        except ValueError as e:
            raise TargetError(f"{self.path}: {rel} is not valid JSON ({e})") from e

    def data_offset(self, rel: str) -> tuple[int, int] | None:
        """(absolute offset, size) of an uncompressed record's bytes in the archive, else None."""
        return self.zip.span(f"{self.root}/{rel}")

    def storage(self):
        if self._storage is None:
            self._storage = torch.UntypedStorage.from_file(os.fspath(self.path), False, self.path.stat().st_size)
        return self._storage


def _int(v: Any, what: str, path: Path) -> int:
    if isinstance(v, dict):
        v = v.get("as_int")
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise TargetError(f"{path}: {what} is symbolic or malformed ({v!r}); weights need static shapes")


_INT64_MAX = (1 << 63) - 1


def _check_geometry(path: Path, fqn: str, sizes: list[int], strides: list[int], offset: int) -> int:
    """Element count of a tensor_meta, after checking it describes a tensor torch can build.

    Sizes, strides and offset come from the archive's JSON: negative values, or a shape whose
    element count overflows int64 (a petabyte claim), are refused here rather than by torch.
    """
    if len(strides) != len(sizes) or any(n < 0 for n in sizes) or any(st < 0 for st in strides) or offset < 0:
        raise TargetError(f"{path}: tensor {fqn!r} has sizes {sizes}, strides {strides}, storage offset {offset}: "
                          f"negative or mismatched values; the archive is corrupt")
    numel = 1
    for n in sizes:
        numel *= max(n, 1)
    reach = offset + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True) if n)
    if numel * 16 > _INT64_MAX or reach * 16 > _INT64_MAX:
        raise TargetError(f"{path}: tensor {fqn!r} claims sizes {sizes} (strides {strides}): more elements than "
                          f"any file can hold; the archive is corrupt")
    return 0 if 0 in sizes else numel


def _flat(arc: _Archive, rel: str, dtype, cache: dict):
    """One record as a flat tensor of ``dtype`` (a view of the mapped archive when possible)."""

    key = (rel, dtype)
    if key in cache:
        return cache[key]
    loc = arc.data_offset(rel)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if loc is not None:
        start, size = loc
        if size % itemsize:
            raise TargetError(f"{arc.path}: record {rel} holds {size} bytes, not a whole number of {dtype} elements")
        if size == 0:
            flat = torch.empty(0, dtype=dtype)
        elif start % itemsize == 0:
            flat = torch.empty(0, dtype=dtype).set_(arc.storage(), start // itemsize, (size // itemsize,))
        else:
            raw = torch.empty(0, dtype=torch.uint8).set_(arc.storage(), start, (size,))
            flat = raw.clone().view(dtype)
    else:  # compressed by some other zip tool: decompress this record into memory
        data = bytearray(arc.read(rel))
        if len(data) % itemsize:
            raise TargetError(f"{arc.path}: record {rel} holds {len(data)} bytes, not whole {dtype} elements")
        flat = torch.frombuffer(data, dtype=torch.uint8).view(dtype) if data else torch.empty(0, dtype=dtype)
    cache[key] = flat
    return flat


def _payloads(arc: _Archive, config_rel: str, folder: str, prefix: str, trust_pickle: bool,
              notes: list[str]) -> dict[str, Any]:
    """fqn -> tensor for one payload config (weights or constants)."""


    cfg = arc.read_json(config_rel)
    entries = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        raise TargetError(f"{arc.path}: {config_rel} has no 'config' mapping")
    out: dict[str, Any] = {}
    cache: dict = {}
    skipped = []
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise TargetError(f"{arc.path}: {config_rel}: entry {fqn!r} is malformed")
        path_name = meta["path_name"]
        if "/" in path_name or path_name in ("", ".", ".."):
            raise TargetError(f"{arc.path}: {config_rel}: entry {fqn!r} points outside its folder ({path_name!r})")
        rel = f"{folder}{path_name}"
        if path_name.startswith(("custom_obj_", "opaque_obj_")):
            skipped.append(fqn)  # script objects / opaque values: not tensors, and loading them runs code
            continue
        if meta.get("use_pickle"):
            # A stored record's bytes are in the file already: no limit beyond the file's size.
            t = load_payload(arc.read(rel, limit=arc.zip.size), f"{arc.path} (record {rel})",
                             trust_pickle=trust_pickle)
            if not isinstance(t, torch.Tensor):
                raise TargetError(f"{arc.path}: {rel} holds a {type(t).__name__}, not a tensor")
            out[fqn] = t
            continue
        tm = meta.get("tensor_meta")
        if not isinstance(tm, dict) or not isinstance(tm.get("dtype"), int) or tm["dtype"] not in SCALAR_TYPES:
            raise TargetError(f"{arc.path}: {config_rel}: entry {fqn!r} has no readable tensor_meta")
        dtype = getattr(torch, SCALAR_TYPES[tm["dtype"]], None)
        if dtype is None:
            raise TargetError(f"{arc.path}: {fqn!r} has dtype {SCALAR_TYPES[tm['dtype']]}, unknown to this torch")
        if not isinstance(tm.get("sizes", []), list) or not isinstance(tm.get("strides", []), list):
            raise TargetError(f"{arc.path}: {config_rel}: entry {fqn!r} has malformed sizes or strides")
        sizes = [_int(s, f"the size of {fqn!r}", arc.path) for s in tm.get("sizes", [])]
        strides = [_int(s, f"the stride of {fqn!r}", arc.path) for s in tm.get("strides", [])]
        offset = _int(tm.get("storage_offset", {"as_int": 0}), f"the storage offset of {fqn!r}", arc.path)
        numel = _check_geometry(arc.path, fqn, sizes, strides, offset)
        flat = _flat(arc, rel, dtype, cache)
        span = 0 if numel == 0 else 1 + sum((n - 1) * abs(st) for n, st in zip(sizes, strides, strict=True))
        if len(strides) != len(sizes) or offset < 0 or offset + span > flat.numel():
            if flat.numel() == 0 and numel:
                # The writer stores fake tensors as empty records; their values were never saved.
                out[fqn] = torch.empty(sizes, dtype=dtype, device="meta")
                notes.append(f"{fqn}: no data in the archive (saved from a fake tensor)")
                continue
            raise TargetError(f"{arc.path}: tensor {fqn!r} ({sizes}, strides {strides}, offset {offset}) does not "
                              f"fit its record {rel} of {flat.numel()} elements: the archive is corrupt")
        out[fqn] = flat.as_strided(sizes, strides, flat.storage_offset() + offset)
    if skipped:
        notes.append(f"skipped {len(skipped)} custom object constant(s) (e.g. {skipped[0]}): not tensors, and "
                     f"loading them would run code")
    return out


def _placeholders(program: Any) -> list[dict[str, str]]:
    """The graph signature's inputs that read module state: placeholder name, kind, target."""
    out = []
    try:
        specs = program["graph_module"]["signature"]["input_specs"]
    except (KeyError, TypeError):
        return out
    for spec in specs if isinstance(specs, list) else []:
        if not isinstance(spec, dict) or len(spec) != 1:
            continue
        (kind, body), = spec.items()
        if kind not in _SPEC_TARGET or not isinstance(body, dict):
            continue
        arg = body.get("arg") or {}
        name = arg.get("name") if isinstance(arg, dict) else None
        target = body.get(_SPEC_TARGET[kind])
        if isinstance(name, str) and isinstance(target, str):
            out.append({"placeholder": name, "kind": kind, "target": target})
    return out


def load_pt2(path: Path, *, trust_pickle: bool = False) -> Subject:
    arc = _Archive(path)
    try:
        return _load_pt2(arc, path, trust_pickle)
    finally:
        # The tensors live in the archive's own mapping (arc.storage()): the zip's file handle is
        # needed only while the records are read, and an open one is a ResourceWarning in the report.
        arc.zip.close()


def _load_pt2(arc: _Archive, path: Path, trust_pickle: bool) -> Subject:
    fmt = arc.read("archive_format").strip()
    if fmt != b"pt2":
        raise TargetError(f"{path}: archive_format is {fmt[:20]!r}, not a torch.export archive")
    models = [n[len("models/"):-len(".json")] for n in arc.names("models/") if n.endswith(".json")
              and n.count("/") == 1]
    if not models:
        raise TargetError(f"{path}: the archive holds no exported program (no models/*.json); AOTInductor-only "
                          f"packages hold compiled code, not a state dict tiecheck can read")
    notes: list[str] = []
    tensors: dict[str, Any] = {}
    programs = []
    for model in models:
        prefix = "" if len(models) == 1 else f"{model}/"
        state: dict[str, Any] = {}
        for folder, kind in (("data/weights/", "weights"), ("data/constants/", "constants")):
            legacy = f"{folder}{model}.pt"
            config = f"{folder}{model}_{kind}_config.json"
            if arc.has(config):
                state.update(_payloads(arc, config, folder, prefix, trust_pickle, notes))
            elif arc.has(legacy):
                obj = load_payload(arc.read(legacy, limit=arc.zip.size), f"{path} (record {legacy})",
                                   trust_pickle=trust_pickle)
                if isinstance(obj, dict) and obj:
                    state.update(pick_state(obj, None, f"{path} ({legacy})")[0])
                notes.append(f"{model}: legacy archive layout ({legacy})")
            elif kind == "weights":
                raise TargetError(f"{path}: the archive lacks {config}: it is partial or corrupt")
        program = arc.read_json(f"models/{model}.json")
        places = _placeholders(program)
        targets: dict[str, list[str]] = {}
        for p in places:
            targets.setdefault(p["placeholder"], []).append(p["target"])
        many = {k: v for k, v in targets.items() if len(v) > 1}
        unused = [n for n in state if n not in {p["target"] for p in places}]
        programs.append({"model": model, "placeholders": places,
                         "placeholders_with_several_names": many, "state_not_in_signature": unused})
        for k, v in many.items():
            notes.append(f"{prefix}graph input {k} stands for several names: {', '.join(v)}")
        if unused:
            notes.append(f"{prefix}{len(unused)} state entr{'y is' if len(unused) == 1 else 'ies are'} not read by "
                         f"any graph input (e.g. {unused[0]})")
        tensors.update({prefix + k: v for k, v in state.items()})
    if not tensors:
        raise TargetError(f"{path}: the exported program holds no weights or tensor constants")
    spans = _spans(arc, tensors)
    notes.insert(0, f"{len(models)} exported program{'s' if len(models) > 1 else ''} "
                    f"({', '.join(models)}); read without torch.export.load, no code run")
    sub = Subject(tensors=tensors, source=Source(target=str(path), format="torch.export archive", notes=notes),
                  extra={"export": programs}, file_spans=spans)
    _note_shared_placeholders(sub, programs)
    return sub


def _spans(arc: _Archive, tensors: dict[str, Any]) -> dict[str, Any]:
    """Tensors that are views of the archive's mapping (which starts at file offset 0), for pread."""

    if arc._storage is None:
        return {}
    base = arc._storage.data_ptr()
    return {n: FileSpan(os.fspath(arc.path), 0) for n, t in tensors.items()
            if t.device.type == "cpu" and t.untyped_storage().data_ptr() == base}


def _note_shared_placeholders(sub: Subject, programs: list[dict]) -> None:
    """Say which graph inputs receive one memory under several names (a tie the program keeps)."""

    for prog in programs:
        prefix = "" if len(programs) == 1 else f"{prog['model']}/"
        by_identity: dict[tuple, list[str]] = {}
        for p in prog["placeholders"]:
            t = sub.tensors.get(prefix + p["target"])
            if t is None:
                continue
            ident = fact_of(p["target"], t).identity
            if ident[0] == "mem":
                by_identity.setdefault(ident, []).append(p["placeholder"])
        shared = [v for v in by_identity.values() if len(v) > 1]
        prog["placeholders_sharing_memory"] = shared
        for v in shared:
            sub.source.notes.append(f"{prefix}graph inputs {', '.join(v)} are fed the same memory")
