"""``tiecheck.fix()`` as a library call: what it refuses before reading, the phases it reports, and
what a dry run promises (nothing written, whatever the output path)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import tiecheck.repair as repair
from tiecheck.errors import TiecheckError
from tiecheck.repair import fix
from tiecheck.repair.actions import parse_tie, parse_untie

from support.checkpoints import llama_config, llama_tensors, write_safetensors


def _clone_head(tmp_path):
    torch.manual_seed(0)
    emb = torch.randn(16, 4)
    return write_safetensors(tmp_path / "in.safetensors", {"tok_emb.weight": emb, "head.weight": emb.clone(),
                                                          "ln.weight": torch.ones(4)})


def test_a_run_reports_each_phase_as_it_starts(tmp_path):
    src = _clone_head(tmp_path)
    out = tmp_path / "out.safetensors"
    calls = []
    assert fix(src, out, progress=lambda n, label: calls.append((n, label))).verified
    assert calls == [(0, f"reading {src}"), (1, "analysing 3 tensors"), (1, "planning"), (1, f"writing {out}"),
                     (1, "verifying the copy")]
    calls.clear()
    result = fix(src, tmp_path / "other.safetensors", dry_run=True, progress=lambda n, label: calls.append((n, label)))
    assert calls == [(0, f"reading {src}"), (1, "analysing 3 tensors"), (1, "planning")]
    assert (result.dry_run, result.verified, result.exit_code(), result.checks) == (True, False, 0, [])
    assert result.to_dict()["verified"] is False
    assert not (tmp_path / "other.safetensors").exists()


def test_a_dry_run_takes_any_output_path_and_writes_nothing(tmp_path):
    """Nothing is written, so an output the real run would refuse (the input itself) is no reason to refuse."""
    src = _clone_head(tmp_path)
    before = src.read_bytes()
    result = fix(src, src, dry_run=True, tie=[("head.weight", "tok_emb.weight")])
    assert [a.names for a in result.plan.actions] == [("head.weight", "tok_emb.weight")]
    assert result.output == str(src)
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


@pytest.mark.parametrize(("args", "message"), [
    ({"output": None}, "give the corrected copy a path with -o OUTPUT"),
    ({"target": "missing.safetensors"}, "missing.safetensors: no such file or folder"),
])
def test_what_fix_refuses_before_reading(tmp_path, args, message):
    src = _clone_head(tmp_path)
    kwargs = {"target": src, "output": tmp_path / "out.safetensors", **args}
    if args.get("target"):
        kwargs["target"] = tmp_path / args["target"]
    with pytest.raises(TiecheckError, match=message):
        fix(kwargs.pop("target"), **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_pairs_are_taken_as_strings_or_as_pairs(tmp_path):
    src = _clone_head(tmp_path)
    as_text = fix(src, dry_run=True, tie=["head.weight=tok_emb.weight"]).plan.to_dict()
    as_pair = fix(src, dry_run=True, tie=[["head.weight", "tok_emb.weight"]]).plan.to_dict()
    assert as_text == as_pair
    assert [a["action"] for a in as_text["actions"]] == ["tie"]


@pytest.mark.parametrize("left", ["file", "folder"])
def test_a_temporary_output_left_under_this_runs_own_pid_is_replaced(tmp_path, left):
    """A dead run whose PID this process now has left its temporary output: clear_stale leaves
    names of this PID alone (they could be this run's), so fix clears its own name before writing."""
    src = _clone_head(tmp_path)
    out = tmp_path / "out.safetensors"
    stale = tmp_path / f".out.safetensors.tiecheck-tmp-{os.getpid()}"
    if left == "folder":
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"half written")
    else:
        stale.write_bytes(b"half written")
    assert fix(src, out).verified
    assert not os.path.lexists(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.safetensors", "out.safetensors",
                                                                 ".out.safetensors.fixed-by-tiecheck"])


def test_a_copy_that_fails_a_check_is_exit_code_1_and_not_published(tmp_path, monkeypatch):
    """The writer leaves the head's first byte flipped: the byte check fails, and the result says so."""
    src = _clone_head(tmp_path)
    out = tmp_path / "out.safetensors"
    real_write = repair.write

    def flipping_write(plan, path, weights, tmp, **kwargs):
        real_write(plan, path, weights, tmp, **kwargs)
        raw = bytearray(tmp.read_bytes())
        raw[-1] ^= 0xFF  # the last tensor's last byte
        tmp.write_bytes(bytes(raw))

    monkeypatch.setitem(vars(repair), "write", flipping_write)
    result = fix(src, out)
    assert (result.verified, result.exit_code(), result.output) == (False, 1, None)
    assert not out.exists()


@pytest.mark.parametrize(("value", "message"), [
    ("lm_head.weight", "write DROPPED=KEPT"), ("=b", "write DROPPED=KEPT"), ("a=", "write DROPPED=KEPT"),
    ("a=b=c", "write DROPPED=KEPT"), (" a = a ", "the two names are the same"),
])
def test_a_tie_that_is_not_two_different_names_is_refused(value, message):
    with pytest.raises(TiecheckError, match=message):
        parse_tie(value)


@pytest.mark.parametrize("value", ["a", "a,b,c", "a,", ",b", "a, a"])
def test_an_untie_that_is_not_two_different_names_is_refused(value):
    with pytest.raises(TiecheckError, match="write two different names separated by a comma"):
        parse_untie(value)


def test_a_pair_is_read_with_its_spaces_trimmed():
    assert parse_tie(" head.weight = emb.weight ") == ("head.weight", "emb.weight")
    assert parse_untie(" head.weight , emb.weight ") == ("head.weight", "emb.weight")


def _llama_folder(tmp_path, tie: bool, head: torch.Tensor | None = None):
    folder = tmp_path / "llama"
    folder.mkdir()
    cfg = llama_config()
    cfg["tie_word_embeddings"] = tie
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = llama_tensors()
    if head is not None:
        tensors["lm_head.weight"] = head
    write_safetensors(folder / "model.safetensors", tensors)
    return folder


def test_a_tie_onto_a_name_the_files_do_not_store_is_refused(tmp_path):
    folder = _llama_folder(tmp_path, tie=True)  # lm_head.weight: filled by transformers, not stored
    with pytest.raises(TiecheckError, match=r"the files do not store lm_head\.weight; keep a stored name"):
        fix(folder, dry_run=True, tie=["model.embed_tokens.weight=lm_head.weight"])


def test_a_tie_already_made_is_said_and_planned_as_nothing(tmp_path):
    folder = _llama_folder(tmp_path, tie=True)
    plan = fix(folder, dry_run=True, tie=["lm_head.weight=model.embed_tokens.weight"]).plan
    assert plan.actions == []
    assert "--tie lm_head.weight=model.embed_tokens.weight: already tied" in plan.unanswered


def test_a_tie_in_a_folder_sets_the_declaration_and_takes_only_the_declared_pair(tmp_path):
    torch.manual_seed(1)
    folder = _llama_folder(tmp_path, tie=False, head=torch.randn(16, 8))
    plan = fix(folder, dry_run=True, tie=["lm_head.weight=model.embed_tokens.weight"]).plan
    assert plan.config == {"tie_word_embeddings": True}
    assert plan.drop == {"lm_head.weight": "model.embed_tokens.weight"}
    with pytest.raises(TiecheckError, match="transformers fills only the names its architecture ties"):
        fix(folder, dry_run=True, tie=["model.embed_tokens.weight=lm_head.weight"])


def test_a_broken_tie_is_explained_as_one(tmp_path):
    (action,) = fix(_clone_head(tmp_path), dry_run=True).plan.actions
    assert action.detail.startswith("store tok_emb.weight once: head.weight, its output projection, holds equal "
                                    "bytes and becomes its alias")


@pytest.mark.parametrize(("pair", "message"), [
    ("head.wieght,tok_emb.weight", r"--untie: 'head\.wieght' is not a tensor of the target"),
    ("head.weight,tok_emb.wieght", r"--untie: 'tok_emb\.wieght' is not a tensor of the target"),
    ("head.weight,ln.weight", "they are not tied in the target; nothing to untie"),
])
def test_an_untie_of_names_the_target_does_not_tie_is_refused(tmp_path, pair, message):
    with pytest.raises(TiecheckError, match=message):
        fix(_clone_head(tmp_path), dry_run=True, untie=[pair])
