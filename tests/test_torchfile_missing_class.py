"""`--trust-pickle` on a whole-module file whose class is not importable: the file is fine, the class is missing."""

from __future__ import annotations

import importlib
import sys
import textwrap

import torch
from click.testing import CliRunner

from tiecheck.cli import main

NET = textwrap.dedent("""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 2)
""")


def _saved_elsewhere(tmp_path, monkeypatch, source: str) -> tuple[str, object]:
    """A whole module saved where its class's module exists, then the module gone from the import path."""
    name = f"netdef_{tmp_path.name.replace('-', '_')}"
    made = tmp_path / "made"
    made.mkdir()
    (made / f"{name}.py").write_text(NET)
    monkeypatch.syspath_prepend(str(made))
    net = importlib.import_module(name).Net()
    torch.save(net, made / "net.pt")
    (made / f"{name}.py").write_text(source)  # the class's module as it is where the file is read
    del sys.modules[name]
    importlib.invalidate_caches()
    if not source:
        (made / f"{name}.py").unlink()
    return name, made / "net.pt"


def test_missing_module_is_named_as_an_import_path_problem(tmp_path, monkeypatch):
    name, path = _saved_elsewhere(tmp_path, monkeypatch, "")
    res = CliRunner().invoke(main, ["inspect", str(path), "--trust-pickle"])
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1] == (
        f"tiecheck: error: {path}: the file is fine, but it pickles a class from module '{name}', which is not on "
        f"the import path; run from the folder that holds {name} (or set PYTHONPATH), or save the state_dict() "
        f"instead")
    assert "corrupt" not in res.stderr


def test_renamed_class_is_named(tmp_path, monkeypatch):
    name, path = _saved_elsewhere(tmp_path, monkeypatch, NET.replace("class Net", "class Renamed"))
    res = CliRunner().invoke(main, ["inspect", str(path), "--trust-pickle"])
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1] == (
        f"tiecheck: error: {path}: the file is fine, but it pickles {name}.Net, which module '{name}' on the import "
        f"path does not define (renamed or moved?); import the right version of it, or save the state_dict() "
        f"instead")
