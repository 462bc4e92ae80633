"""`tiecheck check` through Click's runner: snapshots, each policy form, the GitHub format, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tiecheck.cli import main
from tiecheck.cli.check import annotation

import support.models as tm
from support.models import EMB, HEAD

RETIE = "model.tie_weights() or assign the Parameter again (model.head.weight = model.tok_emb.weight)"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with the models as a spec file, a .git marker (the policy search stops there), cwd in it."""
    root = tmp_path / "repo"
    (root / ".git").mkdir(parents=True)
    shutil.copy(tm.__file__, root / "lm.py")
    monkeypatch.chdir(root)
    return root


def run(*args: str):
    result = CliRunner().invoke(main, ["check", *args])
    return result.exit_code, result.stdout, result.stderr


def write_policy(root: Path, body: str) -> None:
    (root / "pyproject.toml").write_text('[project]\nname = "demo"\n\n' + body)


# -- --expect and --update --------------------------------------------------------------------------

def test_expect_update_then_check(project):
    code, out, err = run("lm.py:tied", "--expect", "ties.json")
    assert code == 2
    assert not out
    assert err.strip() == ("tiecheck: error: lm.py:tied: no snapshot ties.json yet: rerun the same command with "
                           "--update to write it, then commit it")
    assert not (project / "ties.json").exists()

    code, out, err = run("lm.py:tied", "--expect", "ties.json", "--update")
    assert code == 0, err
    assert out == ("lm.py:tied: ok (1 tie group; snapshot created ties.json)\n"
                   "tiecheck check: 1 target checked, 1 snapshot written\n")
    assert json.loads((project / "ties.json").read_text())["tie_groups"] == [
        {"names": [HEAD, EMB], "kind": "same_parameter"}]

    code, out, _ = run("lm.py:tied", "--expect", "ties.json")
    assert (code, out) == (0, "lm.py:tied: ok (1 tie group; they match ties.json)\n")

    code, out, _ = run("lm.py:broken", "--expect", "ties.json")
    assert code == 1
    assert out.startswith("lm.py:broken: FAILED (0 tie groups; they differ from ties.json)\n"
                          f"  error   TC009 expected {HEAD}, {EMB} to be tied (ties.json): {HEAD} shares memory "
                          f"with nothing (equal values to {EMB} in separate memory)")
    assert RETIE in out
    assert "error   TC005" in out  # the embedding and its head hold equal copies: a broken tie, an error


def test_update_rewrites_only_when_ties_change(project):
    assert run("lm.py:tied", "--expect", "ties.json", "--update")[0] == 0
    before = (project / "ties.json").read_bytes()
    code, out, _ = run("lm.py:tied", "--expect", "ties.json", "--update")
    assert code == 0
    assert "snapshot unchanged ties.json" in out
    assert "0 snapshots written" in out
    assert (project / "ties.json").read_bytes() == before
    code, out, _ = run("lm.py:untied", "--expect", "ties.json", "--update")
    assert code == 0
    assert "snapshot updated ties.json" in out
    assert json.loads((project / "ties.json").read_text())["tie_groups"] == []


def test_update_says_what_it_changes_as_a_snapshot_diff(project):
    assert run("lm.py:tied", "--expect", "ties.json", "--update")[0] == 0
    code, out, _ = run("lm.py:untied", "--expect", "ties.json", "--update")
    assert (code, out) == (0, "lm.py:untied: ok (0 tie groups; snapshot updated ties.json)\n"
                              f"  ties.json: removes tie group {HEAD} = {EMB} (same_parameter)\n"
                              "tiecheck check: 1 target checked, 1 snapshot written\n")
    code, out, _ = run("lm.py:tied", "--expect", "ties.json", "--update")
    assert code == 0
    assert f"  ties.json: adds tie group {HEAD} = {EMB} (same_parameter)\n" in out
    # One memory under two Parameter objects: the same names, another kind (an error it must accept).
    code, out, _ = run("lm.py:distinct", "--expect", "ties.json", "--update", "--accept-errors")
    assert code == 1
    assert (f"  ties.json: changes tie group {HEAD} = {EMB}: kind same_parameter -> "
                          "distinct_parameters\n") in out
    code, out, _ = run("lm.py:untied", "--expect", "ties.json", "--update", "--format", "json")
    [target] = json.loads(out)["targets"]
    assert target["snapshot_changes"] == [{"change": "removes", "names": [HEAD, EMB], "kind": "distinct_parameters"}]
    code, out, _ = run("lm.py:tied", "--expect", "ties.json", "--update", "--format", "github")
    assert (f"::notice file=ties.json,title=tiecheck snapshot::lm.py:tied: ties.json adds tie group {HEAD} = {EMB} "
            "(same_parameter)\n") in out
    code, out, _ = run("lm.py:tied", "--expect", "ties.json", "--update")  # unchanged: no diff
    assert out == ("lm.py:tied: ok (1 tie group; snapshot unchanged ties.json)\n"
                   "tiecheck check: 1 target checked, 0 snapshots written\n")


def test_update_over_an_unreadable_snapshot_says_it_replaces_it(project):
    (project / "ties.json").write_text("{not json")
    code, out, _ = run("lm.py:tied", "--expect", "ties.json", "--update")
    assert code == 0
    assert ("  ties.json: replaces a snapshot it could not read (not valid JSON (line 1, column 2: Expecting "
            "property name enclosed in double quotes))\n") in out


def test_inspect_json_is_accepted_as_expectation(project):
    result = CliRunner().invoke(main, ["inspect", "lm.py:tied", "--format", "json", "-o", "report.json"])
    assert result.exit_code == 0, result.stderr
    assert run("lm.py:tied", "--expect", "report.json")[0] == 0
    assert run("lm.py:broken", "--expect", "report.json")[0] == 1


def test_checkpoint_file_matches_module_snapshot(project):
    torch.save({"model": tm.tied().state_dict()}, project / "ckpt.pt")
    assert run("lm.py:tied", "--expect", "ties.json", "--update")[0] == 0
    code, out, err = run("ckpt.pt", "--expect", "ties.json")
    assert code == 0, out + err  # shared_storage (file) matches same_parameter (module)


def test_update_never_writes_over_the_target(project):
    torch.save(tm.tied().state_dict(), project / "model.pt")
    before = (project / "model.pt").read_bytes()
    code, _, err = run("model.pt", "--expect", "model.pt", "--update")
    assert code == 2
    assert "refusing to write the snapshot to model.pt: it is the input" in err
    assert (project / "model.pt").read_bytes() == before


def test_update_never_writes_over_a_spec_file(project):
    before = (project / "lm.py").read_bytes()
    code, _, err = run("lm.py:tied", "--expect", "lm.py", "--update")
    assert code == 2
    assert "refusing to write the snapshot to lm.py" in err
    assert (project / "lm.py").read_bytes() == before


def test_expect_tied_option_and_fail_on(project):
    code, out, _ = run("lm.py:broken", "--expect-tied", f"{EMB},{HEAD}")
    assert code == 1
    assert "TC009" in out
    assert RETIE in out
    # The embedding and its head hold equal copies: the architecture's tie is broken, an error.
    code, out, _ = run("lm.py:broken")
    assert code == 1
    assert "error   TC005" in out


@pytest.mark.parametrize(("args", "why"), [
    (["--update"], "nothing to check"),
    (["lm.py:tied", "--update"], "--update writes the snapshot named by --expect FILE"),
    (["lm.py:tied", "lm.py:broken", "--expect", "x.json"], "--expect compares one target"),
    (["lm.py:tied", "--expect-tied", EMB], "give at least two comma-separated names"),
    (["lm.py:tied", "--config", "pyproject.toml", "--no-config"], "contradict"),
])
def test_usage_errors_exit_2(project, args, why):
    code, _out, err = run(*args)
    assert code == 2
    assert why in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_snapshot_exits_2_and_names_it(project):
    (project / "ties.json").write_text('{"tie_groups": 3}')
    code, _, err = run("lm.py:tied", "--expect", "ties.json")
    assert code == 2
    assert err.startswith("tiecheck: error: lm.py:tied: ties.json: not a tiecheck snapshot")


# -- [tool.tiecheck] ------------------------------------------------------------------------------------

POLICY = '''[tool.tiecheck]
fail-on = "warning"

[[tool.tiecheck.targets]]
target = "lm.py:tied"
expect = "snapshots/lm.json"

[[tool.tiecheck.targets]]
target = "lm.py:broken"
tied = [["tok_emb.weight", "head.weight"]]
fail-on = "error"

[[tool.tiecheck.targets]]
target = "lm.py:untied"
not-tied = [["tok_emb.weight", "head.weight"], ["norms.0.weight"]]
'''


def test_policy_forms_from_a_subfolder(project, monkeypatch):
    write_policy(project, POLICY)
    (project / "src" / "deep").mkdir(parents=True)
    monkeypatch.chdir(project / "src" / "deep")  # paths in the policy stay relative to pyproject.toml

    code, _, err = run()
    assert code == 2
    assert "no snapshot ../../snapshots/lm.json yet" in err

    code, out, err = run("--update")
    assert code == 1, err  # snapshot written; lm.py:broken still fails its `tied` rule
    assert (project / "snapshots" / "lm.json").exists()
    lines = out.splitlines()
    assert lines[0] == "lm.py:tied: ok (1 tie group; snapshot created ../../snapshots/lm.json)"
    assert lines[1] == "lm.py:broken: FAILED (0 tie groups)"
    assert f"expected {EMB}, {HEAD} to be tied: {EMB} shares memory with nothing" in lines[2]
    assert "lm.py:untied: ok (0 tie groups)" in lines
    assert lines[-1] == "tiecheck check: 3 targets checked, 1 snapshot written, 1 failed"

    # One target by name picks its policy entry; a spec reached another way is the same entry.
    assert run("lm.py:tied")[0] == 0
    assert run("../../lm.py:broken")[0] == 1
    assert run("lm.py:untied")[0] == 0  # fail-on warning globally, and it has no warnings


def test_policy_not_tied_and_global_fail_on(project):
    write_policy(project, '''[tool.tiecheck]
fail-on = "warning"

[[tool.tiecheck.targets]]
target = "lm.py:tied"
not-tied = [["tok_emb.weight", "head.weight"]]

[[tool.tiecheck.targets]]
target = "lm.py:broken"
''')
    code, out, _ = run()
    assert code == 1
    assert f"TC013 expected {EMB}, {HEAD} not to be tied: {HEAD}, {EMB} share memory (same_parameter)" in out
    assert "lm.py:broken: FAILED" in out
    assert "error   TC005" in out
    code, out, _ = run("lm.py:broken", "--fail-on", "never")  # the command line wins
    assert code == 0
    assert "lm.py:broken: ok" in out


def test_policy_key_and_cli_target_outside_policy(project):
    torch.save({"model": tm.broken().state_dict(), "optimizer": {}}, project / "ckpt.pt")
    write_policy(project, '''[tool.tiecheck]
[[tool.tiecheck.targets]]
target = "ckpt.pt"
key = "model"
tied = [["tok_emb.weight", "head.weight"]]
''')
    code, out, _ = run()
    assert code == 1
    assert "TC009" in out
    # A target the policy does not list still gets the global fail-on (default error): clean.
    assert run("lm.py:untied")[0] == 0


def test_config_option_and_no_config(project, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "pyproject.toml"
    other.write_text(f'[tool.tiecheck]\nfail-on = "warning"\n[[tool.tiecheck.targets]]\ntarget = "{project}/lm.py:broken"\n')
    code, out, _ = run("--config", str(other))
    assert code == 1
    assert "TC005" in out
    write_policy(project, POLICY)
    code, _, err = run("--no-config")
    assert code == 2
    assert "nothing to check" in err
    code, _, err = run("--config", str(project / "lm.py"))
    assert code == 2
    assert "invalid TOML" in err


def test_policy_search_stops_at_the_repository_root(project, monkeypatch):
    write_policy(project.parent, POLICY)  # above the .git folder: not this project's file
    code, _, err = run()
    assert code == 2
    assert "no pyproject.toml with [tool.tiecheck] was found" in err


@pytest.mark.parametrize(("body", "why"), [
    ('[tool.tiecheck]\nfail_on = "warning"\n', "unknown key 'fail_on' (did you mean 'fail-on'?)"),
    ('[tool.tiecheck]\nfail-on = "fatal"\n', "fail-on = 'fatal'; choose one of: error, warning, never"),
    ('[tool.tiecheck]\n[[tool.tiecheck.targets]]\nexpect = "x.json"\n', "'target' is required"),
    ('[tool.tiecheck]\n[[tool.tiecheck.targets]]\ntarget = "lm.py:tied"\ntied = ["a", "b"]\n',
     "expected a list of lists of two or more tensor names"),
    ('[tool.tiecheck]\n[[tool.tiecheck.targets]]\ntarget = "lm.py:tied"\nexpected = "x.json"\n',
     "unknown key 'expected' (did you mean 'expect'?)"),
    ('[tool.tiecheck\n', "invalid TOML"),
])
def test_bad_policy_exits_2_with_one_line(project, body, why):
    write_policy(project, body)
    code, _out, err = run()
    assert code == 2
    assert why in err
    assert err.count("\n") == 1
    assert "pyproject.toml" in err


def test_not_tied_with_unknown_name_is_an_input_error(project):
    write_policy(project, '[tool.tiecheck]\n[[tool.tiecheck.targets]]\ntarget = "lm.py:tied"\n'
                          'not-tied = [["tok_emb.wieght", "head.weight"]]\n')
    code, _, err = run()
    assert code == 2
    assert "tok_emb.wieght is not in the target (did you mean tok_emb.weight?)" in err


def test_one_bad_target_does_not_stop_the_others(project):
    (project / "empty.pt").touch()
    code, out, err = run("empty.pt", "lm.py:broken", "--expect-tied", f"{EMB},{HEAD}")
    assert code == 2  # an input error outranks a failed check
    assert "lm.py:broken: FAILED" in out
    assert "tiecheck: error: empty.pt: the file is empty" in err
    assert out.splitlines()[-1] == "tiecheck check: 2 targets checked, 1 failed, 1 could not be checked"


# -- output formats ---------------------------------------------------------------------------------------

def test_github_annotations(project):
    write_policy(project, POLICY)
    assert run("--update")[0] == 1
    (project / "empty.pt").touch()
    code, out, _ = run("lm.py:broken", "--expect", "snapshots/lm.json", "--format", "github")
    assert code == 1
    lines = out.splitlines()
    # The policy's TC009 points at pyproject.toml, the snapshot's at the snapshot; newlines are escaped.
    assert lines[0].startswith(f"::error file=pyproject.toml,title=TC009::lm.py:broken: expected {EMB}, {HEAD} to be tied:")
    assert lines[1].startswith(f"::error file=snapshots/lm.json,title=TC009::lm.py:broken: expected {HEAD}, {EMB} "
                               f"to be tied (snapshots/lm.json): ")
    assert "%0Ahint: they hold equal values in separate memory" in lines[1]
    assert lines[2].startswith(f"::error title=TC005::lm.py:broken: {HEAD}, {EMB} hold equal float32")
    assert lines[-1] == "tiecheck check: 1 target checked, 1 failed"
    # A rule from the command line has no file to point at.
    code, out, _ = run("lm.py:broken", "--no-config", "--expect-tied", f"{EMB},{HEAD}", "--format", "github")
    assert code == 1
    assert out.startswith(f"::error title=TC009::lm.py:broken: expected {EMB}, {HEAD} to be tied:")
    code, out, _err = run("empty.pt", "--format", "github")
    assert code == 2
    assert out.splitlines()[0] == "::error title=tiecheck::empty.pt: the file is empty"


def test_github_escapes_workflow_command_syntax():
    assert annotation("error", "TC009", "50% done\nnext", "a,b:c.json") == \
        "::error file=a%2Cb%3Ac.json,title=TC009::50%25 done%0Anext"


def test_json_format(project):
    code, out, _ = run("lm.py:broken", "--expect-tied", f"{EMB},{HEAD}", "--format", "json")
    assert code == 1
    (target,) = json.loads(out)["targets"]
    assert target["target"] == "lm.py:broken"
    assert target["status"] == "failed"
    assert [f["code"] for f in target["failing"]] == ["TC009", "TC005"]
    assert [f["code"] for f in target["warnings"]] == []


def test_inspect_expect_tied_hint_names_the_cause(project):
    result = CliRunner().invoke(main, ["inspect", "lm.py:broken", "--expect-tied", f"{EMB},{HEAD}"])
    assert result.exit_code == 1
    assert "TC009 expected tok_emb.weight, head.weight to be tied" in result.stdout
    assert RETIE in result.stdout
