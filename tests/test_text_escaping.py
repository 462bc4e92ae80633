"""Names taken from files reach every command and format escaped: no line breaks, no terminal
escape sequences, whatever the file put in a tensor name."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner

from tiecheck.cli import main
from tiecheck.report.text import human_bytes, json_text, markdown_text, one_line

# An ANSI colour sequence, a newline, a carriage return, a C1 CSI, the Unicode line and paragraph
# separators (str.splitlines() breaks at both), and DEL.
HOSTILE = "emb\x1b[31mRED\nfake: line\r\x9b2J\u2028x\u2029p\x7f.weight"
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
    assert (markdown_text(HOSTILE) if fmt == "markdown" else one_line(HOSTILE)) in res.output or fmt == "json"
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


@pytest.mark.parametrize("sep", ["\u2028", "\u2029"])
def test_the_unicode_line_and_paragraph_separators_are_escaped(sep):
    name = f"a{sep}b.weight"
    assert len(name.splitlines()) == 2  # what a terminal or a line-based reader would split
    assert one_line(name) == f"a\\u{ord(sep):04x}b.weight"
    text = json_text({"name": name})
    assert sep not in text
    assert f"\\u{ord(sep):04x}" in text
    assert json.loads(text) == {"name": name}
    assert sep not in markdown_text(name)


@pytest.mark.parametrize("c", [0x7F, 0x80, 0x9B, 0x9F])
def test_del_and_the_c1_controls_are_escaped_by_their_code(c):
    """DEL and the C1 controls (0x9b alone starts a terminal escape sequence): shown as ``\\xNN`` in
    text, as ``\\u00NN`` in JSON (which ``json.dumps(ensure_ascii=False)`` leaves raw), read back as sent."""
    name = f"a{chr(c)}b.weight"
    assert one_line(name) == f"a\\x{c:02x}b.weight"
    text = json_text({"name": name})
    assert chr(c) not in text
    assert f"\\u{c:04x}" in text
    assert json.loads(text) == {"name": name}


def test_separators_past_the_c1_block_are_shown_as_unicode_escapes():
    """The no-break space (U+00A0) is not a C1 control: like every separator but the plain space, it is
    shown as ``\\u00a0`` (a name with it looks like one with a space)."""
    assert one_line("a\u00a0b") == "a\\u00a0b"
    assert one_line("a\u3000b") == "a\\u3000b"
    assert one_line("a b") == "a b"


@pytest.mark.parametrize("c", [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029])
def test_each_bidirectional_control_and_separator_is_spelled_by_its_own_code(c):
    assert one_line(f"a{chr(c)}b") == f"a\\u{c:04x}b"
    assert f"\\u{c:04x}" in json_text({"name": f"a{chr(c)}b"})


def test_markdown_escapes_the_strings_inside_a_record():
    """Records (dataclasses) reach the Markdown renderer whole: each string field is escaped, the rest kept."""

    @dataclass(frozen=True)
    class Record:
        name: str
        names: tuple[str, ...]
        n: int

    got = markdown_text(Record("a|b<c>", ("[x](y)", "ok"), 3))
    assert got == Record("a\\|b&lt;c&gt;", ("\\[x\\](y)", "ok"), 3)


def test_human_bytes_up_to_tebibytes():
    assert human_bytes(1023) == "1,023 B"
    assert human_bytes(1536) == "1.50 KiB"
    assert human_bytes(3 * 1024**3) == "3.00 GiB"
    assert human_bytes(2 * 1024**4) == "2.00 TiB"
    assert human_bytes(5 * 1024**5) == "5,120.00 TiB"


def test_json_text_reads_back_unchanged():
    obj = {"name": HOSTILE, "n": [1, 2]}
    text = json_text(obj)
    _assert_clean(text)
    assert json.loads(text) == obj


# -- names that spoof, inject markup or formulas --------------------------------------------------

# U+202E shows what follows reversed ("exe.txt" reads "txt.exe"); U+200B and U+2060 are invisible;
# U+2066 opens a bidirectional isolate; U+FEFF is a zero-width no-break space.
SPOOF = "model.\u202eweight.txet\u200b\u2060.lm_head\u2066\ufeff"
INVISIBLE = {"\u202e", "\u200b", "\u2060", "\u2066", "\ufeff"}
MARKUP = "w|<img src=x onerror=alert(1)>[click](javascript:alert(1))"
FORMULA = "=HYPERLINK(\"http://x\",\"y\")"


@pytest.fixture(scope="module")
def spoofing_file(tmp_path_factory):
    """A checkpoint whose names hold invisible and bidirectional characters, Markdown/HTML and a formula."""
    root = tmp_path_factory.mktemp("spoof")
    emb = torch.arange(12.0).reshape(3, 4)
    path = root / "spoof.pt"
    torch.save({SPOOF: emb, MARKUP: emb, FORMULA: emb.clone(), "+cmd|' /C calc'!A0": emb.clone()}, path)
    return path


@pytest.mark.parametrize("fmt", ["table", "markdown", "json", "csv"])
def test_bidi_and_zero_width_characters_are_shown_as_escapes(spoofing_file, fmt):
    res = CliRunner().invoke(main, ["inspect", str(spoofing_file), "--format", fmt, "--no-flops"])
    assert res.exit_code == 0, res.output
    assert not INVISIBLE & set(res.output), "an invisible or bidirectional character reached the output"
    assert "\\u202e" in res.output
    assert "\\u200b" in res.output
    if fmt == "json":  # escaped as JSON escapes: the exact name reads back
        assert SPOOF in {n for g in json.loads(res.output)["tie_groups"] for n in g["names"]}


def test_check_annotations_show_bidi_and_zero_width_characters(spoofing_file):
    res = CliRunner().invoke(main, ["check", str(spoofing_file), "--no-config", "--format", "github",
                                    "--expect-tied", f"{FORMULA},{SPOOF}"])
    assert res.exit_code == 1, res.output
    assert "::error " in res.output
    assert not INVISIBLE & set(res.output)
    assert "\\u202e" in res.output


def test_markdown_names_cannot_add_cells_html_or_links(spoofing_file):
    out = CliRunner().invoke(main, ["inspect", str(spoofing_file), "--format", "markdown", "--no-flops"]).output
    assert "<img" not in out
    assert not re.search(r"(?<!\\)\]\(javascript:", out)
    assert not re.search(r"(?<!\\)\[click", out)
    assert "w\\|&lt;img src=x onerror=alert(1)&gt;\\[click\\](javascript:alert(1))" in out
    row = next(line for line in out.splitlines() if "onerror" in line)
    assert row.count("|") - row.count("\\|") == 7  # the tie groups table's six columns, nothing more


def test_markdown_diff_names_cannot_add_cells_html_or_links(spoofing_file, tmp_path):
    """``diff`` escapes its records for Markdown as dicts: a name on one side only is shown inert."""
    other = tmp_path / "other.pt"
    torch.save({"head.weight": torch.zeros(3, 4)}, other)
    out = CliRunner().invoke(main, ["diff", str(spoofing_file), str(other), "--format", "markdown"]).output
    assert "onerror" in out  # the name is in the diff
    assert "<img" not in out
    assert not re.search(r"(?<!\\)\[click", out)
    assert "w\\|&lt;img src=x onerror=alert(1)&gt;\\[click\\](javascript:alert(1))" in out


def test_csv_cells_are_never_formulas(spoofing_file):
    """OWASP's rule: a cell starting with =, +, - or @ is prefixed with a quote, so a spreadsheet reads text."""
    out = CliRunner().invoke(main, ["inspect", str(spoofing_file), "--format", "csv", "--no-flops"]).output
    cells = [c for row in csv.reader(io.StringIO(out)) for c in row]
    assert "'" + FORMULA in cells
    assert "'+cmd|' /C calc'!A0" in cells
    assert not [c for c in cells if c[:1] in ("=", "+", "@") or (c.startswith("-") and not _number(c))]


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
