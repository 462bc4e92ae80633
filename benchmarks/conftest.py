"""Benchmark collection and options.

* ``bench_*.py`` files are collected here, so benchmark files are named for what they are and
  the normal test run (``testpaths = tests``) never imports them.
* pyproject's ``addopts`` carries ``--benchmark-disable`` so that a benchmark fixture reached
  from the normal run executes once, untimed. pytest-benchmark refuses that flag together
  with ``--benchmark-only``; asking for ``--benchmark-only`` means "measure", so it wins.
"""

from __future__ import annotations

import pytest


def pytest_configure(config):
    # Runs before pytest-benchmark's own pytest_configure (registered trylast), which checks
    # the two flags.
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_disable = False


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
