"""Where snapshots live, and what this run wrote.

Beside the test file by default: ``<test folder>/__tiecheck_snapshots__/<test file stem>/<name>.json``,
so a snapshot moves with its test and shows up next to it in review. With
``--tiecheck-snapshot-dir DIR`` (or the ``tiecheck_snapshot_dir`` ini option) they go to
``DIR/<test file path without .py>/<name>.json`` instead.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from tiecheck.pytest_plugin import messages

FOLDER = "__tiecheck_snapshots__"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-\[\]]*")


def clean_name(name: object) -> str:
    """A user-given snapshot name, checked to be one plain file name."""
    if not isinstance(name, str):
        raise TypeError(messages.bad_name(name))
    base = name[:-5] if name.endswith(".json") else name
    if not _NAME.fullmatch(base) or ".." in base:
        raise ValueError(messages.bad_name(name))
    return base


def name_from_test(test_name: str) -> str:
    """A default snapshot name from a test's name: ``test_x[gpt-mini]`` -> ``test_x-gpt-mini``."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", test_name).strip("-.") or "snapshot"


class SnapshotStore:
    def __init__(self, rootdir: Path, update: bool = False, root: Path | None = None, accept_errors: bool = False):
        self.rootdir = rootdir
        self.update = update
        self.accept_errors = accept_errors  # --tiecheck-accept-errors: record states with error findings
        self.with_errors: dict[Path, list[str]] = {}
        self.changes: dict[Path, list[str]] = {}  # updated snapshot -> what the update changed in it
        self.root = root  # None: beside each test file
        self.written: dict[str, list[Path]] = defaultdict(list)
        self._writer: dict[Path, str] = {}

    def path_for(self, test_file: Path, name: str) -> Path:
        if self.root is None:
            return test_file.parent / FOLDER / test_file.stem / f"{name}.json"
        try:
            rel = test_file.with_suffix("").relative_to(self.rootdir)
        except ValueError:  # a test outside rootdir: its stem alone
            rel = Path(test_file.stem)
        return self.root / rel / f"{name}.json"

    def claim(self, path: Path, nodeid: str) -> str | None:
        """Record that a test uses a snapshot; the test that used it first, if another."""
        first = self._writer.setdefault(path, nodeid)
        return first if first != nodeid else None

    def record_errors(self, path: Path, codes: list[str]) -> None:
        """A snapshot written over error findings, for the run's summary."""
        self.with_errors[path] = codes

    def record_changes(self, path: Path, found: list) -> None:
        """What an update changed in a snapshot (``guard.snapshot.Change`` items), for the summary."""
        self.changes[path] = [c.text() for c in found]

    def record(self, path: Path, status: str) -> None:
        if status != "matched":
            self.written[status].append(path)
