"""The progress bar on stderr (tiecheck/cli/progress.py): on a terminal only, never under CI,
never in the report."""

import io
import json

from click.testing import CliRunner

import tiecheck
from tiecheck.cli import inspect as inspect_cmd
from tiecheck.cli import progress as progress_mod
from tiecheck.cli.main import main
from tiecheck.cli.progress import Progress, on_terminal


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_draws_phases_and_clears_on_a_terminal(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    err = FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    assert on_terminal()
    bar = Progress(3, width=6)
    assert bar.enabled
    tiecheck.analyze("gpt-mini", flops=True, seq_len=16, progress=bar)
    drawn = err.getvalue()
    bar.close()
    # meta weights: no content pass to announce; each line padded over the longer one before it
    assert drawn == ("\r[......]   0% reading the target"
                     "\r[##....]  33% analysing 53 tensors"
                     "\r[####..]  67% checking ties       "
                     "\r[####..]  67% counting FLOPs (tracing the model)"
                     "\r[######] 100% done" + " " * 30)
    last = drawn.rsplit("\r", 1)[-1]
    assert err.getvalue()[len(drawn):] == "\r" + " " * (len(last) + 1) + "\r"  # the padding cleared too


def test_ci_disables_the_bar(monkeypatch):
    err = FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    for value in ("true", "1", "yes"):
        monkeypatch.setenv("CI", value)
        assert not on_terminal()
        bar = Progress(2)
        assert not bar.enabled
        bar(1, "reading")
        bar.close()
    monkeypatch.setenv("CI", "false")
    assert on_terminal()
    assert err.getvalue() == ""


def test_not_a_terminal_no_bar(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not on_terminal()


def test_forced_bar_stays_out_of_json_output(monkeypatch):
    # the bar forced on inside the command: stdout still parses as JSON, the bar went to stderr
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: True)
    assert inspect_cmd.Progress is Progress
    result = CliRunner().invoke(main, ["inspect", "gpt-mini", "--format", "json", "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["flops"]["available"]
    assert "counting FLOPs" in result.stderr and "\r[" in result.stderr
    assert "\r[" not in result.stdout
