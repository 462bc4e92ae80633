"""GGUF files: llama.cpp's output tie, copies by content or by stored blocks, metadata, hostile headers."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tiecheck
from tiecheck.cli import main
from tiecheck.loaders import detect

from support.cli import inspect_error

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, GGUFWriter  # noqa: E402 - after the importorskip that guards it

from support.gguf_files import add_and_write  # noqa: E402 - imports gguf

V, D = 64, 32
GMLQ8 = GGMLQuantizationType.Q8_0


def write_gguf(path, tensors: dict, *, arch: str = "llama", quant: dict | None = None):
    w = GGUFWriter(str(path), arch)
    w.add_vocab_size(V)
    w.add_embedding_length(D)
    w.add_context_length(16)
    return add_and_write(w, path, tensors, quant)


def weights(seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    return {"token_embd.weight": g.standard_normal((V, D), dtype=np.float32),
            "blk.0.attn_q.weight": g.standard_normal((D, D), dtype=np.float32),
            "output_norm.weight": np.ones(D, dtype=np.float32)}


def test_output_missing_is_a_declared_tie(tmp_path):
    path = write_gguf(tmp_path / "tied.gguf", weights())
    assert detect.sniff_file(path) == detect.GGUF
    r = tiecheck.analyze(str(path))
    assert r.source.format == "GGUF"
    assert [(list(g.names), g.kind, list(g.shape), g.bytes_saved) for g in r.tie_groups] == \
        [(["output.weight", "token_embd.weight"], "shared_storage", [V, D], V * D * 4)]
    assert [(f.code, list(f.names)) for f in r.findings if f.code == "TC012"] == \
        [("TC012", ["output.weight", "token_embd.weight"])]
    g = r.extra["gguf"]
    assert (g["architecture"], g["vocab_size"], g["embedding_length"], g["output_tie"]) == ("llama", V, D, "declared")
    assert "architecture llama, vocab 64, embedding length 32" in r.source.notes[0]


def test_untied_output_is_not_a_tie(tmp_path):
    w = weights()
    w["output.weight"] = weights(1)["token_embd.weight"]
    r = tiecheck.analyze(str(write_gguf(tmp_path / "untied.gguf", w)))
    assert r.tie_groups == ()
    assert r.untied_duplicates == ()
    assert r.extra["gguf"]["output_tie"] == "stored"


def test_duplicated_output_found_by_content(tmp_path):
    w = weights()
    w["output.weight"] = w["token_embd.weight"].copy()
    r = tiecheck.analyze(str(write_gguf(tmp_path / "dup.gguf", w)))
    assert r.tie_groups == ()
    assert [(list(d.names), d.dtype, d.bytes_wasted) for d in r.untied_duplicates] == \
        [(["output.weight", "token_embd.weight"], "float32", V * D * 4)]
    assert [list(f.names) for f in r.findings if f.code == "TC005"] == [["output.weight", "token_embd.weight"]]


def test_quantized_duplicate_found_by_stored_blocks(tmp_path):
    w = weights()
    w["output.weight"] = w["token_embd.weight"].copy()
    q8 = {"token_embd.weight": GMLQ8, "output.weight": GMLQ8}
    r = tiecheck.analyze(str(write_gguf(tmp_path / "q8.gguf", w, quant=q8)))
    row_bytes = D // 32 * 34  # Q8_0: blocks of 32 weights in 34 bytes
    assert [(list(d.names), d.dtype, list(d.shape), d.bytes_wasted) for d in r.untied_duplicates] == \
        [(["output.weight", "token_embd.weight"], "uint8", [V, row_bytes], V * row_bytes)]
    types = r.extra["gguf"]["tensor_types"]
    assert types["output.weight"] == {"type": "Q8_0", "shape": [V, D], "bytes": V * row_bytes, "quantized": True}


def test_quantized_output_missing_still_ties(tmp_path):
    r = tiecheck.analyze(str(write_gguf(tmp_path / "q.gguf", weights(), quant={"token_embd.weight": GMLQ8})))
    assert [list(g.names) for g in r.tie_groups] == [["output.weight", "token_embd.weight"]]


def test_flops_say_pytorch_only(tmp_path):
    r = tiecheck.analyze(str(write_gguf(tmp_path / "t.gguf", weights())), flops=True)
    assert r.flops.available is False
    assert "PyTorch modules only" in r.flops.reason


# -- hostile files ----------------------------------------------------------------------------

def test_counts_that_overflow(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", weights())
    data = bytearray(path.read_bytes())
    data[8:16] = struct.pack("<Q", (1 << 64) - 1)
    path.write_bytes(bytes(data))
    assert "claims 18,446,744,073,709,551,615 tensors" in inspect_error(path)


def test_truncated_data(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", weights())
    path.write_bytes(path.read_bytes()[:-100])
    msg = inspect_error(path)
    assert "not a valid GGUF file" in msg
    assert "truncated" in msg


def test_truncated_header(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", weights())
    path.write_bytes(path.read_bytes()[:200])
    msg = inspect_error(path)
    assert "not a valid GGUF file" in msg
    assert ("truncated" in msg or "corrupt" in msg)


def test_unknown_version(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", weights())
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    path.write_bytes(bytes(data))
    assert "version 99" in inspect_error(path)


def test_tensor_dims_that_overflow(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", {"token_embd.weight": np.zeros((4, 32), dtype=np.float32)})
    data = bytearray(path.read_bytes())
    name = b"token_embd.weight"
    at = data.index(name) + len(name)  # then n_dims (u32) and the dims (u64 each)
    data[at + 4:at + 20] = struct.pack("<QQ", 1 << 40, 1 << 40)
    path.write_bytes(bytes(data))
    msg = inspect_error(path)
    assert "not a valid GGUF file" in msg
    assert "more bytes than any file can hold" in msg


def test_the_header_reads_as_gguf_reader_reads_it(tmp_path):
    """read_gguf (no numpy view per array element) against the gguf package's own GGUFReader, on a
    file with scalar, string and array metadata, quantized, bf16 and plain tensors, and an alignment."""
    from tiecheck.loaders.formats.gguf_files import ArrayValue, _tensor_layout, read_gguf  # noqa: PLC0415 - the [gguf] extra

    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_vocab_size(V)
    w.add_name("tiny")
    w.add_custom_alignment(64)
    w.add_token_list([f"tok{i}" for i in range(V)])
    w.add_token_scores([float(i) for i in range(V)])
    w.add_array("test.ints", [1, 2, 3])
    w.add_bool("test.flag", True)
    w.add_float64("test.pi", 3.25)
    tensors = weights()
    w.add_tensor("token_embd.weight", tensors["token_embd.weight"])
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(tensors["blk.0.attn_q.weight"], GMLQ8), raw_dtype=GMLQ8)
    bf16 = gguf.quants.quantize(tensors["output_norm.weight"], GGMLQuantizationType.BF16)
    w.add_tensor("output_norm.weight", bf16, raw_dtype=GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    theirs = gguf.GGUFReader(str(path))
    ours = read_gguf(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, f in theirs.fields.items():
        mine = ours.fields[key]
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            assert mine == ArrayValue(f.types[-1], len(f.data)), key
        else:
            assert mine == f.contents(), key
    assert ours.data_offset == theirs.data_offset
    for t, r in zip(ours.tensors, theirs.tensors, strict=True):
        qtype, nbytes, shape, dtype = _tensor_layout(path, t)
        assert (t.name, list(t.dims), qtype, ours.data_offset + t.offset) == \
            (r.name, r.shape.tolist(), r.tensor_type, r.data_offset)
        assert (nbytes, shape, dtype) == (r.n_bytes, r.data.shape, r.data.dtype), t.name


# -- tiecheck diff: a PyTorch checkpoint against its GGUF conversion ---------------------------

def _tied_checkpoint(tmp_path):
    import torch  # noqa: PLC0415 - only these tests build a PyTorch checkpoint

    w = weights()
    emb = torch.from_numpy(w["token_embd.weight"]).half().float()  # values a float16 file holds exactly
    sd = {"model.embed.weight": emb, "lm_head.weight": emb,
          "model.q.weight": torch.from_numpy(w["blk.0.attn_q.weight"]).clone()}
    torch.save(sd, tmp_path / "model.pt")
    return tmp_path / "model.pt", {"token_embd.weight": emb.half().numpy(),
                                   "blk.0.attn_q.weight": w["blk.0.attn_q.weight"]}


def test_diff_against_gguf_keeps_the_declared_tie(tmp_path):
    pt, arrays = _tied_checkpoint(tmp_path)
    d = tiecheck.diff(str(pt), str(write_gguf(tmp_path / "m.gguf", arrays)))
    assert d.matching == "content"
    assert d.exit_code == 0
    assert d.lost == ()
    assert d.b_only == ()
    (g,) = d.kept
    assert g.tied_in_b
    assert g.in_b[0].names == ("output.weight", "token_embd.weight")
    assert g.in_b[0].method == "exact values, float32→float16 lossless"
    rows = {m.a: [(list(b.names), b.method) for b in m.b] for m in d.matches}
    assert rows[("model.q.weight",)] == [(["blk.0.attn_q.weight"], "exact bytes")]


def test_diff_against_gguf_with_a_stored_output_copy(tmp_path):
    pt, arrays = _tied_checkpoint(tmp_path)
    arrays["output.weight"] = arrays["token_embd.weight"].copy()
    res = CliRunner().invoke(main, ["diff", str(pt), str(write_gguf(tmp_path / "m.gguf", arrays))])
    assert res.exit_code == 1
    assert f"became 2 copies (+{V * D * 2:,} bytes)" in res.output


def test_diff_against_quantized_gguf_matches_by_shape_and_position(tmp_path):
    pt, arrays = _tied_checkpoint(tmp_path)
    arrays["token_embd.weight"] = arrays["token_embd.weight"].astype(np.float32)
    d = tiecheck.diff(str(pt), str(write_gguf(tmp_path / "q.gguf", arrays, quant={"token_embd.weight": GMLQ8})))
    (g,) = d.kept
    assert [b.placed() for b in g.in_b] == [{"names": ["output.weight", "token_embd.weight"],
                                           "method": "shape and position", "bytes": V * (D // 32 * 34)}]



def test_diff_against_quantized_gguf_with_its_own_output_is_not_a_kept_tie(tmp_path):
    # Quantized, nothing matches by value: shape and position decide, and two B tensors of the
    # tie's shape mean the tie became copies, not "one tensor in B".
    pt, arrays = _tied_checkpoint(tmp_path)
    arrays["token_embd.weight"] = arrays["token_embd.weight"].astype(np.float32)
    arrays["output.weight"] = arrays["token_embd.weight"].copy()
    quant = {"token_embd.weight": GMLQ8, "output.weight": GMLQ8}
    d = tiecheck.diff(str(pt), str(write_gguf(tmp_path / "q2.gguf", arrays, quant=quant)))
    assert d.kept == ()
    assert d.exit_code == 1
    (g,) = d.lost
    assert sorted(n for b in g.in_b for n in b.names) == ["output.weight", "token_embd.weight"]
    assert {b.method for b in g.in_b} == {"shape and position"}
    assert g.bytes_copied == V * (D // 32 * 34)

def test_bf16_tensors_keep_their_dtype_and_count(tmp_path):
    emb = torch.randn(V, D, dtype=torch.bfloat16)
    raw = emb.view(torch.uint16).numpy().view(np.uint8).reshape(V, D * 2)
    w = GGUFWriter(str(tmp_path / "bf16.gguf"), "llama")
    w.add_tensor("token_embd.weight", raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = tiecheck.analyze(str(tmp_path / "bf16.gguf"), duplicates=False)
    row = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert row.dtype == "bfloat16"
    assert list(row.shape) == [V, D]
    assert r.summary.params_counted == 2 * V * D  # the embedding and llama.cpp's tied output
    assert r.extra["gguf"]["tensor_types"]["token_embd.weight"]["quantized"] is False


def test_data_ending_one_byte_past_the_file_is_refused(tmp_path):
    """The last tensor ends exactly at the end of the file; one byte fewer and it ends one byte past."""
    path = write_gguf(tmp_path / "t.gguf", weights())
    reader = gguf.GGUFReader(str(path))
    last = max(reader.tensors, key=lambda t: t.data_offset)
    assert last.data_offset + last.n_bytes == path.stat().st_size  # no padding after it
    assert last.name in tiecheck.loaders.load_target(str(path)).tensors  # the whole file loads
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="size must be a divisor"):  # gguf's own reader fails on it too
        gguf.GGUFReader(str(path))
    msg = inspect_error(path)
    assert f"tensor {last.name!r} needs bytes {last.data_offset:,}..{size:,} but the file holds {size - 1:,}" in msg
    assert "truncated" in msg
