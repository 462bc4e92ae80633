"""Names taken from files reach every command and format escaped: no line breaks, no terminal
escape sequences, whatever the file put in a tensor name."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from tiecheck.cli import main
from tiecheck.report.text import json_text, one_line

# An ANSI colour sequence, a newline, a carriage return, a C1 CSI and a Unicode line separator.
HOSTILE = "emb\x1b[31mRED\nfake: line\r\x9b2J\u2028x.weight"
UNSAFE = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]} - {"\n"}


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory):
    """Two checkpoints whose tied and untied names carry the hostile characters."""
    root = tmp_path_factory.mktemp("hostile")
    emb = torch.arange(12.0).reshape(3, 4)
    tied, untied = root / "tied.pt", root / "untied.pt"
    torch.save({HOSTILE: emb, "head.weight": emb}, tied)
    torch.save({HOSTILE: emb.clone(), "head.weight": emb.clone()}, untied)
    return tied, untied


def _assert_clean(text: str) -> None:
    assert text, "no output"
    bad = sorted({c for c in text if c in UNSAFE})
    assert not bad, f"raw control characters in the output: {bad!r}"
    assert "\nfake: line" not in text  # the name did not start a line of its own


@pytest.mark.parametrize("fmt", ["table", "markdown", "json", "csv"])
def test_inspect_escapes_names_in_every_format(hostile_files, fmt):
    res = CliRunner().invoke(main, ["inspect", str(hostile_files[0]), "--format", fmt, "--no-flops"])
    assert res.exit_code == 0, res.output
    _assert_clean(res.output)
    assert one_line(HOSTILE) in res.output or fmt == "json"
    if fmt == "json":  # escaped, not lost: the JSON reads back the exact name
        names = {n for g in json.loads(res.output)["tie_groups"] for n in g["names"]}
        assert HOSTILE in names


@pytest.mark.parametrize("fmt", ["table", "markdown", "json"])
def test_diff_escapes_names_in_every_format(hostile_files, fmt):
    res = CliRunner().invoke(main, ["diff", str(hostile_files[0]), str(hostile_files[1]), "--format", fmt])
    assert res.exit_code == 1, res.output  # the tie is lost in B
    _assert_clean(res.output)


@pytest.mark.parametrize("fmt", ["text", "github", "json"])
def test_check_escapes_names_in_every_format(hostile_files, fmt):
    res = CliRunner().invoke(main, ["check", str(hostile_files[1]), "--no-config", "--format", fmt,
                                    "--expect-tied", f"{HOSTILE},head.weight"])
    assert res.exit_code == 1, res.output
    _assert_clean(res.output)


def test_errors_escape_names(tmp_path):
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / HOSTILE)])
    assert res.exit_code == 2
    _assert_clean(res.output.rstrip("\n"))
    assert res.output.count("\n") == 1


def test_json_text_reads_back_unchanged():
    obj = {"name": HOSTILE, "n": [1, 2]}
    text = json_text(obj)
    _assert_clean(text)
    assert json.loads(text) == obj
