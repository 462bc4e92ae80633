"""Every report the commands print stays byte for byte what it was (tests/support/report_zoo.py).

The files under tests/fixtures/reports/ were written by the code before the report became one typed
data model; the zoo runs every case again (``inspect`` in its four formats over the bundled models,
the transformers architectures of test_zoo.py in three forms and a target for each declared,
stored and content finding; ``diff``, ``fix --dry-run`` and ``check`` in theirs) and each output
must equal its file. A deliberate change of an output writes the files again (the module's
docstring says how) in the same commit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
