"""Errors in one line everywhere, with "did you mean" for bundled model names, keys, commands and options."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tiecheck.cli import main


def _error(args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert res.stdout == "", res.stderr
    assert res.stderr.count("\n") == 1, res.stderr  # one line, on stderr
    assert res.stderr.startswith("tiecheck: error: ")
    return res.stderr


def test_a_mistyped_bundled_model_is_suggested():
    assert "did you mean 'gpt-mini'?" in _error(["inspect", "gpt-minii"])


def test_bench_suggests_the_model_too():
    assert _error(["bench", "--model", "lama-mini"]).startswith(
        "tiecheck: error: --model lama-mini: unknown model; did you mean 'llama-mini'? (choose one of: ")


def test_a_target_like_nothing_gets_no_guess():
    assert "did you mean" not in _error(["inspect", "zzzzzz"])


@pytest.mark.parametrize(("args", "expected"), [
    (["inspct", "gpt-mini"], "Did you mean 'inspect'?"),
    (["inspect", "gpt-mini", "--seq-lenn", "3"], "Did you mean '--seq-len'?"),
    (["inspect", "gpt-mini", "--seq-len", "0"], "'--seq-len'"),
    (["bench", "--seq-len", "0"], "--seq-len 0: must be a positive integer"),
])
def test_usage_errors_are_one_line_on_every_command(args, expected):
    assert expected in _error(args)
