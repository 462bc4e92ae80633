"""What the plugin says: the report header, how to create or refresh a snapshot, the summary."""

from __future__ import annotations

from pathlib import Path

from tiecheck import __version__

UPDATE_OPTION = "--tiecheck-update"
ACCEPT_OPTION = "--tiecheck-accept-errors"


def header(update: bool, snapshot_root: str | None) -> str:
    where = f"snapshots in {snapshot_root}" if snapshot_root else "snapshots beside each test file"
    mode = f"{UPDATE_OPTION}: writing them" if update else f"{UPDATE_OPTION} writes them"
    return f"tiecheck: {__version__} ({where}; {mode})"


def missing_snapshot(nodeid: str) -> str:
    return f"run `pytest {UPDATE_OPTION} {nodeid}` to write it, then commit the file"


def update_hint(nodeid: str) -> str:
    return f"if the change is intended, refresh the snapshot: `pytest {UPDATE_OPTION} {nodeid}`"


def accept_hint(nodeid: str) -> str:
    return f"`pytest {UPDATE_OPTION} {ACCEPT_OPTION} {nodeid}`"


def with_errors(paths: dict[Path, list[str]], rootdir: Path) -> list[str]:
    """Lines for the end of the run: snapshots written over error findings, loudly."""
    if not paths:
        return []
    n = len(paths)
    lines = [f"tiecheck: {n} snapshot{'s' if n > 1 else ''} record{'' if n > 1 else 's'} error findings "
             f"({ACCEPT_OPTION}):"]
    return lines + [f"  {relative(p, rootdir)}: {', '.join(codes)}" for p, codes in paths.items()]


def conflicting_writers(path: str, first: str, second: str) -> str:
    return (f"{second} and {first} write different ties to one snapshot {path} in this run: give each test its "
            f"own name, e.g. tiecheck.assert_ties_match_snapshot(model, \"<name>\")")


def bad_name(name: object) -> str:
    return (f"snapshot name {name!r} is not usable as a file name: use letters, digits, '_', '-', '.' "
            f"(no folders), e.g. \"gpt-mini\"")


def summary(written: dict[str, list[Path]], rootdir: Path, changes: dict[Path, list[str]] | None = None) -> list[str]:
    """Lines for the end of the run: which snapshots this run created or refreshed, and under each
    refreshed one what the refresh changed in it (as a snapshot diff: "removes tie group …")."""
    lines = []
    for status in ("created", "updated"):
        paths = written.get(status, [])
        if paths:
            lines.append(f"tiecheck: {len(paths)} snapshot{'s' if len(paths) > 1 else ''} {status}:")
            for p in paths:
                lines.append(f"  {relative(p, rootdir)}")
                lines += [f"    {c}" for c in (changes or {}).get(p, [])]
    unchanged = len(written.get("unchanged", []))
    if unchanged:
        lines.append(f"tiecheck: {unchanged} snapshot{'s' if unchanged > 1 else ''} unchanged")
    return lines


def relative(path: Path, rootdir: Path) -> str:
    try:
        return str(path.relative_to(rootdir))
    except ValueError:
        return str(path)
