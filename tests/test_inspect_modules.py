"""analyze() on real modules: every kind of tie, and every way a tie breaks."""

from __future__ import annotations

import torch
from torch import nn

import tiecheck

from support.models import BertLikeMLM, FlatBufferModel, FusedQKV, TinyLM, WrongLinear


def codes(report):
    return sorted({f.code for f in report.findings})


def test_tied_lm(tiny_lm):
    r = tiecheck.analyze(tiny_lm)
    (g,) = r.tie_groups
    assert list(g.names) == ["embed.weight", "lm_head.weight"]
    assert g.kind == "same_parameter"
    assert g.bytes_saved == 64 * 16 * 4
    assert r.summary.params_unique == sum(p.numel() for p in tiny_lm.parameters())
    assert r.summary.params_counted == r.summary.params_unique + 64 * 16
    assert r.tie_candidates == ()
    assert r.exit_code("warning") == 0


def test_tie_broken_by_assign_is_an_untied_duplicate(untied_copy):
    assert untied_copy.lm_head.weight is not untied_copy.embed.weight
    r = tiecheck.analyze(untied_copy)
    assert r.tie_groups == ()
    dup = [d for d in r.untied_duplicates if not d.constant]
    assert [d.names for d in dup] == [("embed.weight", "lm_head.weight")]
    assert codes(r) == ["TC005"]  # one finding for the pair: the broken tie, not a TC006 as well
    assert r.exit_code("error") == 1
    cand = r.tie_candidates[0]
    assert cand.relation == "embedding-output"
    assert cand.bytes_saved == 64 * 16 * 4


def test_untied_lm_different_values_is_a_candidate_only():
    torch.manual_seed(0)
    m = TinyLM(tie=False)
    r = tiecheck.analyze(m)
    assert r.tie_groups == ()
    assert not [d for d in r.untied_duplicates if not d.constant]
    assert codes(r) == ["TC006"]


def test_bert_like_mlm_ties_weight_and_bias():
    r = tiecheck.analyze(BertLikeMLM())
    names = [list(g.names) for g in r.tie_groups]
    assert ["decoder.weight", "word_embeddings.weight"] in names
    assert ["bias", "decoder.bias"] in names
    assert all(g.kind == "same_parameter" for g in r.tie_groups)
    assert "TC001" not in codes(r)


def test_flat_buffer_model_has_no_ties():
    r = tiecheck.analyze(FlatBufferModel())
    assert r.tie_groups == ()
    assert codes(r) == []
    assert r.summary.params_unique == r.summary.params_counted == 32 + 8 + 24


def test_flat_buffer_registered_too_gives_nested_views():
    flat = torch.randn(16)
    m2 = nn.Module()
    m2.register_buffer("flat", flat)
    m2.p = nn.Parameter(flat[:8])
    r = tiecheck.analyze(m2)
    assert r.tie_groups == ()
    assert codes(r) == ["TC007"]
    assert r.summary.bytes_unique == 16 * 4


def test_fused_qkv_views_are_not_ties():
    r = tiecheck.analyze(FusedQKV())
    assert r.tie_groups == ()
    assert codes(r) == []


def test_distinct_parameters_over_one_storage():
    m = nn.Module()
    w = torch.randn(5, 3)
    m.a = nn.Parameter(w)
    m.b = nn.Parameter(w)  # a second Parameter object over the same memory
    r = tiecheck.analyze(m)
    (g,) = r.tie_groups
    assert g.kind == "distinct_parameters"
    assert "TC002" in codes(r)
    assert r.exit_code("error") == 1
    assert r.summary.training_bytes_saved == 15 * 4  # the weights only


def test_wrong_linear_snippet_is_flagged():
    r = tiecheck.analyze(WrongLinear())
    tc001 = [f for f in r.findings if f.code == "TC001"]
    assert len(tc001) == 1
    assert "in_features=100, out_features=16" in tc001[0].message
    assert "bias has 16 entries but the output has 100" in tc001[0].message
    assert r.exit_code("error") == 1


def test_transposed_alias_saved_in_a_state_dict(tmp_path):
    emb = torch.randn(32, 8)
    path = tmp_path / "t.pt"
    torch.save({"embed.weight": emb, "proj.weight": emb.t()}, path)
    r = tiecheck.analyze(str(path))
    (g,) = r.tie_groups
    assert g.kind == "transposed_alias"
    assert "TC008" in codes(r)


def test_tie_spanning_devices_is_flagged():
    # A device map that puts the head's bias elsewhere: the tied weight serves two devices.
    m = BertLikeMLM()
    m.decoder.bias = nn.Parameter(torch.zeros(50, device="meta"))
    r = tiecheck.analyze(m)
    assert "TC004" in codes(r)
    (f,) = [f for f in r.findings if f.code == "TC004"]
    assert "cpu" in f.message
    assert "meta" in f.message


def test_moving_one_side_of_a_tie_breaks_it():
    m = TinyLM()
    m.lm_head.to("meta")  # a new Parameter on the other device: no longer tied
    r = tiecheck.analyze(m)
    assert r.tie_groups == ()


def test_buffers_count_and_tie():
    m = nn.Module()
    b = torch.ones(4)
    m.register_buffer("x", b)
    sub = nn.Module()
    sub.register_buffer("y", b)
    m.sub = sub
    r = tiecheck.analyze(m)
    (g,) = r.tie_groups
    assert list(g.names) == ["sub.y", "x"]


def test_meta_device_ties_by_identity():
    with torch.device("meta"):
        m = TinyLM()
    r = tiecheck.analyze(m)
    (g,) = r.tie_groups
    assert g.kind == "same_parameter"
    assert r.content.ran is False


def test_report_is_stable_and_serialisable(tiny_lm):
    a = tiecheck.analyze(tiny_lm).to_json()
    b = tiecheck.analyze(tiny_lm).to_json()
    assert a == b
    frame = tiecheck.analyze(tiny_lm).to_frame()
    assert set(frame["name"]) >= {"embed.weight", "lm_head.weight"}
    assert frame.set_index("name").loc["lm_head.weight", "tied_with"] == ["embed.weight"]


def test_expect_tied_api(tiny_lm, untied_copy):
    assert tiecheck.analyze(tiny_lm, expect_tied=[("embed.weight", "lm_head.weight")]).exit_code("never") == 0
    r = tiecheck.analyze(untied_copy, expect_tied=[("embed.weight", "lm_head.weight")])
    assert r.exit_code("never") == 1
