"""``tiecheck fix`` answers what ``inspect`` calls a broken tie, and names the command for the rest.

As a user met it: a bare ``torch.save`` state dict whose head is a clone of the embedding is a
TC005 error in ``inspect``; ``fix`` printed "nothing to fix" and wrote an unchanged copy.
"""

from __future__ import annotations

import json
import shlex

import torch
from click.testing import CliRunner
from safetensors import safe_open

import tiecheck
from tiecheck.cli.main import main

from support.checkpoints import write_safetensors, write_sharded


def _state(clone_head: bool = True) -> dict:
    torch.manual_seed(0)
    emb = torch.randn(64, 16)
    return {"tok_emb.weight": emb, "head.weight": emb.clone() if clone_head else torch.randn(64, 16),
            "blocks.0.w": torch.randn(16, 16), "ln.weight": torch.ones(16)}


def _codes(target) -> list[tuple[str, str, list[str]]]:
    return [(f.code, f.severity, list(f.names)) for f in tiecheck.analyze(target).findings]


def _cli(*args: str):
    return CliRunner().invoke(main, ["fix", *map(str, args)])


def test_a_cloned_head_in_a_torch_save_file_is_retied(tmp_path):
    src = tmp_path / "broken.pt"
    torch.save(_state(), src)
    assert ("TC005", "error", ["head.weight", "tok_emb.weight"]) in _codes(src)
    out = tmp_path / "fixed.pt"
    r = _cli(src, "-o", out)
    assert r.exit_code == 0, r.output
    assert "nothing to fix" not in r.output
    assert "retie" in r.output
    assert "pass  findings answered: 1 answered (TC005), none remains" in r.output
    loaded = torch.load(out, weights_only=True)
    # One storage under both names (nothing lost: the bytes were equal), and no finding left.
    assert loaded["head.weight"].data_ptr() == loaded["tok_emb.weight"].data_ptr()
    assert torch.equal(loaded["head.weight"], _state()["tok_emb.weight"])
    assert [c for c in _codes(out) if c[1] != "info"] == []


def test_a_cloned_head_in_a_safetensors_file_becomes_an_alias(tmp_path):
    src = write_safetensors(tmp_path / "broken.safetensors", _state())
    out = tmp_path / "fixed.safetensors"
    result = tiecheck.fix(src, out)
    (action,) = result.plan.actions
    assert (action.kind, action.why, action.names) == ("retie", "TC005", ("head.weight", "tok_emb.weight"))
    assert action.disk_saved == 64 * 16 * 4
    assert action.lost is None
    assert result.verified
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"head.weight": "tok_emb.weight"}
        assert "head.weight" not in f.keys()  # noqa: SIM118 - safe_open has keys(), no __contains__


def test_every_finding_left_is_listed_with_the_command_that_answers_it(tmp_path):
    state = _state(clone_head=False)
    state["blocks.1.w"] = state["blocks.0.w"].clone()  # equal copies nothing declares one tensor
    src = write_safetensors(tmp_path / "copies.safetensors", state)
    out = tmp_path / "out.safetensors"
    r = _cli(src, "-o", out, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "nothing to fix" in r.output
    assert "not answered:" in r.output
    command = f"tiecheck fix {src} -o {out} --tie blocks.1.w=blocks.0.w"
    assert "TC005 blocks.0.w, blocks.1.w: equal copies that nothing declares one tensor" in r.output
    assert command in r.output
    # The untied embedding and head (TC006, info) can be answered by a tie too, on the user's word.
    assert ("TC006 head.weight, tok_emb.weight: untied, with different values: tying makes one hold the other's"
            in r.output)
    assert f"tiecheck fix {src} -o {out} --tie head.weight=tok_emb.weight" in r.output
    # The command it names answers the finding, and the check counts it.
    r = _cli(*shlex.split(command)[2:])
    assert r.exit_code == 0, r.output
    assert "pass  findings answered: 1 answered (TC005), none remains" in r.output
    assert "TC005 blocks" not in r.output.split("checks:")[0].split("not answered:")[-1]


def test_info_findings_no_tie_answers_are_counted_in_one_line(tmp_path):
    flat = torch.arange(64.0)
    src = tmp_path / "nested.pt"
    torch.save({"flat": flat, "w": flat[:16].view(4, 4)}, src)  # a view inside another tensor: TC007, info
    r = _cli(src, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "not answered:\n  1 info finding (TC007): observations with nothing to repair" in r.output


def test_tie_counts_the_findings_it_answers(tmp_path):
    state = _state(clone_head=False)
    src = write_safetensors(tmp_path / "untied.safetensors", state)
    result = tiecheck.fix(src, tmp_path / "out.safetensors", tie=["head.weight=tok_emb.weight"])
    (action,) = result.plan.actions
    assert action.kind == "tie"
    assert action.answers == (("TC006", frozenset({"head.weight", "tok_emb.weight"})),)
    doc = result.to_dict()
    assert doc["plan"]["actions"][0]["answers"] == ["TC006 head.weight, tok_emb.weight"]
    checks = {c["check"]: c for c in doc["checks"]}
    assert checks["findings answered"]["ok"]
    assert not checks["findings answered"]["skipped"]
    assert checks["findings answered"]["detail"] == "1 answered (TC006), none remains"


def test_a_broken_tie_across_shards_is_listed_with_why(tmp_path):
    index = write_sharded(tmp_path / "shards", _state())
    r = _cli(index, "--dry-run", "--format", "json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)["plan"]
    assert plan["actions"] == []
    (line,) = [u for u in plan["unanswered"] if u.startswith("TC005")]
    assert "head.weight, tok_emb.weight" in line
    assert "no alias that loaders restore across shards" in line


def test_a_retie_in_a_training_checkpoint_still_asks_about_optimizer_state(tmp_path):
    src = tmp_path / "ckpt.pt"
    torch.save({"model": _state(), "optimizer": {"state": {0: {"step": 1}}}}, src)
    r = _cli(src, "-o", tmp_path / "out.pt")
    assert r.exit_code == 2
    assert "--drop-optimizer" in r.output
    r = _cli(src, "-o", tmp_path / "out.pt", "--drop-optimizer")
    assert r.exit_code == 0, r.output
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(loaded) == {"model"}
    assert loaded["model"]["head.weight"].data_ptr() == loaded["model"]["tok_emb.weight"].data_ptr()
