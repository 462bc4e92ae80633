"""``tiecheck.fix()`` as a library call: what it refuses before reading, the phases it reports, and
what a dry run promises (nothing written, whatever the output path)."""

from __future__ import annotations

import pytest
import torch

from tiecheck.errors import TiecheckError
from tiecheck.repair import fix

from support.checkpoints import write_safetensors


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
