"""``tiecheck fix``'s verification, each check handed a copy that really is wrong.

``verify()`` is never stubbed here: the writer is, by one that writes the copy a broken writer
would (a byte flipped, a tie not made, an untie not made, a weight changed), and ``fix`` must then
fail the check that guards against it, publish nothing and leave no temporary file.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from tiecheck import analyze
from tiecheck.cli.main import main
from tiecheck.loaders.filecompare import COMPARE_CHUNK
from tiecheck.repair import fix
from tiecheck.repair.layouts import SAFETENSORS, TORCH
from tiecheck.repair.verify import _library_checks, _transformers_checks
from tiecheck.repair.write import write as real_write
from tiecheck.report.safewrite import UnsafeOutputError

from support.checkpoints import sharded_head_copy

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN = 64, 16


def _checks(result) -> dict[str, tuple[bool, str]]:
    return {c.name: (c.ok, c.detail) for c in result.checks}


def _writer(monkeypatch, then) -> None:
    """fix() writes with ``then(tmp)`` run after the real writer (``then`` may also replace its work)."""

    def broken(plan, path, weights, tmp, **kw):
        real_write(plan, path, weights, tmp, **kw)
        then(Path(path), Path(tmp))

    monkeypatch.setitem(sys.modules["tiecheck.repair"].__dict__, "write", broken)


def _nothing_published(tmp_path: Path, *inputs: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(inputs)


def _data_offsets(path: Path, name: str) -> tuple[int, int]:
    """File offsets of ``name``'s bytes: the safetensors header's data_offsets after its 8 + n bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def test_a_byte_flipped_in_the_last_partial_chunk_fails_the_byte_check(tmp_path, monkeypatch):
    # One chunk and 100 bytes more: the last byte is in the partial chunk the compare reads last.
    big = torch.arange(COMPARE_CHUNK // 4 + 25, dtype=torch.float32)
    src = tmp_path / "in.safetensors"
    save_file({"big": big, "small": torch.ones(3)}, str(src))

    def flip_last_byte(_path, tmp):
        _, end = _data_offsets(tmp, "big")
        with open(tmp, "r+b") as fh:
            fh.seek(end - 1)
            b = fh.read(1)
            fh.seek(end - 1)
            fh.write(bytes([b[0] ^ 0x01]))

    _writer(monkeypatch, flip_last_byte)
    result = fix(src, tmp_path / "out.safetensors")
    checks = _checks(result)
    assert checks["tensors byte for byte"] == (False, "differ from their source: big")
    assert checks["safetensors reads it"][0]  # the file itself is well-formed
    assert not result.verified
    assert result.output is None
    _nothing_published(tmp_path, "in.safetensors")


def test_an_unchanged_copy_passes_the_byte_check(tmp_path):
    """The control of the test above: the same file, written by the real writer, verifies."""
    big = torch.arange(COMPARE_CHUNK // 4 + 25, dtype=torch.float32)
    src = tmp_path / "in.safetensors"
    save_file({"big": big, "small": torch.ones(3)}, str(src))
    result = fix(src, tmp_path / "out.safetensors")
    both = 2 * (big.nbytes + 3 * 4)  # every byte of the input and of the copy
    assert _checks(result)["tensors byte for byte"] == (
        True, f"2 tensors equal their source (0 by their named replacement); {both:,} bytes compared")
    assert result.verified


def _llama_clone(folder: Path) -> Path:
    """Llama, tie_word_embeddings=true, its head untied by a clone: fix re-ties it (TC016)."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_clone(tmp_path_factory) -> Path:
    return _llama_clone(tmp_path_factory.mktemp("llama") / "clone")


def test_a_finding_the_writer_left_fails_the_findings_check(llama_clone, tmp_path, monkeypatch):
    def copy_input(path, tmp):  # the folder as it was: the head's equal copy still stored
        shutil.rmtree(tmp)
        shutil.copytree(path, tmp)

    _writer(monkeypatch, copy_input)
    result = fix(llama_clone, tmp_path / "out")
    checks = _checks(result)
    assert checks["findings answered"] == (False, "still reported: TC016 lm_head.weight, model.embed_tokens.weight")
    # The config declares the tie, so transformers ties the two on load: the tie itself holds.
    assert checks["planned ties"] == (True, "1 tied, 0 untied as planned")
    assert checks["transformers logits"][0]  # the bytes are the input's: same logits
    assert not result.verified
    _nothing_published(tmp_path)


def test_a_tie_the_writer_did_not_make_fails_the_tie_check(tmp_path, monkeypatch):
    """--tie in a safetensors file: the writer drops head.weight and must write the alias map that
    safetensors' save_model writes; one that forgets the map leaves the head unreadable."""
    w = torch.randn(32, 8)
    src = tmp_path / "in.safetensors"
    save_file({"emb.weight": w, "head.weight": w + 1}, str(src), metadata={"format": "pt"})

    def forget_the_alias(_path, tmp):
        with safe_open(str(tmp), "pt") as fh:
            assert fh.metadata() == {"format": "pt", "head.weight": "emb.weight"}
            kept = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
        save_file(kept, str(tmp), metadata={"format": "pt"})

    _writer(monkeypatch, forget_the_alias)
    result = fix(src, tmp_path / "out.safetensors", tie=[("head.weight", "emb.weight")])
    checks = _checks(result)
    assert checks["planned ties"] == (False, "not tied: head.weight=emb.weight")
    assert checks["tensors byte for byte"] == (False, "missing from the output: head.weight")
    assert not result.verified
    _nothing_published(tmp_path, "in.safetensors")


def test_a_changed_weight_fails_the_logits_check(llama_clone, tmp_path, monkeypatch):
    def shift_the_norm(_path, tmp):
        f = tmp / "model.safetensors"
        with safe_open(str(f), "pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
            meta = fh.metadata()
        tensors["model.norm.weight"] = tensors["model.norm.weight"] + 0.5
        save_file(tensors, str(f), metadata=meta)

    _writer(monkeypatch, shift_the_norm)
    result = fix(llama_clone, tmp_path / "out")
    checks = _checks(result)
    assert checks["planned ties"][0]
    assert checks["findings answered"][0]
    assert checks["tensors byte for byte"] == (False, "differ from their source: model.norm.weight")
    ok, detail = checks["transformers logits"]
    assert not ok
    assert detail.startswith("logits differ from the input's (max |diff| ")
    assert 0 < float(detail.removeprefix("logits differ from the input's (max |diff| ").removesuffix(")")) < 100
    assert not result.verified
    _nothing_published(tmp_path)


def test_an_untie_the_writer_did_not_make_fails_the_tie_check(tmp_path, monkeypatch):
    emb = torch.randn(32, 8)
    src = tmp_path / "tied.pt"
    torch.save({"emb.weight": emb, "head.weight": emb, "norm": torch.ones(8)}, src)

    _writer(monkeypatch, lambda path, tmp: shutil.copyfile(path, tmp))
    result = fix(src, tmp_path / "out.pt", untie=["emb.weight,head.weight"])
    checks = _checks(result)
    assert checks["planned ties"] == (False, "still tied: head.weight,emb.weight")
    assert checks["tensors byte for byte"][0]
    assert checks["torch.load(weights_only=True)"][0]
    assert not result.verified
    _nothing_published(tmp_path, "tied.pt")


def test_a_name_the_writer_lost_fails_the_byte_check(tmp_path, monkeypatch):
    src = tmp_path / "in.safetensors"
    save_file({"a": torch.ones(3), "b": torch.zeros(2)}, str(src))
    _writer(monkeypatch, lambda _path, tmp: save_file({"a": torch.ones(3)}, str(tmp)))
    result = fix(src, tmp_path / "out.safetensors")
    assert _checks(result)["tensors byte for byte"] == (False, "missing from the output: b")
    assert not result.verified
    _nothing_published(tmp_path, "in.safetensors")


@pytest.mark.parametrize("other", [torch.ones(3, dtype=torch.float16), torch.ones(1, 3)])
def test_a_dtype_or_shape_the_writer_changed_fails_the_byte_check(tmp_path, monkeypatch, other):
    src = tmp_path / "in.safetensors"
    save_file({"a": torch.ones(3), "b": torch.zeros(2)}, str(src))
    _writer(monkeypatch, lambda _path, tmp: save_file({"a": other, "b": torch.zeros(2)}, str(tmp)))
    result = fix(src, tmp_path / "out.safetensors")
    assert _checks(result)["tensors byte for byte"] == (False, "differ from their source: a")
    assert not result.verified


class _Broke(Exception):
    pass


def test_no_temporary_file_is_left_when_writing_raises(tmp_path, monkeypatch):
    src = tmp_path / "in.safetensors"
    save_file({"a": torch.ones(3)}, str(src))

    def half_written(_path, tmp):
        assert tmp.is_file()  # the real writer's copy is there ...
        raise _Broke("disk full")  # ... when the writer fails

    _writer(monkeypatch, half_written)
    with pytest.raises(_Broke):
        fix(src, tmp_path / "out.safetensors")
    _nothing_published(tmp_path, "in.safetensors")


def test_no_temporary_file_is_left_when_verifying_raises(tmp_path, monkeypatch):
    src = tmp_path / "in.safetensors"
    save_file({"a": torch.ones(3)}, str(src))
    seen = []

    def verify_breaks(plan, target, output, source):
        seen.append(output.is_file())
        raise _Broke("a reader failed")

    monkeypatch.setitem(sys.modules["tiecheck.repair"].__dict__, "verify", verify_breaks)
    with pytest.raises(_Broke):
        fix(src, tmp_path / "out.safetensors")
    assert seen == [True]
    _nothing_published(tmp_path, "in.safetensors")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["a new folder beside the shards", "a shard", "a shard, forced"])
def test_fix_of_an_index_never_writes_among_its_shards(tmp_path, where):
    """The shards of an index are inputs too: an output in the index's folder would land among them."""
    src = tmp_path / "src"
    index = sharded_head_copy(src, rows=8, shards=2)
    before = _tree(src)
    shard = sorted(src.glob("*.safetensors"))[0]
    out = src / "fixed" if where.startswith("a new") else shard
    with pytest.raises(UnsafeOutputError, match=rf"refusing to write the fixed copy to {out}: it is inside the "
                                                rf"input folder {src}; fix never writes in place"):
        fix(index, out, force=where.endswith("forced"))
    assert _tree(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize(("b", "says"), [
    (torch.ones(4, 2), "a is (4, 2) torch.float16, b is (4, 2) torch.float32"),
    (torch.ones(2, 4, dtype=torch.float16), "a is (4, 2) torch.float16, b is (2, 4) torch.float16"),
])
def test_tie_across_dtypes_or_shapes_is_refused_in_one_line(tmp_path, b, says):
    src = tmp_path / "in.safetensors"
    save_file({"a": torch.ones(4, 2, dtype=torch.float16), "b": b}, str(src))
    r = CliRunner().invoke(main, ["fix", str(src), "-o", str(tmp_path / "out.safetensors"), "--tie", "a=b"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines == [f"tiecheck: error: --tie a=b: {says}; only tensors of one shape and dtype can be one tensor"]
    _nothing_published(tmp_path, "in.safetensors")


def test_a_strided_view_trimmed_to_a_compact_copy_verifies_element_for_element(tmp_path):
    """The input's view is not contiguous, so its bytes in the file are not one range: the byte
    check must compare it element for element with the compact copy, not as a run of bytes."""
    big = torch.arange(4096, dtype=torch.float32)
    src = tmp_path / "strided.pt"
    torch.save({"emb.weight": big.view(64, 64)[:8, :8], "bias": torch.zeros(8)}, src)
    out = tmp_path / "trimmed.pt"
    result = fix(src, out)
    assert [(a.kind, a.why) for a in result.plan.actions] == [("trim", "TC021")]
    assert _checks(result)["tensors byte for byte"][0], _checks(result)
    assert result.verified
    written = torch.load(out, weights_only=True)["emb.weight"]
    assert written.is_contiguous()
    assert torch.equal(written, big.view(64, 64)[:8, :8])


def test_a_correct_copy_passes_the_logits_check_on_the_fixed_input(llama_clone, tmp_path):
    result = fix(llama_clone, tmp_path / "out")
    assert _checks(result)["transformers logits"] == (
        True, f"logits on a fixed 16-token input equal the input folder's (1, 16, {VOCAB})")
    assert result.verified


def test_a_config_without_architectures_is_loaded_as_a_causal_lm(llama_clone, tmp_path):
    """transformers' AutoModelForCausalLM reads a config that names no class by its model_type."""
    folder = tmp_path / "anon"
    shutil.copytree(llama_clone, folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["architectures"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert type(transformers.AutoModelForCausalLM.from_pretrained(folder)).__name__ == "LlamaForCausalLM"
    result = fix(folder, tmp_path / "out")
    assert _checks(result)["transformers logits"][0], _checks(result)
    assert result.verified


def test_an_encoder_decoder_is_loaded_as_its_own_class(tmp_path):
    """T5 is no causal LM: the logits check loads the class the config names (and feeds the decoder)."""
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                decoder_start_token_id=0)
    torch.manual_seed(0)
    folder = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(folder)
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    result = fix(folder, tmp_path / "out")
    assert _checks(result)["transformers logits"][0], _checks(result)
    assert result.verified


def test_the_logits_check_leaves_transformers_progress_bars_as_it_found_them(llama_clone, tmp_path):
    tlog = transformers.utils.logging
    assert tlog.is_progress_bar_enabled()
    fix(llama_clone, tmp_path / "out")
    assert tlog.is_progress_bar_enabled()


def test_a_tie_on_the_users_word_counts_the_replaced_name(tmp_path):
    w = torch.randn(32, 8)
    src = tmp_path / "in.safetensors"
    save_file({"emb.weight": w, "head.weight": w + 1}, str(src), metadata={"format": "pt"})
    result = fix(src, tmp_path / "out.safetensors", tie=[("head.weight", "emb.weight")])
    assert _checks(result)["tensors byte for byte"] == (
        True, "2 tensors equal their source (1 by their named replacement); 2,048 bytes compared")
    assert _checks(result)["safetensors reads it"] == (True, "safe_open lists 1 stored names in 1 file(s)")
    assert result.verified


def test_a_finding_the_plan_does_not_answer_may_remain(tmp_path):
    """The head is re-tied (TC005 answered); a transposed copy of the embedding (a TC005 warning fix
    does not act on without --tie) stays in the output: the findings check asks only for the
    findings the plan answered."""
    torch.manual_seed(0)
    emb = torch.randn(64, 16)
    src = tmp_path / "in.pt"
    torch.save({"tok_emb.weight": emb, "head.weight": emb.clone(), "x": emb.t().contiguous()}, src)
    result = fix(src, tmp_path / "out.pt")
    assert [(a.kind, a.why) for a in result.plan.actions] == [("retie", "TC005")]
    left = [(f.code, f.severity, f.names) for f in analyze(str(tmp_path / "out.pt")).findings]
    assert ("TC005", "warning", ("head.weight", "x")) in left
    assert _checks(result)["findings answered"] == (True, "1 answered (TC005), none remains")
    assert result.verified


def _unknown_model(folder: Path) -> None:
    """A config naming a class and a model type transformers does not have."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["NoSuchModelForCausalLM"], model_type="no-such-model")
    (folder / "config.json").write_text(json.dumps(cfg))


def test_an_output_transformers_cannot_load_fails_the_logits_check(llama_clone, tmp_path, monkeypatch):
    _writer(monkeypatch, lambda _path, tmp: _unknown_model(tmp))
    result = fix(llama_clone, tmp_path / "out")
    ok, detail = _checks(result)["transformers logits"]
    assert not ok
    assert detail.startswith("the output does not load: ValueError: ")
    assert "no-such-model" in detail.splitlines()[0]
    assert not result.verified
    _nothing_published(tmp_path)


def test_an_input_transformers_cannot_load_is_not_compared(llama_clone, tmp_path, monkeypatch):
    """The input's config changed to a model transformers does not know by the time the copy is
    checked: the output loads, and with nothing to compare against, the check says so and is skipped."""
    folder = tmp_path / "in"
    shutil.copytree(llama_clone, folder)

    _writer(monkeypatch, lambda path, _tmp: _unknown_model(path))
    result = fix(folder, tmp_path / "out")
    checks = {c.name: c for c in result.checks}
    assert checks["transformers logits"].ok
    assert checks["transformers logits"].skipped
    assert result.verified
    assert checks["transformers logits"].detail.startswith("the output loads; the input does not (")


def test_without_transformers_the_logits_check_is_skipped_and_says_how_to_add_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    [check] = _transformers_checks(None, Path("in"), Path("out"))
    assert (check.name, check.ok, check.skipped) == ("transformers logits", True, True)
    assert check.detail == "transformers is not installed (pip install 'tiecheck[hf]')"


@pytest.mark.parametrize(("layout", "name", "says"), [
    (TORCH, "torch.load(weights_only=True)", "RuntimeError: "),
    (SAFETENSORS, "safetensors reads it", "SafetensorError: "),
])
def test_a_file_its_library_cannot_read_fails_the_library_check(tmp_path, layout, name, says):
    out = tmp_path / "out"
    out.write_bytes(b"\x00" * 64)
    [check] = _library_checks(SimpleNamespace(layout=layout), out)
    assert (check.name, check.ok) == (name, False)
    assert check.detail.startswith(says), check.detail


def test_the_byte_check_names_at_most_five_tensors(tmp_path, monkeypatch):
    src = tmp_path / "in.safetensors"
    save_file({f"t{i}": torch.full((2,), float(i)) for i in range(7)}, str(src))
    _writer(monkeypatch, lambda _path, tmp: save_file({f"t{i}": torch.full((2,), i + 0.5) for i in range(7)},
                                                      str(tmp)))
    result = fix(src, tmp_path / "out.safetensors")
    assert _checks(result)["tensors byte for byte"] == (False, "differ from their source: t0, t1, t2, t3, t4")


def test_a_broken_tie_the_writer_left_is_seen_by_the_content_pass(tmp_path, monkeypatch):
    """TC005 (a head cloned from the embedding) is found by comparing bytes: the check of the copy
    must run that comparison too, or a copy that still holds the clone would pass."""
    torch.manual_seed(0)
    emb = torch.randn(64, 16)
    src = tmp_path / "broken.pt"
    torch.save({"tok_emb.weight": emb, "head.weight": emb.clone(), "ln.weight": torch.ones(16)}, src)
    _writer(monkeypatch, lambda path, tmp: shutil.copyfile(path, tmp))
    result = fix(src, tmp_path / "fixed.pt")
    assert [(a.kind, a.why) for a in result.plan.actions] == [("retie", "TC005")]
    checks = _checks(result)
    assert checks["planned ties"] == (False, "not tied: head.weight=tok_emb.weight")
    assert checks["findings answered"] == (False, "still reported: TC005 head.weight, tok_emb.weight")
    _nothing_published(tmp_path, "broken.pt")


def test_the_byte_check_names_at_most_five_missing_tensors(tmp_path, monkeypatch):
    src = tmp_path / "in.safetensors"
    save_file({f"t{i}": torch.full((2,), float(i)) for i in range(7)}, str(src))
    _writer(monkeypatch, lambda _path, tmp: save_file({"t0": torch.zeros(2)}, str(tmp)))
    result = fix(src, tmp_path / "out.safetensors")
    assert _checks(result)["tensors byte for byte"] == (False, "missing from the output: t1, t2, t3, t4, t5")
