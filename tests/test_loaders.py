"""Every torch.save file kind, round-tripped, and every bad input."""

from __future__ import annotations

import os
import pickle
import textwrap

import pytest
import torch

import tiecheck
from tiecheck.errors import TargetError, UntrustedPickleError

from support.models import TinyLM


@pytest.fixture
def sd(tiny_lm):
    return tiny_lm.state_dict()


def tied_names(report):
    return [list(g.names) for g in report.tie_groups]


def test_plain_state_dict_keeps_ties(tmp_path, sd):
    path = tmp_path / "model.pt"
    torch.save(sd, path)
    r = tiecheck.analyze(str(path))
    assert tied_names(r) == [["embed.weight", "lm_head.weight"]]
    assert r.source.format == "torch.save state dict"
    assert r.source.key is None


def test_hf_style_bin_any_extension(tmp_path, sd):
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    other = tmp_path / "weights.ckpt-final"
    torch.save(sd, other)
    for p in (path, other):
        assert tied_names(tiecheck.analyze(str(p))) == [["embed.weight", "lm_head.weight"]]


def test_training_checkpoint_picks_model_and_says_which_key(tmp_path, tiny_lm, sd):
    opt = torch.optim.AdamW(tiny_lm.parameters())
    tiny_lm(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    path = tmp_path / "step_1000.pt"
    torch.save({"model": sd, "optimizer": opt.state_dict(), "step": 1000}, path)
    r = tiecheck.analyze(str(path))
    assert r.source.key == "model"
    assert "training checkpoint" in r.source.format
    assert tied_names(r) == [["embed.weight", "lm_head.weight"]]
    assert not any("exp_avg" in t.name for t in r.tensors)


def test_lightning_checkpoint(tmp_path, sd):
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "optimizer_states": [{}], "epoch": 3,
                "global_step": 10}, path)
    r = tiecheck.analyze(str(path))
    assert r.source.key == "state_dict"
    assert tied_names(r) == [["model.embed.weight", "model.lm_head.weight"]]


def test_ddp_and_compile_prefixes_are_stripped(tmp_path, sd):
    path = tmp_path / "ddp.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, path)
    r = tiecheck.analyze(str(path))
    assert tied_names(r) == [["embed.weight", "lm_head.weight"]]
    assert any("'module.'" in n and "'_orig_mod.'" in n for n in r.source.notes)


def test_key_option_chooses_and_errors_list_keys(tmp_path, sd):
    path = tmp_path / "two.pt"
    torch.save({"ema": sd, "weights": {k: v.clone() for k, v in sd.items()}}, path)
    assert tiecheck.analyze(str(path), key="weights").source.key == "weights"
    assert tiecheck.analyze(str(path)).source.key == "ema"
    with pytest.raises(TargetError, match=r"no key 'nope'.*ema, weights"):
        tiecheck.analyze(str(path), key="nope")


def test_legacy_format_loads_without_mmap(tmp_path, sd):
    path = tmp_path / "legacy.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    r = tiecheck.analyze(str(path))
    assert tied_names(r) == [["embed.weight", "lm_head.weight"]]
    assert any("legacy" in n for n in r.source.notes)


def test_pickled_module_refused_then_trusted(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(TinyLM(), path)
    with pytest.raises(UntrustedPickleError, match="--trust-pickle") as e:
        tiecheck.analyze(str(path))
    assert "TinyLM" in str(e.value) or "conftest" in str(e.value)
    r = tiecheck.analyze(str(path), trust_pickle=True)
    assert r.tie_groups[0].kind == "same_parameter"
    assert "pickled nn.Module" in r.source.format


def test_folder_with_one_weight_file(tmp_path, sd):
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "README.txt").write_text("hello")
    r = tiecheck.analyze(str(tmp_path))
    assert tied_names(r) == [["embed.weight", "lm_head.weight"]]


def test_python_specs(tmp_path, monkeypatch):
    (tmp_path / "helper_mod.py").write_text("D = 8\n")
    (tmp_path / "mymodel.py").write_text(textwrap.dedent("""
        from torch import nn
        import helper_mod
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(10, helper_mod.D)
                self.head = nn.Linear(helper_mod.D, 10, bias=False)
                self.head.weight = self.emb.weight
        def build():
            return Net()
        instance = Net()
        def broken():
            raise RuntimeError("no GPU here")
        def not_a_module():
            return 42
        number = 3
    """))
    for attr in ("build", "Net", "instance"):
        r = tiecheck.analyze(f"{tmp_path}/mymodel.py:{attr}")
        assert tied_names(r) == [["emb.weight", "head.weight"]], attr
        assert r.source.format == "python spec"
    monkeypatch.chdir(tmp_path)  # a module spec is looked up in the current folder, as `python -m` does
    assert tied_names(tiecheck.analyze("mymodel:build")) == [["emb.weight", "head.weight"]]
    with pytest.raises(TargetError, match="raised RuntimeError: no GPU here"):
        tiecheck.analyze(f"{tmp_path}/mymodel.py:broken")
    with pytest.raises(TargetError, match=r"returned int, not a torch\.nn\.Module"):
        tiecheck.analyze(f"{tmp_path}/mymodel.py:not_a_module")
    with pytest.raises(TargetError, match="names a int"):
        tiecheck.analyze(f"{tmp_path}/mymodel.py:number")
    with pytest.raises(TargetError, match="has no attribute 'missing'"):
        tiecheck.analyze(f"{tmp_path}/mymodel.py:missing")
    (tmp_path / "bad.py").write_text("import does_not_exist_anywhere\n")
    with pytest.raises(TargetError, match="ModuleNotFoundError"):
        tiecheck.analyze(f"{tmp_path}/bad.py:f")
    with pytest.raises(TargetError, match="cannot import module 'no_such_pkg_xyz'"):
        tiecheck.analyze("no_such_pkg_xyz:build")


def test_path_wins_over_bundled_name(tmp_path, sd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(sd, tmp_path / "gpt-mini")
    r = tiecheck.analyze("gpt-mini")
    assert r.source.format == "torch.save state dict"


def test_state_dict_and_checkpoint_objects_in_python(sd):
    assert tied_names(tiecheck.analyze(dict(sd))) == [["embed.weight", "lm_head.weight"]]
    r = tiecheck.analyze({"model": sd, "step": 3})
    assert r.source.key == "model"


@pytest.mark.parametrize(("make", "match"), [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "holds no weight files"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: p.write_bytes(os.urandom(4096)), "not a recognised checkpoint|not a readable torch.save"),
    (lambda p: p.write_bytes(pickle.dumps([1, 2, 3], protocol=2)), "not a readable|holds a list"),
])
def test_bad_inputs(tmp_path, make, match):
    p = tmp_path / "target"
    make(p)
    with pytest.raises(TargetError, match=match):
        tiecheck.analyze(str(p))


def test_truncated_file(tmp_path, sd):
    good = tmp_path / "good.pt"
    torch.save(sd, good)
    data = good.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(TargetError, match=r"truncated or corrupt|not a readable"):
            tiecheck.analyze(str(bad))


def test_checkpoint_that_is_not_a_model(tmp_path):
    p = tmp_path / "numbers.pt"
    torch.save({"step": 3, "lr": 0.1}, p)
    with pytest.raises(TargetError, match="found no model state dict"):
        tiecheck.analyze(str(p))
    p2 = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), p2)
    with pytest.raises(TargetError, match="holds a Tensor"):
        tiecheck.analyze(str(p2))


def test_unknown_target_lists_options():
    with pytest.raises(TargetError, match="no such file or folder, bundled model or Python spec"):
        tiecheck.analyze("definitely-not-here")


def test_inputs_are_only_read(tmp_path, sd):
    p = tmp_path / "m.pt"
    torch.save(sd, p)
    before = (p.read_bytes(), os.stat(p).st_mtime_ns)
    tiecheck.analyze(str(p))
    assert (p.read_bytes(), os.stat(p).st_mtime_ns) == before
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]
