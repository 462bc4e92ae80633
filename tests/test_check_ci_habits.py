"""The habits tiecheck meets: a pre-commit hook (checked with pre-commit's own schema, and run once
for real, offline) and the GitHub Actions workflow of docs/ci.md (parsed, its commands run)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import tiecheck.api
import tiecheck.pytest_plugin.fixture  # noqa: F401
from tiecheck.cli import main

import support.models as tie_models

yaml = pytest.importorskip("yaml")
clientlib = pytest.importorskip("pre_commit.clientlib")

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / ".pre-commit-hooks.yaml"
CI_DOC = ROOT / "docs" / "ci.md"

POLICY = """[tool.tiecheck]
[[tool.tiecheck.targets]]
target = "lm.py:tied"
tied = [["tok_emb.weight", "head.weight"]]
"""
TEST_FILE = """
import lm

def test_tied(tiecheck):
    tiecheck.assert_tied(lm.tied(), "tok_emb.weight", "head.weight")
"""


def _yaml_block(heading: str) -> dict:
    """The first ```yaml block under a docs/ci.md heading, parsed."""
    text = CI_DOC.read_text()
    section = text.split(f"\n## {heading}\n", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, f"docs/ci.md: no yaml block under '## {heading}'"
    return yaml.safe_load(block.group(1))


def _project(root: Path, model: str = "tied") -> Path:
    shutil.copy(tie_models.__file__, root / "lm.py")
    (root / "pyproject.toml").write_text(POLICY.replace("lm.py:tied", f"lm.py:{model}"))
    return root


def test_the_hook_manifest_passes_pre_commits_schema():
    (hook,) = clientlib.load_manifest(str(MANIFEST))
    assert (hook["id"], hook["entry"], hook["pass_filenames"]) == ("tiecheck", "tiecheck check", False)
    # pre-commit 4.4 reads `system` as its new name `unsupported`; older versions know `system` only.
    assert hook["language"] in ("system", "unsupported")


def test_the_documented_local_hook_is_the_shipped_one(tmp_path):
    config = tmp_path / ".pre-commit-config.yaml"
    config.write_text(yaml.safe_dump(_yaml_block("pre-commit")))
    (repo,) = clientlib.load_config(str(config))["repos"]
    (documented,) = repo["hooks"]
    (shipped,) = clientlib.load_manifest(str(MANIFEST))
    for field in ("id", "name", "entry", "language", "pass_filenames", "files", "require_serial"):
        assert documented[field] == shipped[field], field


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "init.defaultBranch=main",
                    *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_pre_commit_runs_the_shipped_hook_offline(tmp_path):
    # The hook repository: the manifest alone, cloned from a local path (no network; `system`
    # installs nothing).
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    shutil.copy(MANIFEST, hooks / ".pre-commit-hooks.yaml")
    _git(hooks, "init", "-q")
    _git(hooks, "add", ".")
    _git(hooks, "commit", "-qm", "hooks")
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=hooks, capture_output=True, text=True).stdout.strip()

    (tmp_path / "project").mkdir()
    project = _project(tmp_path / "project", "broken")
    (project / ".pre-commit-config.yaml").write_text(yaml.safe_dump(
        {"repos": [{"repo": str(hooks), "rev": rev, "hooks": [{"id": "tiecheck"}]}]}))
    _git(project, "init", "-q")
    _git(project, "add", ".")
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    pre_commit = [sys.executable, "-m", "pre_commit", "run", "--all-files", "--color", "never"]
    res = subprocess.run(pre_commit, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr  # the broken tie fails the commit
    assert "tiecheck check (weight ties)" in res.stdout
    assert "Failed" in res.stdout
    assert "lm.py:broken: FAILED" in res.stdout
    assert "TC009" in res.stdout


def test_the_github_workflow_parses_and_its_commands_pass(pytester, monkeypatch):
    workflow = _yaml_block("GitHub Actions")
    steps = workflow["jobs"]["tiecheck"]["steps"]
    assert steps[0]["uses"].startswith("actions/checkout@")
    commands = [s["run"].split("#")[0].strip() for s in steps if "run" in s]
    ours = [c for c in commands if c.split()[0] in ("tiecheck", "pytest")]
    assert [c.split()[0] for c in ours] == ["tiecheck", "pytest"]

    _project(pytester.path)
    pytester.makepyfile(test_ties=TEST_FILE)
    monkeypatch.chdir(pytester.path)
    for command in ours:
        argv = shlex.split(command)
        if argv[0] == "tiecheck":
            res = CliRunner().invoke(main, argv[1:])
            assert res.exit_code == 0, res.output
            assert res.stdout.splitlines()[-1] == "tiecheck check: 1 target checked"
        else:
            pytester.runpytest_inprocess("-p", "no:hypothesispytest", *argv[1:]).assert_outcomes(passed=1)


def test_the_documented_install_lines_are_valid_requirements():
    """docs/ci.md tells a project how to depend on tiecheck, which no package index holds: every
    requirement it shows parses as pip parses it and names tiecheck with the `hf` extra."""
    from packaging.requirements import Requirement  # noqa: PLC0415 - pip's own parser, only for this check

    text = CI_DOC.read_text(encoding="utf-8")
    section = text.split("## Installing tiecheck into your project", 1)[1].split("\n## ", 1)[0]
    lines = re.findall(r'"(tiecheck[^"]*)"', section)
    assert len(lines) >= 3
    for line in lines:
        req = Requirement(line.replace("<tiecheck's git URL>", "https://example.org/tiecheck.git")
                          .replace("<rev>", "v0.1.0").replace("/path/to/", "/opt/"))
        assert req.name == "tiecheck"
        assert req.url, line
        assert req.url.startswith(("git+https://", "file:///")), line
    assert "pre-commit install" in text
    assert "pre-commit run --all-files" in text
