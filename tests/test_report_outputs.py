"""Every report the commands print stays byte for byte what it was (tests/support/report_zoo.py).

The files under tests/fixtures/reports/ were written by the code before the report became one typed
data model; the zoo runs every case again (``inspect`` in its four formats over the bundled models,
the transformers architectures of test_zoo.py in three forms and a target for each declared,
stored and content finding; ``diff``, ``fix --dry-run`` and ``check`` in theirs) and each output
must equal its file. A deliberate change of an output writes the files again (the module's
docstring says how) in the same commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiecheck.report import Report

from support import report_zoo

FIXTURES = Path(__file__).parent / "fixtures" / "reports"
CASES = list(report_zoo.cases())

pytestmark = pytest.mark.usefixtures("quiet_transformers")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, tuple[int, str]]:
    root = tmp_path_factory.mktemp("zoo")
    report_zoo.build_targets(root)
    return report_zoo.run_cases(root)


def test_every_case_has_its_file_and_every_file_its_case():
    names = {report_zoo.file_name(c) for c in CASES}
    assert len(names) == len(CASES), "two cases write one file"
    assert names == {p.name for p in FIXTURES.iterdir()}


@pytest.mark.parametrize("case", CASES)
def test_output_equals_the_file(outputs, case):
    want = (FIXTURES / report_zoo.file_name(case)).read_text(encoding="utf-8")
    got = report_zoo.as_file(*outputs[case])
    assert got == want, f"{case}: the output differs from tests/fixtures/reports/{report_zoo.file_name(case)}"


INSPECT_JSON = sorted(p.name for p in FIXTURES.glob("inspect--*.json"))


@pytest.mark.parametrize("name", INSPECT_JSON)
def test_a_saved_report_reads_back_byte_for_byte(name):
    """``Report.from_dict`` rebuilds the typed report from its JSON, and ``to_json`` writes the same bytes:
    a saved report (``diff`` against one, snapshots) is the report, not a lossy copy of it."""
    text = (FIXTURES / name).read_text(encoding="utf-8").rsplit("[exit ", 1)[0].rstrip("\n")
    report = Report.from_dict(json.loads(text))
    assert report.to_json().rstrip("\n") == text  # the file adds the exit code after the JSON's last line
    assert all(isinstance(f.code, str) for f in report.findings)  # typed: attributes, not dict keys
