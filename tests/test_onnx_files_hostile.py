"""Hostile ONNX models, each check of the loader at its limit: models written with ``onnx.helper``
(external data by ``onnx.save_model`` itself where it can write it), then edited; what ``onnx`` reads
from the same file is the reference where it reads it."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from support.cli import inspect_error

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402 - after the importorskip that guards it

import tiecheck  # noqa: E402
from tiecheck.errors import TargetError  # noqa: E402
from tiecheck.loaders.formats import onnx_files  # noqa: E402 - needs onnx
from tiecheck.loaders.formats.onnx_files import load_onnx  # noqa: E402
from tiecheck.loaders.tensor_facts import fact_of  # noqa: E402


def model(path, inits, *, sparse=(), producer: str = "", nodes=None):
    """A model reading ``inits`` (TensorProtos) through one Gather each, saved as it is (no external data moved)."""
    nodes = nodes if nodes is not None else [helper.make_node("Identity", [t.name], [f"y{i}"]) for i, t in enumerate(inits)]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for n in nodes for o in n.output]
    graph = helper.make_graph(nodes, "g", [], outputs, initializer=inits, sparse_initializer=list(sparse))
    m = helper.make_model(graph, producer_name=producer)
    path.write_bytes(m.SerializeToString())
    return path


def floats(name: str, shape, start: float = 0.0) -> TensorProto:
    return numpy_helper.from_array((np.arange(int(np.prod(shape)), dtype=np.float32) + start).reshape(shape), name)


def external(path, inits, location: str = "w.data"):
    """The model saved by ``onnx.save_model`` with every initializer in ``location``."""
    m = onnx.load_model_from_string(model(path, inits).read_bytes())
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return path


def set_external(path, name: str, **entries: str):
    """Rewrite an initializer's external data entries (location, offset, length) in the saved model."""
    m = onnx.load(str(path), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == name)
    kept = {e.key: e.value for e in t.external_data} | entries
    del t.external_data[:]
    for k, v in kept.items():
        if v is not None:
            e = t.external_data.add()
            e.key, e.value = k, v
    path.write_bytes(m.SerializeToString())


def refused(path, text: str) -> str:
    with pytest.raises(TargetError) as e:
        load_onnx(path)
    assert text in str(e.value)
    assert text in inspect_error(path)
    return str(e.value)


# -- the protobuf ---------------------------------------------------------------------------------

def test_the_size_limit_is_protobufs_own(tmp_path, monkeypatch):
    assert onnx_files.MAX_PROTO == onnx.checker.MAXIMUM_PROTOBUF == 2_147_483_647
    p = model(tmp_path / "m.onnx", [floats("w", (2, 2))])
    monkeypatch.setattr(onnx_files, "MAX_PROTO", p.stat().st_size)
    assert list(load_onnx(p).tensors) == ["w"]  # a file of exactly the limit is read
    monkeypatch.setattr(onnx_files, "MAX_PROTO", p.stat().st_size - 1)
    with pytest.raises(TargetError, match=f"{p.stat().st_size:,} bytes exceeds protobuf's 2 GiB limit"):
        load_onnx(p)


def test_a_model_without_a_graph(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(onnx.ModelProto(ir_version=8, producer_name="x").SerializeToString())
    assert not onnx.load(str(p)).HasField("graph")
    with pytest.raises(TargetError, match="not a valid ONNX model: the model holds no graph"):
        load_onnx(p)


def test_bytes_protobuf_cannot_parse(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"\x08\x07\x12" + b"\xff" * 40)
    with pytest.raises(DecodeError):  # onnx's own load fails on it
        onnx.load(str(p))
    with pytest.raises(TargetError, match=r"the protobuf cannot be parsed \(.+\): the file is truncated or corrupt"):
        load_onnx(p)


@pytest.mark.parametrize("error", [DecodeError("Error parsing message " + "x" * 300 + "\nsecond line"), DecodeError()])
def test_a_parse_error_is_told_in_its_first_160_characters(tmp_path, monkeypatch, error):
    """What protobuf says goes on the one line, cut; an error without a message is named by its type."""
    p = model(tmp_path / "m.onnx", [floats("w", (2,))])

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(onnx, "load", fail)
    told = str(error).splitlines()[0][:160] if str(error) else "DecodeError"
    with pytest.raises(TargetError, match=re.escape(f"the protobuf cannot be parsed ({told}): the file is truncated")):
        load_onnx(p)


def test_a_model_that_cannot_be_read(tmp_path):
    with pytest.raises(TargetError, match=r"absent\.onnx: cannot read \(No such file or directory\)"):
        load_onnx(tmp_path / "absent.onnx")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(IsADirectoryError):  # what onnx.load raises for it
        onnx.load(str(tmp_path / "dir.onnx"))
    with pytest.raises(TargetError, match=r"dir\.onnx: cannot read \(Is a directory\)"):
        load_onnx(tmp_path / "dir.onnx")


# -- initializers in the protobuf -------------------------------------------------------------------

def test_negative_dims(tmp_path):
    t = floats("w", (2, 2))
    t.dims[:] = [-1, 4]
    refused(model(tmp_path / "m.onnx", [t]), "initializer 'w' has dims [-1, 4]: negative sizes")


def test_a_zero_dim_counts_as_one_against_the_byte_limit(tmp_path):
    """An empty tensor still gets strides from its other dims: they must fit in 64 bits too."""
    t = numpy_helper.from_array(np.zeros((0, 4), np.float32), "w")
    t.dims[:] = [0, 1 << 30, 1 << 30]  # 2**62 bytes were it not empty: read, as an empty tensor
    s = load_onnx(model(tmp_path / "m.onnx", [t]))
    assert tuple(s.tensors["w"].shape) == (0, 1 << 30, 1 << 30)
    t.dims[:] = [0, 1 << 31, 1 << 30]  # 2**63 bytes: no stride of it fits
    refused(model(tmp_path / "n.onnx", [t]), "initializer 'w' has dims [0, 2147483648, 1073741824]: more bytes")


@pytest.mark.parametrize(("dims", "fits"), [((1 << 62, 2), False), (((1 << 63) - 1,), True)])
def test_initializer_bytes_at_the_limit_of_a_file(tmp_path, dims, fits):
    """Up to 2**63 - 1 bytes an initializer is only missing its data; past it, no file holds it."""
    t = TensorProto(name="w", data_type=TensorProto.INT8, raw_data=b"")
    t.dims.extend(dims)
    refused(model(tmp_path / "m.onnx", [t]), "needs 9,223,372,036,854,775,807 bytes but holds 0" if fits
            else "initializer 'w' has dims [4611686018427387904, 2]: more bytes than any file can hold")


def test_empty_initializers_share_no_storage(tmp_path):
    """Two empty initializers hold no bytes: neither a tie nor a copy of each other."""
    inits = [numpy_helper.from_array(np.zeros((0, 4), np.float32), n) for n in ("a", "b")]
    r = tiecheck.analyze(str(model(tmp_path / "m.onnx", inits)))
    assert {t.name for t in r.tensors} == {"a", "b"}
    assert r.tie_groups == ()


def test_raw_data_of_the_wrong_length(tmp_path):
    t = floats("w", (2, 4))
    t.raw_data = t.raw_data[:-4]
    refused(model(tmp_path / "m.onnx", [t]), "initializer 'w' (float32 [2, 4]) needs 32 bytes but holds 28")


def test_typed_data_of_the_wrong_length(tmp_path):
    t = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    del t.float_data[-1]
    with pytest.raises(ValueError, match="cannot reshape"):  # onnx's own reader refuses it too
        numpy_helper.to_array(t)
    refused(model(tmp_path / "m.onnx", [t]), "initializer 'w' cannot be read (cannot reshape array of size 3")


def test_typed_data_is_read_as_onnx_reads_it(tmp_path):
    t = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.5])
    assert not t.HasField("raw_data")
    s = load_onnx(model(tmp_path / "m.onnx", [t, floats("r", (3,))]))
    assert s.tensors["w"].numpy().tolist() == numpy_helper.to_array(t).tolist()
    assert s.tensors["r"].numpy().tolist() == [0.0, 1.0, 2.0]
    assert not any("skipped" in n for n in s.source.notes)


def test_an_error_of_onnxs_reader_is_told_in_its_first_120_characters(tmp_path, monkeypatch):
    t = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    p = model(tmp_path / "m.onnx", [t])

    def fail(tensor):
        raise ValueError("y" * 300)

    monkeypatch.setattr(numpy_helper, "to_array", fail)
    msg = refused(p, f"initializer 'w' cannot be read ({'y' * 120})")
    assert "y" * 121 not in msg


@pytest.mark.parametrize("name", ["", "w"])
def test_an_initializer_name_empty_or_used_twice(tmp_path, name):
    inits = [floats("w", (2,)), floats(name, (2,))]
    refused(model(tmp_path / "m.onnx", inits, nodes=[]), f"initializer name {name!r} is empty or used twice")


def test_types_not_read_and_sparse_initializers_are_noted(tmp_path):
    s_init = helper.make_tensor("s", TensorProto.STRING, [1], [b"x"])
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(1, np.float32), "sp"),
                                       numpy_helper.from_array(np.zeros(1, np.int64), "sp_i"), [4])
    s = load_onnx(model(tmp_path / "m.onnx", [floats("w", (2,)), s_init], sparse=[sparse], nodes=[]))
    assert list(s.tensors) == ["w"]
    assert "skipped 1 initializer(s) of types tiecheck does not read (e.g. s)" in s.source.notes
    assert "skipped 1 sparse initializer(s)" in s.source.notes
    p = model(tmp_path / "n.onnx", [s_init], nodes=[])
    refused(p, "the ONNX graph holds no initializers (no weights to analyse)")


# -- external data ----------------------------------------------------------------------------------

@pytest.mark.parametrize("location", ["", "sub\\w.data", "w.data\x00.txt"])
def test_external_locations_refused_by_name(tmp_path, location):
    p = external(tmp_path / "m.onnx", [floats("w", (2, 4))])
    set_external(p, "w", location=location)
    refused(p, "lies outside the model's folder; refusing to read it")


def test_external_data_in_a_subfolder_is_read(tmp_path):
    (tmp_path / "sub").mkdir()
    p = external(tmp_path / "m.onnx", [floats("w", (2, 4))], location="sub/w.data")
    assert (tmp_path / "sub" / "w.data").stat().st_size == 32
    s = load_onnx(p)
    assert s.tensors["w"].numpy().tolist() == numpy_helper.to_array(onnx.load(str(p)).graph.initializer[0]).tolist()
    assert s.extra["onnx"]["external_files"] == ["w.data"]


@pytest.mark.parametrize("entry", ["offset", "length"])
def test_a_malformed_offset_or_length(tmp_path, entry):
    p = external(tmp_path / "m.onnx", [floats("w", (2, 4))])
    set_external(p, "w", **{entry: "4k"})
    refused(p, "initializer 'w' has a malformed external data offset or length")


def test_a_negative_offset(tmp_path):
    p = external(tmp_path / "m.onnx", [floats("w", (2, 4))])
    set_external(p, "w", offset="-4")
    refused(p, "initializer 'w' (float32 [2, 4]) needs 32 bytes but its external data says offset -4, length 32")


def test_no_length_is_the_tensors_own(tmp_path):
    p = external(tmp_path / "m.onnx", [floats("w", (2, 4)), floats("v", (2,), 100)])
    set_external(p, "v", length=None)
    s = load_onnx(p)
    assert s.tensors["v"].numpy().tolist() == [100.0, 101.0]
    (tmp_path / "w.data").write_bytes((tmp_path / "w.data").read_bytes()[:-1])
    refused(p, "initializer 'v' needs bytes ")


def shifted(tmp_path, by: int):
    """A model whose one initializer, "w" (2 x 4), sits ``by`` bytes into w.data."""
    p = external(tmp_path / "m.onnx", [floats("w", (2, 4))])
    data = tmp_path / "w.data"
    data.write_bytes(b"\0" * by + data.read_bytes())
    set_external(p, "w", offset=str(by))
    return p


def test_data_ending_at_the_files_last_byte_is_read_one_past_refused(tmp_path):
    p = shifted(tmp_path, 4)
    assert load_onnx(p).tensors["w"].numpy().ravel().tolist() == list(range(8))
    data = tmp_path / "w.data"
    data.write_bytes(data.read_bytes()[:-1])
    refused(p, "initializer 'w' needs bytes 4..36 of w.data, which holds 35: the data file is truncated")


def test_no_offset_is_offset_0_and_one_byte_is_read(tmp_path):
    p = external(tmp_path / "m.onnx", [numpy_helper.from_array(np.array([0x5A], np.uint8), "b")])
    set_external(p, "b", offset=None)
    assert {e.key for e in onnx.load(str(p), load_external_data=False).graph.initializer[0].external_data} == \
        {"location", "length"}
    s = load_onnx(p)
    assert s.tensors["b"].tolist() == [0x5A] == numpy_helper.to_array(onnx.load(str(p)).graph.initializer[0]).tolist()
    assert "b" in s.file_spans


def test_an_initializer_not_read_is_not_counted_nor_its_data_opened(tmp_path):
    """A type tiecheck does not read, stored in an external file that is not even there: skipped,
    and the model's other initializers are described as usual (the summary first)."""
    q = helper.make_tensor("q", TensorProto.UINT4, [4], [1, 2, 3, 4])
    q.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "absent.data"), ("offset", "0"), ("length", "2")):
        e = q.external_data.add()
        e.key, e.value = k, v
    s = load_onnx(model(tmp_path / "m.onnx", [floats("w", (2,)), q], nodes=[]))
    assert s.source.notes[0].startswith("2 initializers (0 in external data); graph of 0 nodes")
    assert "skipped 1 initializer(s) of types tiecheck does not read (e.g. q)" in s.source.notes
    assert s.extra["onnx"]["external_files"] == []


def test_a_missing_data_file(tmp_path):
    p = external(tmp_path / "m.onnx", [floats("w", (2, 4))])
    (tmp_path / "w.data").unlink()
    refused(p, "external data w.data of initializer 'w' cannot be read (No such file or directory); copy it next to")


def test_an_empty_data_file_holds_empty_tensors_only(tmp_path):
    p = external(tmp_path / "m.onnx", [floats("w", (2, 4))])
    (tmp_path / "w.data").write_bytes(b"")
    m = onnx.load(str(p), load_external_data=False)
    m.graph.initializer[0].dims[:] = [0, 4]
    p.write_bytes(m.SerializeToString())
    set_external(p, "w", offset="0", length="0")
    s = load_onnx(p)
    assert tuple(s.tensors["w"].shape) == (0, 4)
    assert s.extra["onnx"]["external_bytes"] == 0
    m.graph.initializer[0].dims[:] = [2, 4]
    p.write_bytes(m.SerializeToString())
    set_external(p, "w", length="32")
    refused(p, "initializer 'w' needs bytes 0..32 of w.data, which holds 0")


def test_an_unaligned_offset_is_copied_and_noted(tmp_path):
    p = shifted(tmp_path, 2)
    theirs = onnx.load(str(p))  # onnx reads external data at any offset
    s = load_onnx(p)
    assert s.tensors["w"].numpy().tolist() == numpy_helper.to_array(theirs.graph.initializer[0]).tolist()
    assert "w: external data at an unaligned offset, copied into memory" in s.source.notes
    assert "w" not in s.file_spans


def test_the_summary_note(tmp_path):
    p = external(tmp_path / "m.onnx", [floats("w", (2, 4))])
    s = load_onnx(p)
    assert s.source.notes[0] == ("1 initializers (1 in external data w.data); graph of 1 nodes, opset "
                                 f"{onnx.defs.onnx_opset_version()}, produced by unknown")
    assert s.extra["onnx"]["external_bytes"] == os.path.getsize(tmp_path / "w.data")
    assert s.extra["onnx"]["file_bytes"] == os.path.getsize(p)
    assert s.source.notes[-1] == "no initializer is read both by a Gather (embedding) and a MatMul/Gemm (head)"


# -- where the content pass reads each initializer --------------------------------------------------

def test_layouts_for_the_content_pass(tmp_path):
    """An initializer in external data is read with pread at its byte offset; one in the protobuf is
    sliced from the inline buffer; a transposed alias (not contiguous) is neither."""
    p = external(tmp_path / "m.onnx", [floats("e", (2, 4)), floats("w", (4, 2), 8)])
    set_external(p, "e", length=None)
    s = load_onnx(p)
    theirs = {e.key: int(e.value) for e in onnx.load(str(p), load_external_data=False).graph.initializer[1].external_data
              if e.key in ("offset", "length")}
    assert s.tensors.file_layout("w") == (theirs["offset"], theirs["length"], 4) == (32, 32, 4)
    assert s.tensors.memory_layout("w") is None
    s.tensors.add_alias("w:T", "w", transposed=True)
    assert tuple(s.tensors["w:T"].shape) == (2, 4)
    assert torch.equal(s.tensors["w:T"], s.tensors["w"].t())
    assert s.tensors.file_layout("w:T") is None
    facts = {f.name: f for f in s.tensors.facts()}
    assert (facts["w"].byte_start, facts["w"].byte_end, facts["w"].storage_bytes) == (32, 64, 64)
    assert (facts["w:T"].byte_start, facts["w:T"].byte_end, facts["w:T"].storage) == (32, 64, facts["w"].storage)
    assert (facts["e"].byte_start, facts["e"].byte_end) == (0, 32)

    inline = load_onnx(model(tmp_path / "i.onnx", [floats("a", (3,)), floats("b", (2, 2), 5)]))
    held = inline.tensors.memory_layout("b")
    assert (held.offset, held.nbytes, held.itemsize) == (16, 16, 4)  # "a" takes 12 bytes: "b" starts aligned
    assert bytes(held.buffer[held.offset:held.offset + held.nbytes]) == floats("b", (2, 2), 5).raw_data
    assert inline.tensors.file_layout("b") is None
    facts = {f.name: f for f in inline.tensors.facts()}
    assert facts["b"].storage[1] - facts["a"].storage[1] == 16
    assert (facts["b"].byte_start, facts["b"].byte_end, facts["b"].storage_bytes) == (0, 16, 16)


def test_facts_describe_the_tensors_made_on_access(tmp_path):
    """``facts()`` describes 200,000 initializers from their records alone: each must be what
    ``fact_of`` says of the tensor made on access (external, inline, empty, a column, an alias;
    names with and without a dot; float, complex and integer types)."""
    (tmp_path / "sub").mkdir()
    ext = [floats("model.embed.weight", (4, 2)), numpy_helper.from_array(np.arange(6, dtype=np.int64), "ids")]
    p = external(tmp_path / "m.onnx", ext, location="sub/w.data")
    m = onnx.load(str(p), load_external_data=False)
    m.graph.initializer.extend([
        floats("col", (3, 1), 1), numpy_helper.from_array(np.zeros((0, 3), np.float16), "layer.empty"),
        numpy_helper.from_array(np.array([1 + 2j, 3j], np.complex64), "z"),
        helper.make_tensor("typed.w", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0])])
    p.write_bytes(m.SerializeToString())
    s = load_onnx(p)
    assert s.tensors["col"].numpy().ravel().tolist() == [1.0, 2.0, 3.0]
    s.tensors.add_alias("head:B", "model.embed.weight", transposed=True)
    facts = {f.name: f for f in s.tensors.facts()}
    assert set(facts) == set(s.tensors) == {"model.embed.weight", "ids", "col", "layer.empty", "z", "typed.w", "head:B"}
    for name, f in facts.items():
        assert f == fact_of(name, s.tensors[name]), name
    assert (facts["layer.empty"].storage, facts["layer.empty"].owner) == (None, "layer")
    assert (facts["z"].is_floating, facts["ids"].is_floating) == (True, False)
