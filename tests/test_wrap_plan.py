"""`tiecheck plan`: FSDP2 wrap plans replayed on the meta device, checked against torch's own fully_shard."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from torch import nn
from torch.distributed.fsdp import fully_shard

from tiecheck import analyze, models
from tiecheck.cli.main import main
from tiecheck.errors import TiecheckError
from tiecheck.plan.wrap import Unit, apply_plan, block_paths, check_plan, torch_refuses_shared_params, units_from

SPLIT = ["transformer.wte", "lm_head", ""]
REFUSED = ("ValueError: Parameter 'lm_head.weight' is shared with a parameter already managed by another FSDP group")


def meta_gpt():
    return models.build("gpt-mini", tied=True, device="meta", n_layer=2)


class SharedBlockLM(nn.Module):
    """Two blocks sharing one Linear (ALBERT-style), plus an embedding tied to the head."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(4, 4)
        self.embed = nn.Embedding(8, 4)
        self.layers = nn.ModuleList([nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared, nn.ReLU())])
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight


def test_blocks_policy_units_and_ties_left_to_the_root():
    m = meta_gpt()
    assert block_paths(m) == ["transformer.h.0", "transformer.h.1"]
    c = check_plan(m, "blocks")
    assert [u.paths for u in c.units] == [("transformer.h.0",), ("transformer.h.1",), ("",)]
    assert c.accepted
    assert c.error is None
    assert c.fix is None
    assert c.owner["lm_head.weight"] == c.owner["transformer.wte.weight"] == 2


def test_split_embedding_and_head_is_refused_and_fixed_by_one_grouped_call():
    c = check_plan(meta_gpt(), "split", units=units_from(SPLIT))
    assert not c.accepted
    assert c.error == REFUSED
    assert [s.names for s in c.straddles] == [("transformer.wte.weight", "lm_head.weight")]
    assert [u.call() for u in c.fix] == ["fully_shard([model.transformer.wte, model.lm_head])", "fully_shard(model)"]
    assert check_plan(meta_gpt(), "fixed", units=c.fix).accepted


def test_shared_submodule_across_blocks_straddles_and_without_root_is_unsafe():
    c = check_plan(SharedBlockLM(), "blocks")
    assert sorted(s.names for s in c.straddles) == [("layers.0.0.bias", "layers.1.0.bias"),
                                                   ("layers.0.0.weight", "layers.1.0.weight")]
    assert [u.call() for u in c.fix] == ["fully_shard([model.layers[0], model.layers[1]])", "fully_shard(model)"]
    no_root = check_plan(SharedBlockLM(), "x", units=units_from(["embed", "head"]))
    assert not no_root.accepted
    assert no_root.error is None
    assert any("root is not a unit" in n for n in no_root.notes)
    assert [u.call() for u in no_root.fix] == ["fully_shard([model.embed, model.head])"]


def test_bad_plans_are_one_line_errors():
    with pytest.raises(TiecheckError, match="no module 'nope'"):
        check_plan(meta_gpt(), "x", units=[Unit(("nope",))])
    with pytest.raises(TiecheckError, match="given to fully_shard twice"):
        check_plan(meta_gpt(), "x", units=units_from(["lm_head", "lm_head"]))
    with pytest.raises(TiecheckError, match="choose blocks, none"):
        check_plan(meta_gpt(), "everything")


def test_cli_exit_codes_and_json(tmp_path):
    spec = tmp_path / "policy.py"
    spec.write_text(f"def split(model):\n    return {SPLIT!r}\n")
    runner = CliRunner()
    ok = runner.invoke(main, ["plan", "gpt-mini"])
    assert ok.exit_code == 0
    assert "accepted" in ok.output
    bad = runner.invoke(main, ["plan", "gpt-mini", "--wrap", f"{spec}:split", "--format", "json"])
    assert bad.exit_code == 1
    doc = json.loads(bad.output)
    assert doc["error"] == REFUSED
    assert doc["fix"][0] == "fully_shard([model.transformer.wte, model.lm_head])"
    # The verdict is the running torch's: refused where it has the duplicate check, a silent split where not.
    assert doc["torch"] == torch.__version__
    assert doc["refused_at_first_forward"] == torch_refuses_shared_params()
    text = runner.invoke(main, ["plan", "gpt-mini", "--wrap", f"{spec}:split"]).output
    verdict = next(line for line in text.splitlines() if line.startswith("verdict:"))
    assert verdict.startswith("verdict: refused at the first forward" if torch_refuses_shared_params() else
                              "verdict: trains the tie as separate shards without an error"), verdict
    assert runner.invoke(main, ["plan", "gpt-mini", "--wrap", "zzz"]).exit_code == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tc025(model):
    return [f for f in analyze(model).findings if f.code == "TC025"]


def test_prediction_matches_torch_fully_shard_in_a_one_rank_gloo_group(one_rank_group):
    """The replay against the running torch: a torch with the duplicate-parameter check refuses exactly the
    plans the planner finds straddling; a torch without it (2.11) trains those ties as two sets of shards."""
    refuses = torch_refuses_shared_params()
    for plan in (SPLIT, ["transformer.h.0", "transformer.h.1", ""], [["transformer.wte", "lm_head"], ""]):
        model = models.build("gpt-mini", tied=True, device="cpu", n_layer=2)
        units = units_from(plan)
        predicted = check_plan(model, "x", units=units)
        assert predicted.refused == (refuses and predicted.error is not None)
        assert predicted.torch_version == torch.__version__
        apply_plan(model, units, fully_shard)
        # inspect on the wrapped module, before any forward: the units and the shards' values, no torch record
        tc025 = _tc025(model)
        assert [f.names for f in tc025] == (
            [("lm_head.weight", "transformer.wte.weight")] if predicted.error else [])
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        idx = torch.randint(0, 100, (1, 8))
        try:
            model(idx, targets=idx).loss.backward()
            opt.step()
            real = None
        except ValueError as e:
            real = f"ValueError: {e}"
        if predicted.error is None:
            assert real is None, plan
            assert model.transformer.wte.weight is model.lm_head.weight, plan
            continue
        message = tc025[0].message
        if refuses:
            assert real is not None, plan
            assert real.startswith(predicted.error), plan
            assert predicted.verdict().startswith("refused at the first forward")
            assert "refuses the model" in message
        else:
            # What the verdict says: no error, and the two halves of the tie trained apart.
            assert real is None, plan
            wte, head = model.transformer.wte.weight, model.lm_head.weight
            assert wte is not head
            assert not torch.equal(wte.to_local(), head.to_local())
            assert predicted.verdict().startswith("trains the tie as separate shards without an error")
            assert "trains the copies apart without an error" in message


def test_a_declared_tie_split_by_fully_shard_is_found_after_training_too(one_rank_group, quiet_transformers):
    """transformers' own declaration names the tie, so TC025 holds once the split copies have moved apart."""
    import transformers  # noqa: PLC0415 - the test's subject, an optional extra

    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     tie_word_embeddings=True)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    apply_plan(model, units_from(["transformer.wte", "lm_head", ""]), fully_shard)
    found = _tc025(model)
    assert [f.names for f in found] == [("lm_head.weight", "transformer.wte.weight")]
    assert "declared tied by the model" in found[0].message
    if torch_refuses_shared_params():
        return  # refused at the first forward: the copies never move apart
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # what a training step does to the head's own copy
    assert [f.names for f in _tc025(model)] == [("lm_head.weight", "transformer.wte.weight")]


def test_equal_values_of_an_untied_model_in_one_unit_are_no_finding(one_rank_group):
    """Copies in one unit are not a split tie, and constant tensors (LayerNorm ones) are no evidence."""
    model = models.build("gpt-mini", tied=False, device="cpu", n_layer=2)  # the head starts as a copy
    apply_plan(model, units_from(["transformer.h.0", "transformer.h.1", ""]), fully_shard)
    assert _tc025(model) == []
