"""Specs resolve from a project root the way pytest finds a rootdir (issue: specs from a project root)."""

from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner

from tiecheck.cli import main

MODEL = textwrap.dedent("""
    from torch import nn

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(11, 4)
            self.lm_head = nn.Linear(4, 11, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, x):
            return self.lm_head(self.wte(x))
""")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project laid out as users lay one out: a package folder and tests/ beside a pyproject.toml."""
    # A unique package name: a module imported by one test stays in sys.modules for the next.
    pkg = f"mypkg_{tmp_path.name.replace('-', '_')}"
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text(MODEL)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "models.py").write_text(f"from {pkg} import GPT\n\ndef build_gpt():\n    return GPT()\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path, pkg


def test_module_spec_wins_over_a_same_named_folder(project):
    _, pkg = project
    res = CliRunner().invoke(main, ["inspect", f"{pkg}:GPT", "--no-flops", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert '"wte.weight"' in res.output
    assert "no such Python file" not in res.output


def test_file_spec_imports_the_project_package_from_the_root(project):
    res = CliRunner().invoke(main, ["inspect", "tests/models.py:build_gpt", "--no-flops", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert '"lm_head.weight"' in res.output


def test_file_spec_finds_the_root_from_a_subfolder(project, monkeypatch):
    root, _ = project
    monkeypatch.chdir(root / "tests")
    res = CliRunner().invoke(main, ["inspect", "models.py:build_gpt", "--no-flops", "--format", "json"])
    assert res.exit_code == 0, res.output


def test_a_failed_import_names_the_path_once_and_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text("import no_such_pkg_xyz\n")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["inspect", "m.py:f"])
    assert res.exit_code == 2
    line = res.output.strip()
    assert line.count("m.py") == 1, line
    assert "No module named 'no_such_pkg_xyz'" in line
    assert "import path" in line


def test_a_folder_that_is_no_module_is_still_named(tmp_path, monkeypatch):
    (tmp_path / "data-dir").mkdir()
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["inspect", "data-dir:f"])
    assert res.exit_code == 2
    assert "tiecheck: error: data-dir:f: no such Python file data-dir" in res.output
