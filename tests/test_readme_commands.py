"""The README's two commands are what CI runs, and the suite can be collected by the second one.

CI once ran ``python -m pytest``, which puts the checkout on ``sys.path``; four test files then
imported their helpers as ``tests.support…`` and the README's plain ``pytest`` stopped at
collection while CI passed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The lines of the README's first ``bash`` block: install-and-run, then the tests."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "the README starts with a bash block of its two commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_starts_with_two_commands_the_second_runs_the_tests():
    lines = readme_commands()
    assert len(lines) == 2
    assert lines[1] == "pytest"


def test_ci_runs_the_readme_commands_word_for_word():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    # Each README command stands alone on the line under a "# README" comment, exactly as a user types it.
    marked = [ci[i + 1] for i, line in enumerate(ci[:-1]) if line == "# README"]
    assert marked == readme_commands()
    assert all(command in ci for command in readme_commands())


def test_no_test_module_imports_the_suite_as_a_package():
    """``tests`` is not a package: its helpers are imported as ``support…`` (pytest puts ``tests/`` on
    the path), which works under ``pytest`` and ``python -m pytest`` alike."""
    wrong = []
    for path in sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            wrong += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n == "tests" or
                      n.startswith("tests.")]
    assert not wrong
