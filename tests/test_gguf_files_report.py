"""What the GGUF loader says about a file beside its tensors: the metadata it reports, the notes on
llama.cpp's output tie, which ggml types count as quantized, and the file spans of the declared tie.
Files are written by ``GGUFWriter``; the metadata is compared with what its ``GGUFReader`` reads."""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter  # noqa: E402 - after the importorskip

from tiecheck.errors import TargetError  # noqa: E402
from tiecheck.loaders.formats.gguf_files import load_gguf, read_gguf  # noqa: E402

from support.gguf_files import add_and_write  # noqa: E402 - imports gguf

V, D = 64, 32


def written(path, tensors: dict, *, vocab: bool = True, tokens: int = 0, quant: dict | None = None, name: str = ""):
    w = GGUFWriter(str(path), "llama")
    if vocab:
        w.add_vocab_size(V)
    if tokens:
        w.add_token_list([f"t{i}" for i in range(tokens)])
    if name:
        w.add_name(name)
    w.add_file_type(7)
    return add_and_write(w, path, tensors, quant)


def emb(seed: int = 0, shape=(V, D)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def test_the_vocabulary_is_the_token_count_when_the_file_gives_no_vocab_size(tmp_path):
    p = written(tmp_path / "t.gguf", {"token_embd.weight": emb()}, vocab=False, tokens=V + 3, name="tiny")
    g = load_gguf(p).extra["gguf"]
    assert len(GGUFReader(str(p)).fields["tokenizer.ggml.tokens"].data) == V + 3
    assert (g["vocab_size"], g["tokens"], g["name"], g["file_type"], g["version"]) == (V + 3, V + 3, "tiny", 7, 3)
    assert g["file_bytes"] == p.stat().st_size
    g = load_gguf(written(tmp_path / "v.gguf", {"token_embd.weight": emb()}, tokens=V + 3)).extra["gguf"]
    assert (g["vocab_size"], g["tokens"], g["name"]) == (V, V + 3, None)  # the file's own vocab_size wins


def test_the_declared_tie_shares_the_embeddings_file_span(tmp_path):
    s = load_gguf(written(tmp_path / "t.gguf", {"token_embd.weight": emb()}))
    assert s.file_spans["output.weight"] == s.file_spans["token_embd.weight"]
    assert s.tensors["output.weight"] is s.tensors["token_embd.weight"]
    assert s.extra["gguf"]["output_tie"] == "declared"
    assert "output.weight is absent: llama.cpp uses token_embd.weight for the output at load" in s.source.notes[1]


def test_a_stored_output_of_the_embeddings_type_and_shape_is_said_to_be_compared(tmp_path):
    s = load_gguf(written(tmp_path / "t.gguf", {"token_embd.weight": emb(), "output.weight": emb(1)}))
    assert s.source.notes[1] == ("output.weight is stored beside token_embd.weight (F32 [64, 32]); llama.cpp ties "
                                 "them only when output.weight is absent: equal content is reported as an untied "
                                 "duplicate")
    s = load_gguf(written(tmp_path / "u.gguf", {"token_embd.weight": emb(), "output.weight": emb(1)},
                          quant={"output.weight": GGMLQuantizationType.Q8_0}))
    assert s.source.notes[1] == ("output.weight (Q8_0 [64, 32]) and token_embd.weight (F32 [64, 32]) are stored "
                                 "separately")
    assert s.source.notes[2].startswith("quantized tensors are compared by their stored blocks")
    s = load_gguf(written(tmp_path / "w.gguf", {"token_embd.weight": emb(), "output.weight": emb(1, (V, D * 2))}))
    assert "are stored separately" in s.source.notes[1]
    assert len(s.source.notes) == 2  # nothing quantized: no note on blocks


@pytest.mark.parametrize(("dtype", "ggml"), [(np.float16, "F16"), (np.float64, "F64"), (np.int8, "I8"),
                                             (np.int16, "I16"), (np.int32, "I32"), (np.int64, "I64")])
def test_plain_ggml_types_are_not_quantized(tmp_path, dtype, ggml):
    arr = np.arange(8).astype(dtype).reshape(2, 4)
    s = load_gguf(written(tmp_path / "p.gguf", {"x": arr}))
    assert s.extra["gguf"]["tensor_types"]["x"] == {"type": ggml, "shape": [2, 4], "bytes": arr.nbytes,
                                                    "quantized": False}
    assert s.tensors["x"].numpy().tolist() == arr.tolist()
    assert "0 quantized" in s.source.notes[0]


def test_an_empty_tensor_is_made_without_touching_the_file(tmp_path):
    """A dim of 0 (GGUFWriter writes what it is given): an empty tensor of the right shape, no span;
    a tensor of one byte is read from the file like any other."""
    p = written(tmp_path / "e.gguf", {"e": np.zeros((0, 4), np.float32), "b": np.array([0x5A], np.int8),
                                      "x": np.ones(4, np.float32)})
    assert [t.n_bytes for t in GGUFReader(str(p)).tensors] == [0, 1, 16]
    s = load_gguf(p)
    assert tuple(s.tensors["e"].shape) == (0, 4)
    assert s.tensors["b"].tolist() == [0x5A]
    assert "e" not in s.file_spans
    assert {"b", "x"} <= set(s.file_spans)


def test_bf16_values_are_viewed_in_place(tmp_path):
    """GGUFReader hands bf16 back as raw bytes: the tensor is those bytes viewed as bfloat16, mapped
    from the file (a span), not copied."""
    values = torch.arange(2 * D, dtype=torch.float32).reshape(2, D).to(torch.bfloat16) / 8
    raw = values.view(torch.uint16).numpy().view(np.uint8).reshape(2, D * 2)
    p = tmp_path / "b.gguf"
    w = GGUFWriter(str(p), "llama")
    w.add_tensor("b", raw, raw_dtype=GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (theirs,) = GGUFReader(str(p)).tensors
    s = load_gguf(p)
    assert s.tensors["b"].dtype == torch.bfloat16
    assert torch.equal(s.tensors["b"], values)
    assert s.tensors["b"].view(torch.uint8).numpy().tobytes() == theirs.data.tobytes()
    assert "b" in s.file_spans


def test_a_file_that_cannot_be_mapped_is_one_line(tmp_path, monkeypatch):
    """Some filesystems (FUSE mounts among them) refuse mmap with ENODEV: said in one line."""
    p = written(tmp_path / "t.gguf", {"token_embd.weight": emb()})

    def refuse(*args, **kwargs):
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    monkeypatch.setattr(mmap, "mmap", refuse)
    with pytest.raises(TargetError, match=r"t.gguf: cannot read \(No such device\)$"):
        read_gguf(p)
