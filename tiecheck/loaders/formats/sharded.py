"""Sharded checkpoints: a ``*.index.json`` weights index and the shards it names, safetensors or torch.save.

Every shard is read by its own format's reader (headers only for safetensors), and its tensors
are put behind one name -> tensor view; the index's own ``metadata`` (an alias map, as
``huggingface_hub.save_torch_state_dict`` writes it) declares ties across shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tiecheck.errors import TargetError
from tiecheck.facts import Source
from tiecheck.findings import finding
from tiecheck.loaders.declared import alias_declarations, alias_map
from tiecheck.loaders.detect import (
    SAFETENSORS,
    TORCH_SAVE,
    TORCH_SAVE_LEGACY,
    read_weights_index,
    sniff_file,
)
from tiecheck.loaders.fileview import file_spans
from tiecheck.loaders.formats.archive_tensors import ArchiveTensors
from tiecheck.loaders.formats.safetensors_files import MappedTensors, file_summary, map_tensors, read_header
from tiecheck.loaders.formats.torchfile import pick_state, read_records, torch_load
from tiecheck.loaders.subject import Subject


class ShardedTensors(Mapping):
    """Every tensor of a sharded checkpoint: each shard's :class:`MappedTensors` (or, for torch.save
    shards, ``archive_tensors.ArchiveTensors``) behind one mapping.

    Copying every shard's tensors into one dict would make a tensor view per name (1.2 s at
    90,000 names) and lose ``facts()``, so every fact would then be read back from its view
    (``fact_of``, 4 s more). Here a name only records which shard holds it; ``facts()`` joins the
    shards' header-made facts and ``file_layout`` asks the shard, as for a single file.
    """

    def __init__(self, shards: list[MappedTensors | ArchiveTensors]):
        self._shards = shards
        self._where: dict[str, MappedTensors | ArchiveTensors] = {}
        for part in shards:
            self._where.update(dict.fromkeys(part, part))
        self._aliases: dict[str, str] = {}

    def add_alias(self, name: str, stored: str) -> None:
        """``name`` is one tensor with the stored ``stored`` (a tie an alias map restores)."""
        self._aliases[name] = stored

    def __getitem__(self, name: str):
        name = self._aliases.get(name, name)
        return self._where[name][name]  # KeyError for an unknown name, as a dict

    def __iter__(self):
        yield from self._where
        yield from self._aliases

    def __len__(self) -> int:
        return len(self._where) + len(self._aliases)

    def __contains__(self, name: object) -> bool:
        return name in self._where or name in self._aliases

    def file_layout(self, name: str) -> tuple[int, int, int]:
        """(offset in its shard's mapping, nbytes, itemsize) of a tensor, for pread."""
        name = self._aliases.get(name, name)
        return self._where[name].file_layout(name)

    def facts(self) -> list:
        """A TensorFact per tensor, shard by shard in file order, then the restored aliases."""
        out = [f for part in self._shards for f in part.facts()]
        if self._aliases:
            by_name = {f.name: f for f in out}
            out += [dataclasses.replace(by_name[stored], name=name,
                                        owner=name.rsplit(".", 1)[0] if "." in name else "")
                    for name, stored in self._aliases.items()]
        return out


def shard_paths(index_path: Path, index: dict) -> dict[str, list[str]]:
    """shard file name -> tensor names, checking every shard lies inside the index's folder."""
    folder = index_path.parent
    by_shard: dict[str, list[str]] = {}
    for name, shard in index["weight_map"].items():
        # Each distinct value is checked when first seen (a million names name a few shards).
        names = by_shard.get(shard) if type(shard) is str else None
        if names is None:
            if not isinstance(shard, str) or not shard:
                raise TargetError(f"{index_path}: weight_map[{name!r}] is {shard!r}, not a shard file name")
            names = by_shard[shard] = []
        names.append(name)
    missing: list[str] = []
    for shard in by_shard:
        # Judged by the name, not by where symlinks lead: a Hugging Face cache snapshot links every
        # file into ../../blobs, and that is fine; a name with a folder, '..' or a root is not.
        p = Path(shard)
        if p.is_absolute() or len(p.parts) != 1 or p.name in ("..", "."):
            raise TargetError(f"{index_path}: the index names shard {shard!r}, which lies outside its folder; "
                              f"refusing to read it (shards must sit next to the index)")
        if not (folder / p).is_file():
            missing.append(shard)
    if missing:
        # one line however many are missing: the count, and the first by name
        more = (f" ({len(missing):,} of the {len(by_shard):,} shards are missing, holding "
                f"{sum(len(by_shard[m]) for m in missing):,} tensors)") if len(missing) > 1 else ""
        raise TargetError(f"{index_path}: shard {sorted(missing)[0]!r} named by the index is missing from {folder}"
                          f"{more} (partial download?); fetch it and retry")
    return by_shard


def load_sharded(index_path: Path, index: dict, *, trust_pickle: bool = False,
                 restore_aliases: bool = True, progress: Callable[[int, int], None] | None = None) -> Subject:
    """A checkpoint split across shards listed by a ``*.index.json`` (safetensors or torch.save).

    The alias map of a sharded save (``huggingface_hub.save_torch_state_dict`` writes it into the
    index's ``metadata``; a shard's ``__metadata__`` may hold one too) is read as for a single file,
    and its dropped names restored as ties unless ``restore_aliases`` is False (a Hugging Face
    folder, whose architecture re-ties instead).

    Args:
        index_path: the index file; its shards sit beside it.
        index: the parsed index (``read_weights_index``).
        trust_pickle: allow pickled objects in torch.save shards.
        restore_aliases: restore the alias map's dropped names as ties.
        progress: called as ``progress(shards_read, shards)`` as the shards are read (about every
            1% of them, and after the last).

    Returns:
        The Subject: every shard's tensors under one mapping, their file spans, the alias map's
        declarations and findings.
    """

    by_shard = shard_paths(index_path, index)
    parts: list[Mapping] = []
    spans: dict[str, Any] = {}
    files: list[dict] = []
    kinds: set[str] = set()
    notes: list[str] = []
    extra_names: list[str] = []
    metadata = _index_metadata(index)
    weight_map = index["weight_map"]
    every = max(1, len(by_shard) // 100)
    for i, (shard, names) in enumerate(by_shard.items(), 1):
        p = index_path.parent / shard
        kind = sniff_file(p)
        kinds.add(kind or "unknown")
        if kind == SAFETENSORS:
            header = read_header(p)
            metadata.update(header.metadata)
            held, more, held_spans = map_tensors(header)
            spans.update(held_spans)
            notes += more
            files.append(file_summary(header))
        elif kind in (TORCH_SAVE, TORCH_SAVE_LEGACY):
            records = read_records(str(p), trust_pickle=trust_pickle)  # as for a single torch.save file
            if records is not None:
                obj, archive = records
                picked, _, more = pick_state(obj, None, str(p))
                held = archive.tensors(picked)
                spans.update(held.spans())
            else:
                obj, more = torch_load(str(p), trust_pickle=trust_pickle)
                held, _, more2 = pick_state(obj, None, str(p))
                spans.update(file_spans(held, str(p)))
                more += more2
            notes += more
            files.append({"file": shard, "tensors": len(held), "bytes": p.stat().st_size})
        else:
            raise TargetError(f"{p}: shard named by {index_path.name} is neither safetensors nor a torch.save file")
        missing = [n for n in names if n not in held]
        if missing:
            raise TargetError(f"{index_path}: the index places {missing[0]!r}"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} in {shard}, which "
                              f"does not hold {'it' if len(missing) == 1 else 'them'}; the index and shards disagree")
        if len(held) != len(names):  # every name the index places here is held: any more are not in the index
            extra_names += [n for n in held if weight_map.get(n) != shard]
        parts.append(held)
        if progress is not None and (i % every == 0 or i == len(by_shard)):
            progress(i, len(by_shard))
    if all(isinstance(part, (MappedTensors, ArchiveTensors)) for part in parts):
        tensors: Any = ShardedTensors(parts)  # type: ignore[arg-type]
    else:
        tensors = {n: t for part in parts for n, t in part.items()}
    if len(tensors) != sum(len(part) for part in parts):
        seen: set[str] = set()
        dup = next(n for part in parts for n in part if n in seen or seen.add(n))
        raise TargetError(f"{index_path}: tensor {dup!r} is stored in more than one shard")
    if extra_names:
        notes.append(f"{len(extra_names)} tensor(s) in the shards are not in the index (e.g. {extra_names[0]}); "
                     f"loaders that follow the index ignore them")
    fmt = "safetensors" if kinds == {SAFETENSORS} else "torch.save" if kinds <= {TORCH_SAVE, TORCH_SAVE_LEGACY} \
        else "mixed"
    total = sum(f["bytes"] for f in files)
    notes.insert(0, f"{len(tensors)} tensors in {len(files)} shard{'s' if len(files) != 1 else ''} "
                    f"({total:,} bytes) listed by {index_path.name}")
    aliases, broken = alias_map(metadata, tensors)
    decls, pairs = alias_declarations(aliases, broken, index_path.name)
    findings = [finding("TC020", f"{index_path.name} says {k} is an alias of {v}, but no shard holds {v}: "
                                 f"a loader that restores aliases cannot restore {k}", [k, v])
                for k, v in sorted(broken.items())]
    stored_copies = None
    if restore_aliases and aliases:
        stored_copies = {n: ("file", index_path.name, n) for n in tensors}
        for dropped, kept in aliases.items():
            if dropped in tensors:
                continue  # stored as well: the layers analysis compares the two copies
            if isinstance(tensors, ShardedTensors):
                tensors.add_alias(dropped, kept)
            else:
                tensors[dropped] = tensors[kept]
            stored_copies[dropped] = None
            if kept in spans:
                spans[dropped] = spans[kept]
        notes.append(f"the shards' __metadata__ record {len(aliases)} dropped name(s) as aliases of stored "
                     f"tensors; restored as ties")
    return Subject(tensors=tensors, source=Source(target=str(index_path), format=f"sharded {fmt}", notes=notes),
                   extra={"files": files}, file_spans=spans, loader_findings=findings, declarations=decls,
                   declared_pairs=pairs, stored_copies=stored_copies)


def _index_metadata(index: dict) -> dict[str, str]:
    """The string entries of an index's ``metadata`` (where a sharded save records its aliases)."""
    meta = index.get("metadata")
    return {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}


def stored_names(folder: Path) -> tuple[set[str], dict[str, str]] | None:
    """The tensor names a folder's safetensors files store, and their alias map (dropped -> kept).

    Reads headers only: the index (``model.safetensors.index.json``) with its shards checked as
    :func:`shard_paths` checks them, else every ``*.safetensors`` file of the folder. None where the
    folder holds no safetensors file.

    Raises:
        TargetError: a malformed index, a shard outside the folder or missing, a broken header.
    """
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_weights_index(index_path)
        if index is None:
            raise TargetError(f"{index_path}: not a weights index (no weight_map); save the checkpoint again")
        files = [folder / shard for shard in shard_paths(index_path, index)]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    metadata = _index_metadata(index) if index_path.is_file() else {}
    for path in files:
        header = read_header(path)
        names.update(header.entries)
        metadata.update(header.metadata)
    return names, alias_map(metadata, names)[0]
