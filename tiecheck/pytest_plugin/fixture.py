"""The object the ``tiecheck`` fixture gives a test: the assertions of ``tiecheck.testing``, with
snapshots named per test and stored beside the test file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiecheck import testing
from tiecheck.api import analyze
from tiecheck.pytest_plugin import messages
from tiecheck.pytest_plugin.store import SnapshotStore, clean_name, name_from_test

if TYPE_CHECKING:  # pragma: no cover
    from tiecheck.report import Report


class TiecheckFixture:
    """``tiecheck.assert_tied(model, "a", "b")``, ``tiecheck.assert_ties_match_snapshot(model, "gpt")``, ...

    Every assertion takes an ``nn.Module``, a state dict, anything ``tiecheck.analyze`` accepts, or
    a Report (``tiecheck.analyze(model)`` once, then several assertions on it).
    """

    def __init__(self, store: SnapshotStore, test_file: Path, test_name: str, nodeid: str):
        self._store = store
        self._test_file = test_file
        self._test_name = test_name
        self._nodeid = nodeid
        self._default_uses = 0

    @property
    def update(self) -> bool:
        """True under ``--tiecheck-update``: snapshot assertions write instead of compare."""
        return self._store.update

    def analyze(self, model: Any, **options: Any) -> Report:
        """``tiecheck.analyze`` (imported on first use, so collecting tests never loads torch)."""

        return analyze(model, **options)

    def assert_tied(self, model: Any, *names: str) -> None:
        __tracebackhide__ = True
        testing.assert_tied(model, *names)

    def assert_not_tied(self, model: Any, *names: str) -> None:
        __tracebackhide__ = True
        testing.assert_not_tied(model, *names)

    def assert_no_broken_ties(self, model: Any) -> None:
        __tracebackhide__ = True
        testing.assert_no_broken_ties(model)

    def assert_no_findings(self, model: Any, severity: str = "warning", *, ignore: Iterable[str] = ()) -> None:
        __tracebackhide__ = True
        testing.assert_no_findings(model, severity, ignore=ignore)

    def assert_ties_survive(self, build: Any, **options: Any) -> None:
        """``tiecheck.testing.assert_ties_survive``: ties kept through ``to_empty``, ``assign=True`` and moves."""
        __tracebackhide__ = True
        testing.assert_ties_survive(build, **options)

    def snapshot_path(self, name: str | None = None) -> Path:
        """Where the snapshot ``name`` of this test lives (default: the test's own name)."""
        return self._store.path_for(self._test_file, clean_name(name) if name is not None
                                    else name_from_test(self._test_name))

    def _name(self, name: str | None) -> str:
        if name is not None:
            return clean_name(name)
        # Unnamed snapshots take the test's name; a second one in the same test gets "-2", and so on.
        self._default_uses += 1
        base = name_from_test(self._test_name)
        return base if self._default_uses == 1 else f"{base}-{self._default_uses}"

    def assert_ties_match_snapshot(self, model: Any, name: str | None = None) -> None:
        """The tie groups and kinds equal the stored snapshot; under ``--tiecheck-update`` it is written."""
        __tracebackhide__ = True
        name = self._name(name)
        path = self._store.path_for(self._test_file, name)
        shown = messages.relative(path, self._store.rootdir)
        first = self._store.claim(path, self._nodeid)
        accepted: list[dict] = []
        if self.update:
            # Before the shared-name check: a broken tie is the cause to name, not the name.
            if self._store.accept_errors:
                accepted = testing.error_findings(testing.report_of(model))
            else:
                testing.refuse_error_state(model, shown, messages.accept_hint(self._nodeid))
        if self.update and first is not None:
            # Another test wrote this snapshot in this run: refreshing it again must not change it.
            try:
                testing.match_snapshot(model, path, label=shown)
            except testing.SnapshotMismatchError as e:
                raise testing.SnapshotMismatchError(messages.conflicting_writers(shown, first, self._nodeid),
                                                    e.findings) from None
        status = testing.match_snapshot(
            model, path, update=self.update, label=shown, accept_errors=True,
            how_to_create=messages.missing_snapshot(self._nodeid),
            how_to_update=messages.update_hint(self._nodeid),
            on_changes=lambda found: self._store.record_changes(path, found))
        self._store.record(path, status)
        if accepted:
            self._store.record_errors(path, sorted({f.code for f in accepted}))
