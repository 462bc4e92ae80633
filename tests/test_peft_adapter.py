"""PEFT adapter folders as a target, and held against their base model's ties (--base)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import tiecheck
from tiecheck.cli import main

transformers = pytest.importorskip("transformers")

from support.hf import EMB, HEAD, D, V, tiny_llama  # noqa: E402

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")



pytestmark = pytest.mark.usefixtures("quiet_transformers")


def llama(tie: bool = True):
    return tiny_llama(tie)


def adapted(tie: bool = True, train: bool = True, **lora):
    """A tiny LoRA model on a tiny Llama; ``train`` moves the saved-whole copies and the LoRA factors."""
    lora = {"r": 2, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"], **lora}
    pm = peft.get_peft_model(llama(tie), peft.LoraConfig(**lora))
    if train:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n or "lora_B" in n:
                    p.add_(0.5)
    return pm


@pytest.fixture
def base(tmp_path):
    d = tmp_path / "base"
    llama(True).save_pretrained(d)
    return d


def save(pm, path):
    pm.save_pretrained(path)
    return path


def tc(r, code: str) -> list[dict]:
    return [f for f in r.findings if f.code == code]


def test_adapter_folder_is_a_target(tmp_path):
    d = save(adapted(), tmp_path / "adapter")
    r = tiecheck.analyze(str(d))
    assert r.source.format == "PEFT adapter (safetensors)"
    info = r.to_dict()["peft"]
    assert (info["peft_type"], info["target_modules"], info["modules_to_save"]) == ("LORA", ["q_proj"], ["lm_head"])
    assert info["full_copies"] == {HEAD: "base_model.model.lm_head.weight"}
    assert info["saved_modules"] == ["lm_head", "model.layers.0.self_attn.q_proj"]
    assert [(d.kind, d.value, d.file, d.key) for d in r.declared.declarations] == [
        ("peft_modules_to_save", ["lm_head"], "adapter_config.json", "modules_to_save"),
        ("peft_target_modules", ["q_proj"], "adapter_config.json", "target_modules")]
    assert any(f"stores 1 tensor whole ({HEAD}; {V * D * 4:,} bytes)" in n for n in r.source.notes)
    assert tc(r, "TC023") == []
    assert tc(r, "TC024") == []


def test_modules_to_save_on_a_tied_head_costs_a_copy_and_breaks_on_merge(tmp_path, base):
    d = save(adapted(), tmp_path / "adapter")
    r = tiecheck.analyze(str(d), base=str(base))
    (f,) = tc(r, "TC023")
    assert f.severity == "warning"
    assert list(f.names) == [HEAD, EMB]
    assert f.message.startswith(f"adapter_config.json modules_to_save saves {HEAD} whole ({V * D * 4:,} bytes), "
                                   f"but the base ties it to {EMB}")
    assert "differs from the base's (trained)" in f.message
    assert "TC015" in f.message
    assert r.to_dict()["peft"]["ties_touched"] == [{"names": [HEAD, EMB], "touched": HEAD, "how": "modules_to_save",
                                                   "bytes": V * D * 4, "equal_to_base": False,
                                                   "retied_by_peft": False}]
    res = CliRunner().invoke(main, ["inspect", str(d), "--base", str(base), "--no-flops"])
    assert res.exit_code == 0
    assert "TC023" in res.output
    assert CliRunner().invoke(main, ["inspect", str(d), "--base", str(base), "--no-flops",
                                     "--fail-on", "warning"]).exit_code == 1


def test_ensure_weight_tying_keeps_the_tie(tmp_path, base):
    d = save(adapted(ensure_weight_tying=True), tmp_path / "adapter")
    r = tiecheck.analyze(str(d), base=str(base))
    assert tc(r, "TC023") == []
    (row,) = r.to_dict()["peft"]["ties_touched"]
    assert row["retied_by_peft"] is True
    assert row["names"] == [HEAD, EMB]
    # peft saves both sides whole, with equal content: the adapter itself stores the tie twice.
    assert r.to_dict()["peft"]["full_copies"] == {HEAD: "base_model.model.lm_head.weight",
                                                  EMB: "base_model.model.model.embed_tokens.weight"}
    assert [list(d.names) for d in r.untied_duplicates] == [["base_model.model.lm_head.weight",
                                                          "base_model.model.model.embed_tokens.weight"]]


def test_untrained_copy_is_bytes_for_nothing(tmp_path, base):
    d = save(adapted(train=False), tmp_path / "adapter")
    (f,) = tc(tiecheck.analyze(str(d), base=str(base)), "TC023")
    assert "still equals the base's (untrained)" in f.message


def test_what_merge_and_unload_does_and_what_tiecheck_says_of_the_merged_model(tmp_path):
    pm = adapted()
    trained_head = pm.base_model.model.lm_head.modules_to_save["default"].weight.detach().clone()
    merged = pm.merge_and_unload()
    assert torch.equal(merged.lm_head.weight, trained_head)
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    # The installed peft turns the flag off; versions without that fix leave it on (peft#2777).
    assert merged.config.tie_word_embeddings is False
    fixed = tmp_path / "merged"
    merged.save_pretrained(fixed)
    r = tiecheck.analyze(str(fixed))
    assert tc(r, "TC015") == []
    assert r.tie_groups == ()
    merged.config.tie_word_embeddings = True  # as older peft left it
    stale = tmp_path / "stale"
    merged.save_pretrained(stale)
    # save_pretrained sees the flag and drops the head: save the two different tensors as older peft did.
    safetensors_torch.save_file({k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()},
              str(stale / "model.safetensors"), metadata={"format": "pt"})
    (f,) = tc(tiecheck.analyze(str(stale)), "TC015")
    assert list(f.names) == [HEAD, EMB]


def test_lora_on_a_tied_head_changes_the_embedding_on_merge(tmp_path, base):
    pm = adapted(target_modules=["lm_head"], modules_to_save=None)
    d = save(pm, tmp_path / "adapter")
    (f,) = tc(tiecheck.analyze(str(d), base=str(base)), "TC023")
    lora_bytes = (2 * D + V * 2) * 4
    assert f.message.startswith(f"adapter_config.json target_modules trains a LoRA delta for {HEAD} "
                                   f"({lora_bytes:,} bytes), but the base ties it to {EMB}")
    before = pm.base_model.model.model.embed_tokens.weight.detach().clone()
    merged = pm.merge_and_unload()
    assert not torch.equal(merged.model.embed_tokens.weight, before)  # the embedding took the head's delta
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


def test_untied_base_is_not_touched(tmp_path):
    untied = tmp_path / "untied"
    llama(False).save_pretrained(untied)
    d = save(adapted(tie=False), tmp_path / "adapter")
    r = tiecheck.analyze(str(d), base=str(untied))
    assert tc(r, "TC023") == []
    assert r.to_dict()["peft"]["ties_touched"] == []


def edit_config(d, **changes):
    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def test_config_naming_a_module_that_does_not_exist(tmp_path, base):
    d = save(adapted(), tmp_path / "adapter")
    edit_config(d, modules_to_save=["lm_head", "score"])
    (f,) = tc(tiecheck.analyze(str(d)), "TC024")
    assert f.severity == "error"
    assert "modules_to_save names 'score'" in f.message
    (f,) = tc(tiecheck.analyze(str(d), base=str(base)), "TC024")
    assert "the base model has no module named 'score'" in f.message
    assert CliRunner().invoke(main, ["inspect", str(d), "--no-flops"]).exit_code == 1


@pytest.mark.parametrize(("why", "edit", "expected"), [
    ("not json", lambda d: (d / "adapter_config.json").write_text("{"), "peft cannot read this adapter config"),
    ("no weights", lambda d: (d / "adapter_model.safetensors").unlink(), "without adapter_model.safetensors"),
])
def test_bad_adapter_folder_is_one_line(tmp_path, why, edit, expected):
    d = save(adapted(), tmp_path / "adapter")
    edit(d)
    before = sorted(p.name for p in d.iterdir())
    res = CliRunner().invoke(main, ["inspect", str(d), "--no-flops"])
    assert res.exit_code == 2, res.output
    (line,) = res.output.strip().splitlines()
    assert line.startswith("tiecheck: error: ")
    assert expected in line
    assert sorted(p.name for p in d.iterdir()) == before


def test_base_on_a_target_that_is_not_an_adapter(base):
    res = CliRunner().invoke(main, ["inspect", str(base), "--base", str(base), "--no-flops"])
    assert res.exit_code == 2
    (line,) = res.output.strip().splitlines()
    assert "--base holds a PEFT adapter folder" in line
