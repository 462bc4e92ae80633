"""`diff` and `check` understand declarations: a changed declaration is a diff line; a policy can
require the declared and physical layers to agree."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

import tiecheck
from tiecheck.cli import main
from tiecheck.compare.tie_diff import DeclarationChange, DeclaredTieChange

transformers = pytest.importorskip("transformers")

from support.hf import EMB, HEAD, tiny_llama  # noqa: E402

safetensors_torch = pytest.importorskip("safetensors.torch")



pytestmark = pytest.mark.usefixtures("quiet_transformers")


def llama(tie: bool):
    return tiny_llama(tie)


def folder(tmp_path, name: str, tie: bool, tensors: dict | None = None):
    """save_pretrained's folder, its weights replaced by ``tensors`` when given."""
    m = llama(tie)
    d = tmp_path / name
    m.save_pretrained(d)
    if tensors is not None:
        safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"),
                                    metadata={"format": "pt"})
    return d


def state(tie: bool, trained_head: bool = False) -> dict:
    sd = {k: v.detach().clone() for k, v in llama(tie).state_dict().items()}
    if trained_head:
        sd[HEAD] = sd[EMB] + 0.5
    return sd


@pytest.fixture
def merged_pair(tmp_path):
    """A tied base, and the same model after a merge that trained the head and set the flag false."""
    return folder(tmp_path, "base", tie=True), folder(tmp_path, "merged", tie=False, tensors=state(False, True))


def test_changed_declaration_is_a_diff_line(merged_pair):
    a, b = merged_pair
    d = tiecheck.diff(str(a), str(b))
    tie_rows = [c.to_dict() for c in d.declared_changed if isinstance(c, DeclaredTieChange)]
    assert tie_rows == [{"what": "tie", "names": [HEAD, EMB],
                         "a": {"declared": "tied", "by": ["config.json tie_word_embeddings (LlamaConfig)",
                                                          "LlamaForCausalLM._tied_weights_keys"],
                               "physical": "tied", "stored": "one copy"},
                         "b": {"declared": "untied", "by": ["config.json tie_word_embeddings (LlamaConfig)"],
                               "physical": "separate, different", "stored": "two different copies"}}]
    keys = {(c.kind, c.key): (c.a, c.b, c.where) for c in d.declared_changed if isinstance(c, DeclarationChange)}
    assert keys[("tie_word_embeddings", "tie_word_embeddings")] == (True, False, "both")
    assert d.to_dict()["summary"]["declared_changed"] == len(d.declared_changed)
    res = CliRunner().invoke(main, ["diff", str(a), str(b)])
    assert res.exit_code == 1  # the tie itself was lost
    assert "Declarations that changed (2)" in res.output
    assert [x.split() for x in res.output.splitlines() if x.startswith("tie_word_embeddings")] == \
        [["tie_word_embeddings", "true", "false"]]
    js = json.loads(CliRunner().invoke(main, ["diff", str(a), str(b), "--format", "json"]).output)
    assert js["declared_changed"] == [c.to_dict() for c in d.declared_changed]


def test_unchanged_declarations_make_no_line(tmp_path):
    a, b = folder(tmp_path, "a", tie=True), folder(tmp_path, "b", tie=True)
    d = tiecheck.diff(str(a), str(b))
    assert d.declared_changed == ()
    assert d.exit_code == 0
    assert "Declarations that changed" not in CliRunner().invoke(main, ["diff", str(a), str(b)]).output


def test_alias_map_only_on_one_side(tmp_path):
    m = llama(True)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    safetensors_torch.save_model(m, str(a))
    safetensors_torch.save_file({k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}, str(b))
    d = tiecheck.diff(str(a), str(b))
    decl = [c for c in d.declared_changed if isinstance(c, DeclarationChange)]
    assert decl == [DeclarationChange("alias_map", "__metadata__", {EMB: HEAD}, None, "A only")]
    (tie,) = [c for c in d.declared_changed if isinstance(c, DeclaredTieChange)]
    assert tie.a.declared is True
    assert tie.b is None


def pyproject(tmp_path, body: str):
    p = tmp_path / "pyproject.toml"
    p.write_text("[tool.tiecheck]\n" + body)
    return p


@pytest.fixture
def stored_twice(tmp_path):
    """Declared tied and stored as two equal copies: TC016, a warning."""
    return folder(tmp_path, "twice", tie=True, tensors=state(True))


def test_declared_agrees_fails_a_warning_that_fail_on_error_lets_pass(tmp_path, stored_twice):
    r = tiecheck.analyze(str(stored_twice))
    assert [f.code for f in r.findings if f.code.startswith("TC01")] == ["TC016"]
    target = f'[[tool.tiecheck.targets]]\ntarget = "{stored_twice.name}"\n'
    loose = pyproject(tmp_path, target)
    res = CliRunner().invoke(main, ["check", "--config", str(loose)])
    assert res.exit_code == 0, res.output
    strict = pyproject(tmp_path, "declared-agrees = true\n" + target)
    res = CliRunner().invoke(main, ["check", "--config", str(strict)])
    assert res.exit_code == 1, res.output
    assert "FAILED" in res.output
    assert "TC016" in res.output
    github = CliRunner().invoke(main, ["check", "--config", str(strict), "--format", "github"]).output
    # A warning made failing by the policy is an error annotation on the file that states the rule.
    (line,) = [x for x in github.splitlines() if x.startswith("::")]
    assert line.startswith(f"::error file={os.path.relpath(strict)},title=TC016::")
    # The same from the command line.
    res = CliRunner().invoke(main, ["check", "--no-config", str(stored_twice), "--declared-agrees"])
    assert res.exit_code == 1
    assert "TC016" in res.output
    res = CliRunner().invoke(main, ["check", "--no-config", str(stored_twice)])
    assert res.exit_code == 0, res.output


def test_declared_agrees_per_target_and_a_bad_value(tmp_path, stored_twice):
    body = f'[[tool.tiecheck.targets]]\ntarget = "{stored_twice.name}"\ndeclared-agrees = true\n'
    assert CliRunner().invoke(main, ["check", "--config", str(pyproject(tmp_path, body))]).exit_code == 1
    bad = pyproject(tmp_path, 'declared-agrees = "yes"\n')
    res = CliRunner().invoke(main, ["check", "--config", str(bad)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"tiecheck: error: {bad} [tool.tiecheck]: 'declared-agrees' must be "
                                               f"true or false"]


def test_declared_agrees_passes_an_agreeing_target(tmp_path):
    d = folder(tmp_path, "good", tie=True)
    res = CliRunner().invoke(main, ["check", "--no-config", str(d), "--declared-agrees"])
    assert res.exit_code == 0, res.output
