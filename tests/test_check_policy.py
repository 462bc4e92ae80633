"""``[tool.tiecheck]`` read directly (``tiecheck.check.policy``): each key's values and defaults,
each bad table's one-line message, paths made absolute against the pyproject.toml's folder, the
search for the file, and a command-line target matched to its entry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiecheck.check.policy import (
    Policy,
    PolicyError,
    TargetPolicy,
    canonical,
    find_pyproject,
    load_policy,
    parse_policy,
    resolve_target,
    with_overrides,
)

PY = Path("/proj/pyproject.toml")


def _parse(table: dict) -> Policy:
    return parse_policy(table, PY)


def test_an_empty_table_is_the_defaults():
    p = _parse({})
    assert p == Policy(path=PY, fail_on="error", targets=(), declared_agrees=False, ignore=())


def test_every_key_of_a_target_is_read():
    p = _parse({"fail-on": "warning", "declared-agrees": True, "ignore": [" TC006 "], "targets": [
        {"target": "m.safetensors", "expect": "ties/m.json", "tied": [["a", "b", "c"]], "not-tied": [["d"]],
         "fail-on": "never", "key": "model", "trust-pickle": True, "trust-remote-code": True,
         "declared-agrees": False, "ignore": ["TC005:*.rotary_emb.*", "TC006"]}]})
    assert (p.fail_on, p.declared_agrees, p.ignore) == ("warning", True, ("TC006",))
    (t,) = p.targets
    assert t == TargetPolicy(target="m.safetensors", resolved="/proj/m.safetensors", expect=Path("/proj/ties/m.json"),
                             tied=(("a", "b", "c"),), not_tied=(("d",),), fail_on="never", key="model",
                             trust_pickle=True, trust_remote_code=True, source=PY, declared_agrees=False,
                             ignore=("TC006", "TC005:*.rotary_emb.*"))


def test_a_target_built_without_a_policy_fails_on_errors_only():
    # What a library caller gets from TargetPolicy(target, resolved): check's defaults, declared-agrees off.
    t = TargetPolicy(target="m", resolved="m")
    assert (t.fail_on, t.declared_agrees, t.ignore, t.trust_pickle, t.trust_remote_code) == \
        ("error", False, (), False, False)


def test_a_target_takes_the_global_settings_it_does_not_set():
    (t,) = _parse({"fail-on": "warning", "declared-agrees": True, "ignore": ["TC006"],
                   "targets": [{"target": "m.pt"}]}).targets
    assert (t.fail_on, t.declared_agrees, t.ignore, t.expect, t.key) == ("warning", True, ("TC006",), None, None)
    assert (t.trust_pickle, t.trust_remote_code, t.tied, t.not_tied) == (False, False, (), ())


@pytest.mark.parametrize(("table", "why"), [
    ([], "/proj/pyproject.toml [tool.tiecheck]: expected a table"),
    ({"fail_on": "x"}, "/proj/pyproject.toml [tool.tiecheck]: unknown key 'fail_on' (did you mean 'fail-on'?)"),
    ({"zzz": 1}, "/proj/pyproject.toml [tool.tiecheck]: unknown key 'zzz'; known keys: fail-on, declared-agrees, "
                 "ignore, targets"),
    ({"fail-on": "fatal"}, "/proj/pyproject.toml [tool.tiecheck]: fail-on = 'fatal'; choose one of: error, warning, "
                           "never"),
    ({"declared-agrees": "yes"}, "/proj/pyproject.toml [tool.tiecheck]: 'declared-agrees' must be true or false"),
    ({"ignore": "TC006"}, "/proj/pyproject.toml [tool.tiecheck]: ignore = 'TC006'; expected a list such as "
                          "[\"TC005\", \"TC005:*.rotary_emb.*\"]"),
    ({"targets": {"target": "m"}}, "/proj/pyproject.toml [tool.tiecheck]: 'targets' must be an array of tables: "
                                   "[[tool.tiecheck.targets]]"),
    ({"targets": ["m"]}, "/proj/pyproject.toml [[tool.tiecheck.targets]] #1: expected a table with at least 'target'"),
    ({"targets": [{"target": "m"}, {}]}, "/proj/pyproject.toml [[tool.tiecheck.targets]] #2: 'target' is required: "
                                         "a path, a bundled model name or a file.py:factory spec"),
    ({"targets": [{"target": "  "}]}, "'target' is required"),
    ({"targets": [{"target": 3}]}, "'target' is required"),
    ({"targets": [{"target": "m", "expect": ""}]},
     "/proj/pyproject.toml target 'm': 'expect' must be the path of a snapshot file"),
    ({"targets": [{"target": "m", "expect": 1}]}, "'expect' must be the path of a snapshot file"),
    ({"targets": [{"target": "m", "key": 1}]}, "/proj/pyproject.toml target 'm': 'key' must be a string"),
    ({"targets": [{"target": "m", "trust-pickle": 1}]}, "target 'm': 'trust-pickle' must be true or false"),
    ({"targets": [{"target": "m", "trust-remote-code": "no"}]}, "'trust-remote-code' must be true or false"),
    ({"targets": [{"target": "m", "declared-agrees": 0}]}, "'declared-agrees' must be true or false"),
    ({"targets": [{"target": "m", "tied": [["a"]]}]},
     "/proj/pyproject.toml target 'm': tied: expected a list of lists of two or more tensor names, e.g. "
     "[[\"tok_emb.weight\", \"head.weight\"]]"),
    ({"targets": [{"target": "m", "tied": "a"}]}, "tied: expected a list of lists of two or more"),
    ({"targets": [{"target": "m", "tied": [["a", ""]]}]}, "tied: expected a list of lists of two or more"),
    ({"targets": [{"target": "m", "tied": [["a", 1]]}]}, "tied: expected a list of lists of two or more"),
    ({"targets": [{"target": "m", "tied": [("a", "b"), "ab"]}]}, "tied: expected a list of lists of two or more"),
    ({"targets": [{"target": "m", "not-tied": [[]]}]},
     "target 'm': not-tied: expected a list of lists of one or more tensor names"),
    ({"targets": [{"target": "m", "fail-on": "all"}]}, "target 'm': fail-on = 'all'; choose one of"),
    ({"targets": [{"target": "m", "ignore": ["TC00X"]}]}, "target 'm': ignore: "),
    ({"targets": [{"target": "m", "expected": "x"}]},
     "/proj/pyproject.toml [[tool.tiecheck.targets]] #1: unknown key 'expected' (did you mean 'expect'?)"),
])
def test_each_bad_table_is_one_line_that_names_where(table, why):
    with pytest.raises(PolicyError) as e:
        _parse(table)
    assert why in str(e.value)
    assert "\n" not in str(e.value)


def test_a_bad_ignore_entry_is_named():
    with pytest.raises(PolicyError, match=r"^/proj/pyproject.toml \[tool.tiecheck\]: ignore: "):
        _parse({"ignore": ["TC005:"]})


def test_a_targets_ignore_adds_to_the_global_list_once():
    (t,) = _parse({"ignore": ["TC006", "TC005"], "targets": [{"target": "m", "ignore": ["TC005", "TC010"]}]}).targets
    assert t.ignore == ("TC006", "TC005", "TC010")


@pytest.mark.parametrize(("target", "resolved"), [
    ("/abs/m.safetensors", "/abs/m.safetensors"),
    ("models/m.py:build", "/proj/models/m.py:build"),
    ("m.py:build", "/proj/m.py:build"),
    ("pkg.models:build", "pkg.models:build"),  # imported by name
    ("sub/ckpt", "/proj/sub/ckpt"),  # looks like a path: resolved even when missing
    ("runs/a:b.pt", "/proj/runs/a:b.pt"),  # a colon in a path is no module:factory spec
    ("ckpt.pt", "/proj/ckpt.pt"),
    ("gpt2-tiny", "gpt2-tiny"),  # a bundled model name
])
def test_a_target_is_resolved_against_the_policys_folder(target, resolved):
    assert resolve_target(target, Path("/proj")) == resolved


def test_an_existing_file_without_a_suffix_is_resolved(tmp_path):
    (tmp_path / "weights").write_bytes(b"")
    assert resolve_target("weights", tmp_path) == str(tmp_path / "weights")
    assert resolve_target("absent", tmp_path) == "absent"


def test_one_spelling_per_file_or_spec(tmp_path):
    (tmp_path / "m.py").write_text("")
    (tmp_path / "sub").mkdir()
    spec = f"{tmp_path}/sub/../m.py:build"
    assert canonical(spec) == f"{os.path.realpath(tmp_path / 'm.py')}:build"
    assert canonical(str(tmp_path / "sub" / ".." / "m.py")) == os.path.realpath(tmp_path / "m.py")
    assert canonical("gpt2-tiny") == "gpt2-tiny"
    assert canonical("pkg.models:build") == "pkg.models:build"


def test_a_command_line_target_finds_its_entry(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text("")
    (tmp_path / "sub").mkdir()
    policy = parse_policy({"targets": [{"target": "m.py:build"}, {"target": "gpt2-tiny"}]},
                          tmp_path / "pyproject.toml")
    monkeypatch.chdir(tmp_path / "sub")
    assert policy.find("m.py:build").target == "m.py:build"  # as written
    assert policy.find("../m.py:build").target == "m.py:build"  # the same file from here
    assert policy.find("gpt2-tiny").target == "gpt2-tiny"
    assert policy.find("../m.py:other") is None
    assert policy.find("other-model") is None


def test_a_target_outside_the_policy_gets_its_global_settings():
    policy = _parse({"fail-on": "warning", "declared-agrees": True, "ignore": ["TC006"]})
    assert policy.default_for("x.pt") == TargetPolicy(target="x.pt", resolved="x.pt", fail_on="warning",
                                                       declared_agrees=True, ignore=("TC006",))


def test_command_line_options_override_only_what_they_set():
    t = TargetPolicy(target="m", resolved="m", fail_on="warning", key="model")
    assert with_overrides(t, fail_on=None, key=None) == t
    assert with_overrides(t, fail_on="never", key=None) == TargetPolicy(target="m", resolved="m", fail_on="never",
                                                                         key="model")


def _write(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(body)
    return folder / "pyproject.toml"


def test_the_search_takes_the_nearest_file_with_a_table_up_to_the_repository_root(tmp_path):
    root = tmp_path / "repo"
    (root / ".git").mkdir(parents=True)
    top = _write(root, '[tool.tiecheck]\nfail-on = "warning"\n')
    _write(root / "pkg", '[project]\nname = "pkg"\n')  # no [tool.tiecheck]: passed over
    deep = root / "pkg" / "src"
    deep.mkdir()
    assert find_pyproject(deep) == top
    inner = _write(root / "pkg" / "src", '[tool.tiecheck]\n')
    assert find_pyproject(deep) == inner
    # Above the repository root nothing is taken, and a folder holding no file finds none.
    _write(tmp_path, '[tool.tiecheck]\n')
    (root / "pyproject.toml").unlink()
    assert find_pyproject(root / "pkg") is None


def test_a_file_is_loaded_with_its_table_or_refused(tmp_path):
    path = _write(tmp_path, '[tool.tiecheck]\nfail-on = "never"\n')
    assert load_policy(path).fail_on == "never"
    bare = _write(tmp_path / "bare", '[project]\nname = "x"\n')
    assert load_policy(bare) == Policy(path=bare)
    with pytest.raises(PolicyError, match=r"bare/pyproject.toml: no \[tool.tiecheck\] table$"):
        load_policy(bare, required=True)
    with pytest.raises(PolicyError, match=r"cannot read \(No such file or directory\)$"):
        load_policy(tmp_path / "missing.toml")
    bad = _write(tmp_path / "bad", "[tool.tiecheck\n")
    with pytest.raises(PolicyError, match=r"bad/pyproject.toml: invalid TOML: "):
        load_policy(bad)
