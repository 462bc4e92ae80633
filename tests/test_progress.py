"""The progress bar on stderr (tiecheck/cli/progress.py): on a terminal only, never under CI,
never in the report."""

import io
import json

import pytest
import torch
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
    monkeypatch.setattr(progress_mod, "SHOW_AFTER", 0.0)
    assert inspect_cmd.command_progress is progress_mod.command_progress
    result = CliRunner().invoke(main, ["inspect", "gpt-mini", "--format", "json", "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["flops"]["available"]
    assert "counting FLOPs" in result.stderr
    assert "\r[" in result.stderr
    assert "\r[" not in result.stdout


def test_a_delayed_bar_stays_silent_for_a_quick_run(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    err = FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    bar = Progress(2, delay=60.0)
    bar(0, "starting")
    bar(1, "reading")
    bar.close()
    assert err.getvalue() == ""


def test_a_delayed_bar_shows_the_phase_still_running_when_the_delay_ends(monkeypatch):
    """An import that takes seconds makes no call of its own: the timer draws the phase under way."""
    monkeypatch.delenv("CI", raising=False)
    err = FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    bar = Progress(2, width=4, delay=0.05)
    bar(0, "starting (importing torch)")
    assert err.getvalue() == ""
    bar._timer.join(5)  # the delay ends while the phase is still under way
    assert err.getvalue() == "\r[....]   0% starting (importing torch)"
    bar(1, "reading")  # once shown, every call draws
    bar.close()
    assert "\r[##..]  50% reading" in err.getvalue()
    assert err.getvalue().endswith("\r")


@pytest.mark.parametrize("command", [["diff", "{a}", "{b}"], ["fix", "{a}", "--dry-run"], ["check", "{a}"],
                                     ["plan", "gpt-mini"], ["inspect", "{a}"]])
def test_every_command_that_reads_a_target_says_what_it_is_doing(command, tmp_path, monkeypatch):
    """diff, fix, check and plan printed nothing for seconds on a busy machine; on a terminal each
    now shows its phases, on stderr only, after the delay (none here)."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: True)
    monkeypatch.setattr(progress_mod, "SHOW_AFTER", 0.0)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"emb.weight": torch.ones(4, 2), "head.weight": torch.zeros(4, 2)}, a)
    torch.save({"emb.weight": torch.ones(4, 2)}, b)
    result = CliRunner().invoke(main, [c.format(a=a, b=b) for c in command])
    assert result.exit_code in (0, 1), result.output
    assert "\r[" in result.stderr
    assert "starting (importing torch)" in result.stderr
    assert "\r[" not in result.stdout
    assert result.stderr.endswith("\r")  # cleared before the report
