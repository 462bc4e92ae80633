"""A broken tie (a clone of the embedding as the output head) is an error, reported once, names sorted."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from torch import nn

from tiecheck import analyze
from tiecheck.cli import main

import support.models as tm

EMB, HEAD = "tok_emb.weight", "head.weight"


def _codes(report: dict) -> list[tuple[str, str]]:
    return [(f["code"], f["severity"]) for f in report["findings"]]


def test_a_cloned_head_fails_inspect_under_the_default_fail_on(tmp_path):
    path = tmp_path / "broken.pt"
    torch.save(tm.broken().state_dict(), path)
    res = CliRunner().invoke(main, ["inspect", str(path), "--format", "json"])
    assert res.exit_code == 1, res.output
    report = json.loads(res.output)
    # one finding for the pair: the duplicate, as an error; no TC006 for the same two names again
    assert _codes(report) == [("TC005", "error")]
    assert report["findings"][0]["names"] == [HEAD, EMB]
    # A state dict holds no config: the pair is known by its roles, and nothing is said to declare it.
    assert report["findings"][0]["message"].endswith(f"; {HEAD} and {EMB} are an input embedding and its output "
                                                     "projection, so this is a broken tie")
    assert report["tie_candidates"][0]["names"] == sorted([EMB, HEAD])


def test_a_duplicate_nothing_relates_is_info():
    # Equal weights that no declaration and no role relates (a deterministic initialisation, a copied layer)
    # are no broken tie: reported, but never a warning.
    model = tm.tied()
    with torch.no_grad():
        model.norms[0].weight.uniform_()
        model.norms[1].weight.copy_(model.norms[0].weight)
    r = analyze(model)
    assert [(f.code, f.severity) for f in r.findings] == [("TC005", "info")]
    assert r.exit_code("warning") == 0


def test_two_equal_embeddings_of_one_shape_stay_a_warning():
    # Embeddings of one shape are usually one tensor (a shared vocabulary): a copy is a warning.
    model = nn.ModuleDict({"src_embed": nn.Embedding(64, 16), "tgt_embed": nn.Embedding(64, 16)})
    with torch.no_grad():
        model["tgt_embed"].weight.copy_(model["src_embed"].weight)
    (f,) = analyze(model).findings
    assert (f.code, f.severity) == ("TC005", "warning")
    assert f.message.endswith("src_embed.weight and tgt_embed.weight are embeddings of one shape (a shared "
                                 "vocabulary is usually one tensor), so this is a broken tie or a wasted copy")


def test_a_config_that_declares_the_pair_untied_keeps_it_a_warning():
    model = tm.broken()
    model.config = type("Config", (), {"tie_word_embeddings": False})()
    r = analyze(model)
    assert [(f.code, f.severity) for f in r.findings] == [("TC005", "warning")]


def test_a_config_that_declares_the_pair_tied_is_named_as_the_declaration():
    model = tm.broken()
    model.config = type("Config", (), {"tie_word_embeddings": True})()
    (f,) = analyze(model).findings
    assert (f.code, f.severity) == ("TC005", "error")
    assert f.message.endswith(f"; the config (tie_word_embeddings=true) ties {HEAD} and {EMB} (input embedding "
                                 "and output projection), so this is a broken tie")


def test_untied_candidates_keep_their_info_finding_with_sorted_names():
    r = analyze(tm.untied())
    assert [(f.code, list(f.names)) for f in r.findings] == [("TC006", [HEAD, EMB])]
    assert list(r.tie_candidates[0].names) == [HEAD, EMB]
