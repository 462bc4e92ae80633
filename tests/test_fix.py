"""``tiecheck fix``: plans, corrected copies verified byte for byte and by transformers, refusals,
and a writer killed mid-way.

Fixtures are tiny real checkpoints: transformers Llama and GPT-2 saved with save_pretrained after
their head was untied by a clone (one folder sharded), a Llama whose head differs from the embedding
while the config still says tied (what a PEFT merge leaves), a view saved alone with torch.save, and
safetensors files written by ``safetensors.torch.save_model``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_model, save_model

import tiecheck
from tiecheck.cli.main import main
from tiecheck.errors import TiecheckError
from tiecheck.repair import fix
from tiecheck.repair.verify import Check
from tiecheck.repair.write import PAUSE_ENV

from support.checkpoints import sharded_head_copy, write_safetensors

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 64, 16
HEAD_BYTES = VOCAB * HIDDEN * 4  # float32


def _llama(tie: bool = True):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _untie_by_clone(model, head: str = "lm_head") -> None:
    emb = model.get_input_embeddings().weight
    getattr(model, head).weight = torch.nn.Parameter(emb.detach().clone())


def _hash_tree(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return sorted(f.keys())


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _checks(result) -> dict[str, tuple[bool, bool]]:
    return {c.name: (c.ok, c.skipped) for c in result.checks}


@pytest.fixture(scope="module")
def llama_clone(tmp_path_factory) -> Path:
    """Llama, tie_word_embeddings=true, head untied by a clone: two equal copies stored (TC016)."""
    folder = tmp_path_factory.mktemp("llama") / "clone"
    model = _llama()
    _untie_by_clone(model)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel"}}')
    return folder


@pytest.fixture(scope="module")
def llama_merged(tmp_path_factory) -> Path:
    """Llama whose head was trained apart (a merged adapter) while the config still says tied (TC015)."""
    folder = tmp_path_factory.mktemp("llama") / "merged"
    model = _llama()
    _untie_by_clone(model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.25)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_sharded(tmp_path_factory) -> Path:
    """GPT-2 with its head untied by a clone, saved in several shards with an index."""
    folder = tmp_path_factory.mktemp("gpt2") / "sharded"
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    _untie_by_clone(model)
    model.save_pretrained(folder, max_shard_size="8KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def test_llama_equal_copies_retied_and_verified(llama_clone, tmp_path):
    before = _hash_tree(llama_clone)
    out = tmp_path / "fixed"
    result = fix(llama_clone, out)
    (action,) = result.plan.actions
    assert (action.kind, action.names, action.why) == ("retie", ("lm_head.weight", "model.embed_tokens.weight"), "TC016")
    # transformers re-ties on load, so the copy costs disk only.
    assert (action.disk_saved, action.memory_saved) == (HEAD_BYTES, 0)
    assert _checks(result) == {"planned ties": (True, False), "findings answered": (True, False),
                               "tensors byte for byte": (True, False), "safetensors reads it": (True, False),
                               "transformers logits": (True, False)}
    assert result.verified
    assert result.exit_code() == 0
    assert "lm_head.weight" not in _keys(out / "model.safetensors")
    assert len(_keys(out / "model.safetensors")) == len(_keys(llama_clone / "model.safetensors")) - 1
    sizes = (llama_clone / "model.safetensors").stat().st_size - (out / "model.safetensors").stat().st_size
    assert HEAD_BYTES <= sizes < HEAD_BYTES + 128  # the head's bytes, and its header entry
    for name in ("config.json", "generation_config.json", "tokenizer.json"):  # copied unchanged
        assert (out / name).read_bytes() == (llama_clone / name).read_bytes()
    assert _metadata(out / "model.safetensors") == _metadata(llama_clone / "model.safetensors")
    assert _hash_tree(llama_clone) == before
    assert not list(tmp_path.glob(".fixed.tiecheck-*"))


def test_merged_head_declaration_made_true(llama_merged, tmp_path):
    out = tmp_path / "fixed"
    result = fix(llama_merged, out)
    (action,) = result.plan.actions
    assert (action.kind, action.why, action.disk_saved) == ("declare-untied", "TC015", 0)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    # both heads kept: nothing chosen silently
    assert _keys(out / "model.safetensors") == _keys(llama_merged / "model.safetensors")
    assert (out / "model.safetensors").read_bytes() == (llama_merged / "model.safetensors").read_bytes()
    assert _checks(result)["transformers logits"] == (True, False)
    assert _checks(result)["findings answered"] == (True, False)
    assert result.verified
    cfg_in = json.loads((llama_merged / "config.json").read_text())
    cfg_out = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in cfg_out.items() if k != "tie_word_embeddings"} == \
        {k: v for k, v in cfg_in.items() if k != "tie_word_embeddings"}


def test_tie_on_users_word_in_a_folder_says_what_is_lost(llama_merged, tmp_path):
    out = tmp_path / "tied"
    result = fix(llama_merged, out, tie=["lm_head.weight=model.embed_tokens.weight"])
    tie = next(a for a in result.plan.actions if a.kind == "tie")
    assert tie.lost.startswith(f"the stored content of lm_head.weight ({HEAD_BYTES:,} bytes) differs")
    assert tie.disk_saved == HEAD_BYTES
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _keys(out / "model.safetensors")
    assert _checks(result)["transformers logits"] == (True, True)  # loads; not compared, on the user's word
    assert result.verified


def test_sharded_folder_rewritten_shard_by_shard(gpt2_sharded, tmp_path):
    out = tmp_path / "fixed"
    result = fix(gpt2_sharded, out)
    assert [(a.kind, a.names) for a in result.plan.actions] == [("retie", ("lm_head.weight", "transformer.wte.weight"))]
    assert result.verified, result.checks
    index_in = json.loads((gpt2_sharded / "model.safetensors.index.json").read_text())
    index_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index_out["weight_map"]) == set(index_in["weight_map"]) - {"lm_head.weight"}
    shards = sorted(set(index_out["weight_map"].values()))
    alone = {index_in["weight_map"]["lm_head.weight"]} - {f for n, f in index_in["weight_map"].items()
                                                          if n != "lm_head.weight"}
    assert shards == sorted(set(index_in["weight_map"].values()) - alone)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards  # a shard left empty is not written
    stored = sum(os.path.getsize(out / s) for s in shards)
    headers = sum(8 + int.from_bytes((out / s).read_bytes()[:8], "little") for s in shards)
    assert index_out["metadata"]["total_size"] == stored - headers
    for s in shards:
        assert set(_keys(out / s)) == {n for n, f in index_out["weight_map"].items() if f == s}
    assert _checks(result)["transformers logits"] == (True, False)


def test_view_saved_alone_is_trimmed(tmp_path):
    big = torch.arange(4096, dtype=torch.float32)
    src = tmp_path / "bloated.pt"
    torch.save({"emb.weight": big[:64].view(8, 8), "bias": torch.zeros(8)}, src)
    out = tmp_path / "trimmed.pt"
    result = fix(src, out)
    (action,) = result.plan.actions
    assert (action.kind, action.why, action.names) == ("trim", "TC021", ("emb.weight",))
    assert action.disk_saved == action.memory_saved == (4096 - 64) * 4
    assert result.verified
    assert _checks(result)["torch.load(weights_only=True)"] == (True, False)
    loaded = torch.load(out, weights_only=True)
    assert loaded["emb.weight"].untyped_storage().nbytes() == 64 * 4
    assert torch.equal(loaded["emb.weight"], big[:64].view(8, 8))
    assert src.stat().st_size - out.stat().st_size > 15000


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.head = torch.nn.Linear(8, 32, bias=False)
        self.head.weight = self.emb.weight


def test_tie_writes_the_alias_map_save_model_writes(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    reference = tmp_path / "reference.safetensors"
    save_model(model, str(reference))
    w = model.emb.weight.detach()
    broken = write_safetensors(tmp_path / "broken.safetensors", {"emb.weight": w.clone(), "head.weight": w + 1},
                               metadata={"format": "pt"})
    out = tmp_path / "tied.safetensors"
    result = fix(broken, out, tie=[("head.weight", "emb.weight")])
    (action,) = result.plan.actions
    assert (action.kind, action.disk_saved, action.memory_saved) == ("tie", 32 * 8 * 4, 32 * 8 * 4)
    assert "differs from emb.weight" in action.lost
    assert result.verified
    assert _metadata(out) == {"format": "pt", **_metadata(reference)} == {"format": "pt", "head.weight": "emb.weight"}
    assert _keys(out) == _keys(reference) == ["emb.weight"]
    fresh = Tied()
    load_model(fresh, str(out))  # the library restores the tie from the map
    assert torch.equal(fresh.head.weight, w)
    assert fresh.head.weight is fresh.emb.weight


def test_untie_gives_each_name_its_copy(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    src = tmp_path / "tied.safetensors"
    save_model(model, str(src))
    out = tmp_path / "untied.safetensors"
    result = fix(src, out, untie=["head.weight,emb.weight"])
    (action,) = result.plan.actions
    assert (action.kind, action.disk_saved, action.memory_saved) == ("untie", -32 * 8 * 4, -32 * 8 * 4)
    assert result.verified, result.checks
    assert _keys(out) == ["emb.weight", "head.weight"]
    assert _metadata(out) == {}
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("head.weight"), model.emb.weight.detach())


def test_training_checkpoint_optimizer_refused_then_dropped(tmp_path):
    w = torch.randn(16, 4)
    src = tmp_path / "ckpt.pt"
    torch.save({"model": {"emb.weight": w, "head.weight": w.clone()}, "optimizer": {"state": {0: {"step": 1}}},
                "epoch": 3}, src)
    with pytest.raises(TiecheckError, match=r"indexed by parameter position.*--drop-optimizer"):
        fix(src, tmp_path / "out.pt", tie=["head.weight=emb.weight"])
    assert not (tmp_path / "out.pt").exists()
    result = fix(src, tmp_path / "out.pt", tie=["head.weight=emb.weight"], drop_optimizer=True)
    assert [a.kind for a in result.plan.actions] == ["tie", "drop-optimizer"]
    assert result.verified
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(loaded) == {"model", "epoch"}
    assert loaded["epoch"] == 3
    assert loaded["model"]["head.weight"].data_ptr() == loaded["model"]["emb.weight"].data_ptr()


def test_dry_run_writes_nothing(llama_clone, tmp_path):
    # the public name, callable after the package was imported
    result = tiecheck.fix(llama_clone, tmp_path / "never", dry_run=True)
    assert [a.why for a in result.plan.actions] == ["TC016"]
    assert result.checks == []
    assert list(tmp_path.iterdir()) == []


def _cli(*args: str):
    return CliRunner().invoke(main, ["fix", *args])


def test_cli_prints_plan_and_checks(llama_clone, tmp_path):
    r = _cli(str(llama_clone), "-o", str(tmp_path / "a"), "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["verified"] is True
    assert doc["plan"]["totals"] == {"disk_saved": HEAD_BYTES, "memory_saved": 0}
    r = _cli(str(llama_clone), "--dry-run", "--format", "markdown")
    assert r.exit_code == 0
    assert "| retie" in r.output
    assert "--dry-run: nothing written" in r.output
    r = _cli(str(llama_clone), "-o", str(tmp_path / "b"))
    assert r.exit_code == 0
    assert "pass  transformers logits" in r.output
    assert "TC016" in r.output


@pytest.mark.parametrize("case", ["same", "inside", "exists", "unknown-name", "bad-tie"])
def test_cli_refusals(llama_clone, tmp_path, case):
    before = _hash_tree(llama_clone)
    args = {"same": [str(llama_clone), "-o", str(llama_clone), "--force"],
            "inside": [str(llama_clone), "-o", str(llama_clone / "fixed")],
            "exists": [str(llama_clone), "-o", str(tmp_path)],
            "unknown-name": [str(llama_clone), "-o", str(tmp_path / "x"), "--tie", "lm_head.wieght=model.embed_tokens.weight"],
            "bad-tie": [str(llama_clone), "-o", str(tmp_path / "x"), "--tie", "lm_head.weight"]}[case]
    r = _cli(*args)
    assert r.exit_code == 2, r.output
    want = {"same": "it is the input", "inside": "inside the input folder", "exists": "exists; choose another path, or "
            "pass --force", "unknown-name": "'lm_head.wieght' is not a tensor", "bad-tie": "write DROPPED=KEPT"}[case]
    assert want in r.output
    assert _hash_tree(llama_clone) == before
    assert not (tmp_path / "x").exists()
    assert not (llama_clone / "fixed").exists()


def test_force_replaces_only_an_output_fix_wrote(llama_clone, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(TiecheckError, match="is not an output of tiecheck fix"):
        fix(llama_clone, mine, force=True)
    assert (mine / "notes.txt").read_text() == "keep me"

    out = tmp_path / "fixed"
    assert fix(llama_clone, out).verified
    assert (tmp_path / ".fixed.fixed-by-tiecheck").is_file()
    first = (out / "model.safetensors").stat().st_ino
    assert fix(llama_clone, out, force=True).verified  # fix's own output: replaced
    assert (out / "model.safetensors").stat().st_ino != first
    (out / "stale").write_text("added after fix wrote it")
    with pytest.raises(TiecheckError, match="changed since fix wrote it"):
        fix(llama_clone, out, force=True)
    assert (out / "stale").exists()


def test_killed_writer_leaves_no_output(tmp_path):
    # A bare sharded checkpoint (no config), so the subprocess needs torch but not transformers.
    src = tmp_path / "src"
    index = sharded_head_copy(src, rows=64, shards=3)
    before = _hash_tree(src)
    out = tmp_path / "fixed"
    env = {**os.environ, PAUSE_ENV: "30", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tiecheck.cli", "fix", str(index), "-o", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".fixed.tiecheck-tmp-*/model-00001-of-00003.safetensors")):
            assert proc.poll() is None, "the writer never wrote its first shard"
            assert time.monotonic() < deadline, "the writer never wrote its first shard"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert _hash_tree(src) == before
    (stale,) = tmp_path.glob(".fixed.tiecheck-tmp-*")
    # the same command without the pause completes: the index and its shards, each tensor the input's;
    # the killed run's temporary folder is removed and said to be
    result = fix(index, out)
    assert result.verified
    assert result.plan.actions == []
    assert not stale.exists()
    assert result.notes == [f"removed {stale}, a temporary output left by a run (PID "
                                                   f"{proc.pid}) that no longer exists"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as a, safe_open(str(src / shard.name), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118 - safe_open has keys(), no __iter__
    with pytest.raises(TiecheckError, match="no alias that loaders restore"):
        fix(index, tmp_path / "tied", tie=["head.weight=layers.0.weight"])


def test_untie_in_a_folder_makes_the_config_say_so(llama_clone, tmp_path):
    tied = tmp_path / "tied"
    assert fix(llama_clone, tied).verified
    out = tmp_path / "untied"
    result = fix(tied, out, untie=["lm_head.weight,model.embed_tokens.weight"])
    (action,) = result.plan.actions
    assert (action.kind, action.names, action.disk_saved) == ("untie", ("lm_head.weight", "model.embed_tokens.weight"),
                                                              -HEAD_BYTES)
    assert result.verified, result.checks
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in _keys(out / "model.safetensors")
    assert _checks(result)["transformers logits"] == (True, False)
    # two copies stored already, tied by the declaration alone: only the declaration changes
    both = fix(llama_clone, tmp_path / "declared-only", untie=["model.embed_tokens.weight,lm_head.weight"])
    (action,) = both.plan.actions
    assert (action.kind, action.disk_saved, action.detail.startswith("both are stored already")) == ("untie", 0, True)
    assert both.verified
    assert _checks(both)["planned ties"] == (True, False)
    assert json.loads((tmp_path / "declared-only" / "config.json").read_text())["tie_word_embeddings"] is False


def test_alias_contradicted_by_the_bytes_is_removed(tmp_path):
    w = torch.randn(32, 8)
    src = write_safetensors(tmp_path / "a.safetensors", {"emb.weight": w, "head.weight": w * 2},
                            metadata={"format": "pt", "head.weight": "emb.weight"})
    out = tmp_path / "b.safetensors"
    result = fix(src, out)
    (action,) = result.plan.actions
    assert (action.kind, action.why, action.disk_saved) == ("declare-untied", "TC015", 0)
    assert result.verified
    assert _metadata(out) == {"format": "pt"}
    assert _keys(out) == ["emb.weight", "head.weight"]


def test_a_failed_check_leaves_nothing_and_exits_1(llama_clone, tmp_path, monkeypatch):
    # fix() looks verify up in its package's namespace
    monkeypatch.setitem(sys.modules["tiecheck.repair"].__dict__, "verify", lambda *a, **k: [Check("planned ties", False, "planted")])
    out = tmp_path / "fixed"
    r = _cli(str(llama_clone), "-o", str(out))
    assert r.exit_code == 1
    assert "FAIL  planned ties: planted" in r.output
    assert "NOT written" in r.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
