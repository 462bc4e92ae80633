"""Tie snapshots: the tie groups of a target and their kinds, as one small readable JSON file.

A snapshot holds names and kinds, never weights, so it is small, diffs well in review and stays
valid when the weights change. ``tiecheck inspect TARGET --format json`` output is accepted as
a snapshot too: its ``tie_groups`` carry the same ``names`` and ``kind``.

    {
      "tiecheck_snapshot": 1,
      "tiecheck_version": "0.1.0",
      "tie_groups": [
        {"names": ["head.weight", "tok_emb.weight"], "kind": "same_parameter"}
      ]
    }
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiecheck import __version__
from tiecheck.analyses.expect import ExpectedGroup, kinds_match
from tiecheck.analyses.ties import KINDS
from tiecheck.errors import TiecheckError
from tiecheck.report.safewrite import UnsafeOutputError, write_text

if TYPE_CHECKING:  # pragma: no cover
    from tiecheck.report import Report

SNAPSHOT_VERSION = 1


class SnapshotError(TiecheckError):
    """A snapshot file that cannot be read or understood."""


@dataclass(frozen=True)
class Snapshot:
    groups: tuple[ExpectedGroup, ...]

    @classmethod
    def from_report(cls, report: Report) -> Snapshot:
        groups = [ExpectedGroup(tuple(sorted(g.names)), g.kind) for g in report.tie_groups]
        return cls(tuple(sorted(groups, key=lambda g: g.names)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "tiecheck_snapshot": SNAPSHOT_VERSION,
            "tiecheck_version": __version__,
            "tie_groups": [{"names": list(g.names), "kind": g.kind} if g.kind else {"names": list(g.names)}
                           for g in self.groups],
        }

    def to_json(self) -> str:
        """Indented JSON with one tie group per line, so a changed tie is a one-line diff."""
        d = self.to_dict()
        dump = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731
        head = [f"  {dump(k)}: {dump(v)}," for k, v in d.items() if k != "tie_groups"]
        groups = ",\n".join(f"    {dump(g)}" for g in d["tie_groups"])
        body = f"[\n{groups}\n  ]" if groups else "[]"
        return "{\n" + "\n".join(head) + f"\n  \"tie_groups\": {body}\n}}\n"

    def matches(self, other: Snapshot) -> bool:
        """Same groups with compatible kinds (what a comparison would accept)."""
        mine = {g.names: g.kind for g in self.groups}
        theirs = {g.names: g.kind for g in other.groups}
        return mine.keys() == theirs.keys() and all(
            kinds_match(mine[n], theirs[n]) or kinds_match(theirs[n], mine[n]) for n in mine)


@dataclass(frozen=True)
class Change:
    """One tie group that an update adds, removes or changes, as a snapshot diff shows it."""

    verb: str  # adds | removes | changes | replaces (a previous file that could not be read)
    names: tuple[str, ...] = ()
    kind: str | None = None
    was: str | None = None  # changes: the previous kind; replaces: why the file could not be read

    def text(self) -> str:
        if self.verb == "replaces":
            return f"replaces a snapshot it could not read ({self.was})"
        group = " = ".join(self.names)
        if self.verb == "changes":
            return f"changes tie group {group}: kind {self.was} -> {self.kind}"
        return f"{self.verb} tie group {group}" + (f" ({self.kind})" if self.kind else "")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"change": self.verb, "names": list(self.names), "kind": self.kind}
        if self.verb == "changes":
            out["was"] = self.was
        elif self.verb == "replaces":
            out["error"] = self.was
        return out


def changes(before: Snapshot, after: Snapshot) -> list[Change]:
    """What writing ``after`` over ``before`` changes: removed groups, changed kinds, added groups.

    A group is its set of names: one that gains or loses a name is removed and added, as a line
    of a diff is. Kinds that match (a file's ``shared_storage`` for a module's
    ``same_parameter``, or a group written without a kind) are no change.
    """
    old = {g.names: g.kind for g in before.groups}
    new = {g.names: g.kind for g in after.groups}
    removed = [Change("removes", n, old[n]) for n in old if n not in new]
    changed = [Change("changes", n, new[n], was=old[n]) for n in old if n in new
               and not (kinds_match(old[n], new[n]) or kinds_match(new[n], old[n]))]
    added = [Change("adds", n, new[n]) for n in new if n not in old]
    return removed + changed + added


def parse(data: Any, origin: str) -> Snapshot:
    """A snapshot from parsed JSON: a tiecheck snapshot or an `inspect --format json` report."""
    def bad(why: str) -> SnapshotError:
        return SnapshotError(f"{origin}: {why}; write a snapshot with `tiecheck check TARGET --expect {origin} "
                             f"--update` or `tiecheck inspect TARGET --format json -o {origin}`")

    if not isinstance(data, dict):
        raise bad(f"expected a JSON object with a 'tie_groups' list, found a {type(data).__name__}")
    # Reports of schema_version 1 and 2 hold tie groups alike (2 added `declared` and moved
    # `files`): either is an expectation.
    for key, supported in (("tiecheck_snapshot", (SNAPSHOT_VERSION,)), ("schema_version", (1, 2))):
        if key in data and data[key] not in supported:
            raise SnapshotError(f"{origin}: {key} {data[key]!r} is not supported (this tiecheck reads "
                                f"{' or '.join(map(str, supported))}); re-create it with this version")
    groups = data.get("tie_groups")
    if not isinstance(groups, list):
        raise bad("not a tiecheck snapshot: no 'tie_groups' list")
    out, seen = [], {}
    for i, g in enumerate(groups):
        names = g.get("names") if isinstance(g, dict) else None
        if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) and n for n in names)):
            raise bad(f"tie_groups[{i}] needs 'names': a list of two or more tensor names")
        kind = g.get("kind")
        if kind is not None and kind not in KINDS:
            raise bad(f"tie_groups[{i}] has unknown kind {kind!r} (known: {', '.join(KINDS)})")
        for n in names:
            if seen.get(n) == i:
                raise bad(f"{n} is listed twice in tie_groups[{i}]; list each name once")
            if n in seen:
                raise bad(f"{n} is listed in tie_groups[{seen[n]}] and tie_groups[{i}]; a name has one tie group")
            seen[n] = i
        out.append(ExpectedGroup(tuple(sorted(names)), kind))
    return Snapshot(tuple(sorted(out, key=lambda g: g.names)))


def read(path: str | os.PathLike) -> Snapshot:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise SnapshotError(f"{p}: no such snapshot file; write it with `tiecheck check TARGET --expect {p} "
                            f"--update`") from e
    except (OSError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{p}: cannot read the snapshot ({getattr(e, 'strerror', None) or e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SnapshotError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    return parse(data, str(p))


def write(path: str | os.PathLike, snapshot: Snapshot, protect: tuple[object, ...] = ()) -> None:
    """Write atomically (a reader never sees half a file), creating folders; never over an input."""

    try:
        write_text(path, snapshot.to_json(), protect, what="the snapshot", make_parents=True)
    except UnsafeOutputError as e:
        raise SnapshotError(str(e)) from e


def refresh(path: str | os.PathLike, actual: Snapshot, protect: tuple[str, ...] = ()) -> str:
    """Write ``actual`` unless the file already says the same: ``created``, ``updated`` or ``unchanged``.

    Leaving an equal file alone keeps its bytes (and the version that wrote it) out of diffs.
    """
    return update(path, actual, protect)[0]


def update(path: str | os.PathLike, actual: Snapshot, protect: tuple[str, ...] = ()) -> tuple[str, list[Change]]:
    """:func:`refresh`, and what the write changed in the file.

    Args:
        path: the snapshot file.
        actual: the snapshot of the target now.
        protect: inputs the file must not be written over.

    Returns:
        The status (``created``, ``updated`` or ``unchanged``) and, for ``updated``, the
        :class:`Change` of each tie group the previous file held otherwise (a file that could
        not be read is one ``replaces`` change).
    """
    p = Path(path)
    if not p.exists():
        write(p, actual, protect)
        return "created", []
    try:
        before = read(p)
    except SnapshotError as e:  # unreadable or outdated: the update replaces it
        found = [Change("replaces", was=str(e).removeprefix(f"{p}: ").split(";")[0])]
    else:
        if before.matches(actual):
            return "unchanged", []
        found = changes(before, actual)
    write(p, actual, protect)
    return "updated", found
