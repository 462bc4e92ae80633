"""The package's layering holds: analyses never import torch, `tiecheck --help` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TORCH_FREE = [
    "tiecheck.analyses.ties", "tiecheck.analyses.duplicates", "tiecheck.analyses.candidates",
    "tiecheck.analyses.lint", "tiecheck.analyses.memory", "tiecheck.analyses.layers", "tiecheck.facts", "tiecheck.findings",
    "tiecheck.report", "tiecheck.report.render", "tiecheck.analyses.expect", "tiecheck.flops.analytic", "tiecheck.flops.result", "tiecheck.cli",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; " \
           f"assert not bad, bad"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"{module} imports {proc.stderr.strip().splitlines()[-1]}"


def test_every_subpackage_ships_in_the_wheel():
    """A package missing from pyproject's list works in a checkout and fails after `pip install .`."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"tiecheck"} | {"tiecheck." + p.parent.relative_to(root / "tiecheck").as_posix().replace("/", ".")
                            for p in (root / "tiecheck").glob("*/__init__.py")}
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert "tiecheck.models" in listed
