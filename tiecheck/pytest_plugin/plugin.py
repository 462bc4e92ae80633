"""pytest hooks of tiecheck: the options, the report header, the ``tiecheck`` fixture and the
end-of-run summary of written snapshots.

Loaded through the ``pytest11`` entry point at every pytest start where tiecheck is installed,
so it imports only pytest and tiecheck's version here; torch waits until a test asks for the
fixture.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiecheck.pytest_plugin import messages
from tiecheck.pytest_plugin.store import SnapshotStore

_STORE = pytest.StashKey[SnapshotStore]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tiecheck", "tiecheck: weight-tie assertions and snapshots")
    group.addoption("--tiecheck-update", action="store_true", default=False,
                    help="Write or refresh tie snapshots instead of comparing with them.")
    group.addoption("--tiecheck-accept-errors", action="store_true", default=False,
                    help="With --tiecheck-update: write snapshots even of models with error findings "
                         "(e.g. a broken tie); listed at the end of the run.")
    group.addoption("--tiecheck-snapshot-dir", metavar="DIR", default=None,
                    help="Keep tie snapshots under DIR (relative to rootdir) instead of beside each test file.")
    parser.addini("tiecheck_snapshot_dir", "Folder (relative to rootdir) for tie snapshots; default: beside "
                                           "each test file.", default=None)


def pytest_configure(config: pytest.Config) -> None:
    folder = config.getoption("tiecheck_snapshot_dir") or config.getini("tiecheck_snapshot_dir")
    root = (config.rootpath / folder) if folder else None
    config.stash[_STORE] = SnapshotStore(config.rootpath, update=config.getoption("tiecheck_update"), root=root,
                                         accept_errors=config.getoption("tiecheck_accept_errors"))


def pytest_report_header(config: pytest.Config) -> str:
    store = config.stash[_STORE]
    shown = messages.relative(store.root, config.rootpath) if store.root else None
    return messages.header(store.update, shown)


@pytest.fixture
def tiecheck(request: pytest.FixtureRequest):
    """Tie assertions (``tiecheck.assert_tied(model, "a", "b")``, ...) with snapshots stored beside the
    test file (``tiecheck.assert_ties_match_snapshot(model, "name")``; ``--tiecheck-update`` writes them)."""
    from tiecheck.pytest_plugin.fixture import TiecheckFixture  # noqa: PLC0415 - loaded in every pytest run; the fixture's imports only when used

    node = request.node
    return TiecheckFixture(request.config.stash[_STORE], Path(node.path), node.name, node.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    store = config.stash.get(_STORE, None)
    if store is None:
        return
    for line in messages.summary(store.written, config.rootpath, store.changes) + messages.with_errors(store.with_errors,
                                                                                        config.rootpath):
        terminalreporter.write_line(line)
