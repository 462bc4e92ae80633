"""Running the CLI in tests: what a refused input must look like to a user."""

from __future__ import annotations

from click.testing import CliRunner

from tiecheck.cli import main


def inspect_error(path) -> str:
    """``tiecheck inspect PATH`` refused as bad input: exit code 2 and one ``tiecheck: error:`` line,
    never a traceback. Returns that line."""
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("tiecheck: error: ")
    assert "Traceback" not in res.output
    return lines[0]
