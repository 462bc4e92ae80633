"""Every checkpoint family users have, read by content, and every way such files come broken."""

from __future__ import annotations

import json
import os
import pickle
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import tiecheck
from tiecheck.cli import main
from tiecheck.errors import TargetError, UntrustedPickleError
from tiecheck.loaders.formats.safetensors_files import load_safetensors_file

from support.checkpoints import safetensors_bytes, write_safetensors, write_sharded
from support.hf import custom_code_folder
from support.models import TinyLM

transformers = pytest.importorskip("transformers")


def groups(report):
    return [list(g.names) for g in report.tie_groups]


def codes(report):
    return sorted(f.code for f in report.findings)


def untied_sd(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in TinyLM(tie=False).state_dict().items()}


# -- safetensors ------------------------------------------------------------------------------

def test_safetensors_file_by_content_any_extension(tmp_path):
    sd = untied_sd()
    path = tmp_path / "weights.bin-final"
    save_file(sd, path)
    r = tiecheck.analyze(str(path))
    assert r.source.format == "safetensors"
    assert {t.name for t in r.tensors} == set(sd)
    assert r.summary.params_counted == sum(v.numel() for v in sd.values())
    assert groups(r) == []
    assert r.content.ran
    assert r.extra["files"][0]["tensors"] == len(sd)


def test_safetensors_tensors_are_mapped_not_read(tmp_path):
    sd = {"a": torch.randn(64, 16), "b": torch.arange(10, dtype=torch.int64), "c": torch.randn(3).bfloat16(),
          "empty": torch.empty(0, 4)}
    path = write_safetensors(tmp_path / "m.safetensors", sd)
    sub = load_safetensors_file(path)
    for name, t in sub.tensors.items():
        assert torch.equal(t, sd[name])
        assert t.dtype == sd[name].dtype
    # Every tensor is a view of one storage spanning the whole file: the mapping, not copies.
    storages = {t.untyped_storage().data_ptr() for t in sub.tensors.values() if t.numel()}
    assert len(storages) == 1
    assert sub.tensors["a"].untyped_storage().nbytes() == path.stat().st_size
    if os.path.exists("/proc/self/maps"):
        assert str(path) in Path("/proc/self/maps").read_text()
    # The content pass reads them with pread at their file offset, not through the mapping.
    assert set(sub.file_spans) == {"a", "b", "c"}
    assert {s.offset for s in sub.file_spans.values()} == {0}


def test_safetensors_untied_copy_is_a_duplicate(tmp_path):
    emb = torch.randn(64, 16)
    path = write_safetensors(tmp_path / "m.safetensors", {"embed.weight": emb, "lm_head.weight": emb.clone(),
                                                          "norm.weight": torch.randn(16)})
    r = tiecheck.analyze(str(path))
    assert [list(d.names) for d in r.untied_duplicates] == [["embed.weight", "lm_head.weight"]]
    assert "TC005" in codes(r)


def test_safetensors_unaligned_header_still_loads(tmp_path):
    sd = {"a": torch.randn(5, 3), "b": torch.randn(7)}
    path = write_safetensors(tmp_path / "odd.safetensors", sd, pad_to=1, metadata={"format": "pt"})

    sub = load_safetensors_file(path)
    assert all(torch.equal(sub.tensors[k], v) for k, v in sd.items())


def _corrupt_cases(tmp_path):
    sd = {"a": torch.randn(4, 4), "b": torch.randn(8)}
    good = safetensors_bytes(sd)
    n = int.from_bytes(good[:8], "little")

    def offsets(edit):
        return safetensors_bytes(sd, header_edit=edit)

    return {
        "truncated": (good[:-5], "truncated"),
        "header longer than file": ((10 ** 6).to_bytes(8, "little") + good[8:], "exceeds the file size"),
        "header above limit": ((10 ** 9).to_bytes(8, "little") + good[8:], "exceeds the 100,000,000-byte limit"),
        "bad json": (good[:8] + b"{" + b"x" * (n - 1) + good[8 + n:], "not valid JSON"),
        "gap": (offsets(lambda h: h["b"].update(data_offsets=[68, 100])), "leaves a gap"),
        "overlap": (offsets(lambda h: h["b"].update(data_offsets=[60, 92])), "overlaps"),
        "size mismatch": (offsets(lambda h: h["a"].update(shape=[4, 5])), "needs 80 bytes"),
        "unknown dtype": (offsets(lambda h: h["a"].update(dtype="Q7")), "dtype 'Q7'"),
        "trailing bytes": (good + b"\0" * 4, "after the last tensor"),
        "duplicate name": (good[:8] + good[8:8 + n].replace(b'"b"', b'"a"') + good[8 + n:], "duplicate key"),
        "short": (b"\x05\0\0", "too short"),
    }


@pytest.mark.parametrize("case", ["truncated", "header longer than file", "header above limit", "bad json", "gap",
                                  "overlap", "size mismatch", "unknown dtype", "trailing bytes", "duplicate name"])
def test_corrupt_safetensors_is_one_clear_error(tmp_path, case):
    data, match = _corrupt_cases(tmp_path)[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(TargetError, match=match) as e:
        tiecheck.analyze(str(path))
    assert str(path) in str(e.value)


def test_cli_corrupt_and_partial_files_exit_2_in_one_line(tmp_path):
    data, _ = _corrupt_cases(tmp_path)["truncated"]
    (tmp_path / "bad.safetensors").write_bytes(data)
    index = write_sharded(tmp_path / "ckpt", untied_sd(), shards=2)
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    (tmp_path / "ckpt" / shard).unlink()
    for target in (tmp_path / "bad.safetensors", tmp_path / "ckpt"):
        res = CliRunner().invoke(main, ["inspect", str(target)])
        assert res.exit_code == 2, res.output
        assert res.output.count("\n") == 1, res.output
        assert res.output.startswith("tiecheck: error: ")
        assert "Traceback" not in res.output


def test_too_short_file_is_unrecognised_not_a_crash(tmp_path):
    data, _ = _corrupt_cases(tmp_path)["short"]
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with pytest.raises(TargetError, match="not a recognised checkpoint"):
        tiecheck.analyze(str(path))


def test_sharded_safetensors_by_folder_and_by_index(tmp_path):
    sd = untied_sd()
    index = write_sharded(tmp_path / "ckpt", sd, shards=3)
    for target in (index, index.parent):
        r = tiecheck.analyze(str(target))
        assert r.source.format == "sharded safetensors"
        assert {t.name for t in r.tensors} == set(sd)
        assert len(r.extra["files"]) == 3


def test_sharded_missing_shard_outside_folder_and_disagreeing_index(tmp_path):
    sd = untied_sd()
    index = write_sharded(tmp_path / "ckpt", sd, shards=2)
    wm = json.loads(index.read_text())
    shard = sorted(set(wm["weight_map"].values()))[1]

    (tmp_path / "ckpt" / shard).rename(tmp_path / shard)
    with pytest.raises(TargetError, match=f"shard '{shard}' named by the index is missing"):
        tiecheck.analyze(str(index))

    wm["weight_map"] = {k: ("../" + v if v == shard else v) for k, v in wm["weight_map"].items()}
    index.write_text(json.dumps(wm))
    with pytest.raises(TargetError, match="lies outside its folder"):
        tiecheck.analyze(str(index))

    (tmp_path / shard).rename(tmp_path / "ckpt" / shard)
    wm["weight_map"] = {k: sorted(set(wm["weight_map"].values()) - {"../" + shard})[0] for k in wm["weight_map"]}
    index.write_text(json.dumps(wm))
    with pytest.raises(TargetError, match="the index and shards disagree"):
        tiecheck.analyze(str(index))


# -- Hugging Face folders ------------------------------------------------------------------------

def llama(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def hf_folder(tmp_path: Path, model, tensors: dict | None = None, name: str = "hf") -> Path:
    """A model folder: the model's config.json plus the given tensors as model.safetensors."""
    folder = tmp_path / name
    folder.mkdir()
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(folder)
    sd = tensors if tensors is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_safetensors(folder / "model.safetensors", sd)
    return folder


def test_hf_folder_tied_key_absent_is_info_and_retied(tmp_path):
    m = llama(tie=True)
    m.save_pretrained(tmp_path / "hf")
    r = tiecheck.analyze(str(tmp_path / "hf"))
    assert r.source.format == "Hugging Face folder (safetensors)"
    assert groups(r) == [["lm_head.weight", "model.embed_tokens.weight"]]
    (f,) = [f for f in r.findings if f.code == "TC012"]
    assert f.severity == "info"
    assert "lm_head.weight is absent" in f.message
    arch = r.extra["hf"]["architecture"]
    assert arch["class"] == "LlamaForCausalLM"
    assert arch["absent_tied"] == [["lm_head.weight",
                                                                           "model.embed_tokens.weight"]]
    assert r.exit_code("warning") == 0


def test_hf_folder_flops_come_from_the_architecture_and_memory_from_the_files(tmp_path):
    m = llama(tie=True)
    m.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    r = tiecheck.analyze(str(tmp_path / "hf"), flops=True, duplicates=False)
    assert r.flops.available
    assert r.flops.forward > 0
    assert {d.dtype for d in r.summary.by_dtype} == {"bfloat16"}  # the files', not the meta build's
    assert r.summary.training_bytes > 0
    assert r.summary.params_unique == sum(p.numel() for p in m.parameters())


def test_hf_tied_keys_stored_twice_with_different_content(tmp_path):
    m = llama(tie=True)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    r = tiecheck.analyze(str(hf_folder(tmp_path, m, sd)))
    # One finding for the pair: the declared layer's (declared tied, stored different), not the
    # loader's own TC010 as well.
    (f,) = [f for f in r.findings if set(list(f.names)) == {"lm_head.weight", "model.embed_tokens.weight"}]
    assert f.code == "TC015"
    assert "different content" in f.message
    assert "TC010" not in codes(r)
    assert groups(r) == []  # transformers loads them untied; so does the report
    assert r.exit_code("warning") == 1


def test_hf_tied_keys_stored_twice_equal_are_retied(tmp_path):
    m = llama(tie=True)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}  # both names, equal content
    r = tiecheck.analyze(str(hf_folder(tmp_path, m, sd)))
    assert groups(r) == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert "TC010" not in codes(r)
    assert "TC005" not in codes(r)
    assert any("redundant bytes" in n for n in r.source.notes)


def test_hf_untied_config_without_head_is_config_mismatch(tmp_path):
    m = llama(tie=False)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    folder = hf_folder(tmp_path, m, sd)
    r = tiecheck.analyze(str(folder))
    (f,) = [f for f in r.findings if "lm_head.weight" in f.names]
    assert f.code == "TC017"
    assert "initialise lm_head.weight randomly" in f.message
    assert "TC011" not in codes(r)
    assert groups(r) == []
    # Without transformers the config is still held against the files, once.
    r = analyze_without_transformers(folder)
    assert [f.code for f in r.findings if f.code in ("TC011", "TC017")] == ["TC017"]
    assert any("pip install tiecheck[hf]" in n for n in r.source.notes)


def test_hf_untied_llama_lists_head_but_is_not_tied(tmp_path):
    m = llama(tie=False)
    assert "lm_head.weight" in type(m)._tied_weights_keys  # what the class attribute alone would suggest
    m.save_pretrained(tmp_path / "hf")
    r = tiecheck.analyze(str(tmp_path / "hf"))
    assert groups(r) == []
    assert "TC011" not in codes(r)
    assert "TC012" not in codes(r)
    assert [list(c.names) for c in r.tie_candidates] == [["lm_head.weight", "model.embed_tokens.weight"]]  # sorted


def analyze_without_transformers(target, **kw):
    """As without the hf extra: ``import transformers`` fails for the duration of the call."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "transformers", None)
        return tiecheck.analyze(str(target), **kw)


def test_hf_folder_without_transformers_says_so(tmp_path):
    m = llama(tie=True)
    m.save_pretrained(tmp_path / "hf")
    r = analyze_without_transformers(tmp_path / "hf")
    assert groups(r) == []
    assert r.extra["hf"]["architecture"] is None
    assert any("architecture ties need transformers: pip install tiecheck[hf]" in n for n in r.source.notes)
    assert "TC012" not in codes(r)


def test_hf_base_model_weights_matched_by_prefix(tmp_path):
    m = llama(tie=True)
    base = {k[len("model."):]: v.detach().clone() for k, v in m.state_dict().items() if k.startswith("model.")}
    r = tiecheck.analyze(str(hf_folder(tmp_path, m, base)))
    assert groups(r) == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert any("added prefix 'model.'" in n for n in r.source.notes)


def test_hf_pytorch_model_bin_folder_and_sharded_bin(tmp_path):
    m = llama(tie=True)
    one = tmp_path / "bin"
    one.mkdir()
    m.config.save_pretrained(one)
    torch.save(m.state_dict(), one / "pytorch_model.bin")
    r = tiecheck.analyze(str(one))
    assert r.source.format == "Hugging Face folder (torch.save state dict)"
    assert groups(r) == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert "TC012" not in codes(r)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    m.config.save_pretrained(sharded)
    sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    names = list(sd)
    wm = {}
    for i in range(2):
        part = {n: sd[n].clone() for n in names[i::2]}
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save(part, sharded / fname)
        wm.update({n: fname for n in part})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    r = tiecheck.analyze(str(sharded))
    assert r.source.format == "Hugging Face folder (sharded torch.save)"
    assert groups(r) == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert "TC012" in codes(r)


def test_hf_folder_bad_config_and_no_weights(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(TargetError, match=r"config\.json: not valid JSON"):
        tiecheck.analyze(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(TargetError, match=r"holds config\.json but no weights"):
        tiecheck.analyze(str(folder))


def test_custom_architecture_needs_trust_remote_code(tmp_path, remote_code_modules):
    folder, _ = custom_code_folder(tmp_path / "custom")

    r = tiecheck.analyze(str(folder))
    assert groups(r) == []
    assert r.extra["hf"]["architecture"] is None
    assert any("--trust-remote-code" in n and "not run" in n for n in r.source.notes)

    # Trusted: transformers copies the module into its modules cache (the fixture's folder).
    r = tiecheck.analyze(str(folder), trust_remote_code=True)
    assert groups(r) == [["embed.weight", "head.weight"]]
    assert "TC012" in codes(r)
    assert r.extra["hf"]["architecture"]["class"] == "TinyCustomForCausalLM"


# -- torch.export -------------------------------------------------------------------------------

class Wrapped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.m = TinyLM()
        self.register_buffer("scale", torch.ones(3))
        self.c = torch.arange(5.0)  # a tensor constant

    def forward(self, x):
        return self.m(x) * self.scale.sum() + self.c.sum()


@pytest.fixture(scope="module")
def pt2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    ep = torch.export.export(Wrapped(), (torch.tensor([[1, 2]]),))
    torch.export.save(ep, path)
    return path


def test_pt2_archive_keeps_ties_and_says_which_inputs_share(pt2_file):
    r = tiecheck.analyze(str(pt2_file))
    assert r.source.format == "torch.export archive"
    assert groups(r) == [["m.embed.weight", "m.lm_head.weight"]]
    names = {t.name for t in r.tensors}
    assert {"scale", "c", "m.block.weight"} <= names
    (prog,) = r.extra["export"]
    assert prog["placeholders_sharing_memory"] == [["p_m_embed_weight", "p_m_lm_head_weight"]]
    assert r.content.ran
    assert codes(r) == []
    ref = Wrapped()
    t = tiecheck.loaders.load_target(str(pt2_file)).tensors
    assert torch.equal(t["m.block.weight"], ref.m.block.weight.detach())
    assert torch.equal(t["c"], ref.c)


def test_pt2_never_unpickles_sample_inputs(tmp_path, pt2_file):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(pt2_file) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "sample_inputs" in info.filename:
                data = pickle.dumps(Evil())
            dst.writestr(info, data)
    r = tiecheck.analyze(str(evil))
    assert groups(r) == [["m.embed.weight", "m.lm_head.weight"]]
    assert not marker.exists()


def test_pt2_truncated_is_one_clear_error(tmp_path, pt2_file):
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(pt2_file.read_bytes()[: pt2_file.stat().st_size // 2])
    res = CliRunner().invoke(main, ["inspect", str(cut)])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1
    assert str(cut) in res.output


# -- TorchScript -----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, its files are not
def test_torchscript_needs_trust_pickle(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(TinyLM()), path)
    with pytest.raises(UntrustedPickleError, match=r"TorchScript.*--trust-pickle"):
        tiecheck.analyze(str(path))
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 2
    assert "runs the TorchScript code" in res.output
    r = tiecheck.analyze(str(path), trust_pickle=True)
    assert r.source.format == "TorchScript archive"
    assert groups(r) == [["embed.weight", "lm_head.weight"]]
    assert r.tie_groups[0].kind == "same_parameter"


# -- torch.distributed.checkpoint -------------------------------------------------------------------

@pytest.fixture
def dcp_folder(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no process group is initialised
        dcp.save({"model": TinyLM().state_dict(), "step": 7}, checkpoint_id=str(folder))
    return folder


def test_dcp_folder_reads_metadata_and_maps_chunks(dcp_folder):
    r = tiecheck.analyze(str(dcp_folder))
    assert r.source.format == "torch.distributed.checkpoint training checkpoint"
    assert r.source.key == "model"
    assert {t.name for t in r.tensors} == set(TinyLM().state_dict())
    # DCP records no aliasing: the tie comes back as two equal copies.
    assert groups(r) == []
    assert [list(d.names) for d in r.untied_duplicates] == [["embed.weight", "lm_head.weight"]]
    assert any("records no aliasing" in n for n in r.source.notes)
    sub = tiecheck.loaders.load_target(str(dcp_folder))
    span = sub.file_spans["block.weight"]
    raw = Path(span.path).read_bytes()[span.offset:span.offset + 16 * 16 * 4]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).view(16, 16), sub.tensors["block.weight"])
    assert set(sub.file_spans) == set(sub.tensors)


def test_dcp_missing_data_file_and_truncation(dcp_folder):
    (data,) = [p for p in dcp_folder.iterdir() if p.suffix == ".distcp"]
    blob = data.read_bytes()
    data.write_bytes(blob[:100])
    with pytest.raises(TargetError, match="truncated"):
        tiecheck.analyze(str(dcp_folder))
    data.unlink()
    (dcp_folder / "other.distcp").write_bytes(b"x")
    with pytest.raises(TargetError, match=f"data file {data.name} named by .metadata is missing"):
        tiecheck.analyze(str(dcp_folder))


def test_dcp_metadata_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(Evil()))
    (folder / "__0_0.distcp").write_bytes(b"\0" * 8)
    with pytest.raises(TargetError, match=r"refused to unpickle pathlib\.Path\.touch|refused to unpickle"):
        tiecheck.analyze(str(folder))
    assert not marker.exists()


# -- CLI ----------------------------------------------------------------------------------------------

def test_cli_inspects_hf_folder_and_warns_for_remote_code(tmp_path):
    m = llama(tie=True)
    m.save_pretrained(tmp_path / "hf")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "hf"), "--format", "json", "--trust-remote-code"])
    assert res.exit_code == 0, res.output
    assert "--trust-remote-code runs" in res.stderr
    d = json.loads(res.stdout)
    assert d["hf"]["architecture"]["class"] == "LlamaForCausalLM"
    assert d["tie_groups"][0]["names"] == ["lm_head.weight", "model.embed_tokens.weight"]


def test_inputs_are_only_read(tmp_path):
    m = llama(tie=True)
    m.save_pretrained(tmp_path / "hf")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "hf").iterdir()}
    for p in (tmp_path / "hf").iterdir():
        p.chmod(0o444)
    tiecheck.analyze(str(tmp_path / "hf"))
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "hf").iterdir()}
    assert before == after
