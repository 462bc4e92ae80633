"""Hostile GGUF files, each check of the header reader at its limit: the file one byte inside a
limit reads (and the gguf package's own ``GGUFReader`` reads it too), one byte past it is refused
in one line. Files are written by ``GGUFWriter`` and then edited by hand; where a limit needs a file
that ends exactly at a boundary, the few bytes are packed here and ``GGUFReader`` confirms them."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from support.cli import inspect_error

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter  # noqa: E402 - after the importorskip

from tiecheck.errors import TargetError  # noqa: E402
from tiecheck.loaders.formats.gguf_files import ArrayValue, check_header, load_gguf, read_gguf  # noqa: E402


def header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def key(name: bytes) -> bytes:
    return struct.pack("<Q", len(name)) + name


def tensor_info(name: bytes, dims: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    return key(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ggml_type, offset)


def written(path, *, kv=(), tensors=(), alignment: int | None = None):
    """A GGUF file from GGUFWriter: ``kv`` as (method, key, value), ``tensors`` as (name, array[, type])."""
    w = GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.data_alignment = alignment  # add_custom_alignment refuses what is not a power of two
    for method, k, v in kv:
        getattr(w, method)(k, v)
    for name, arr, *qtype in tensors:
        w.add_tensor(name, arr, raw_dtype=qtype[0] if qtype else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def edit(path, old: bytes, new: bytes, count: int = 1):
    data = path.read_bytes()
    assert data.count(old) >= count, old
    path.write_bytes(data.replace(old, new, count))


def refused(path, text: str) -> str:
    """``read_gguf`` refuses the file with ``text`` in its message, and so does ``tiecheck inspect``
    (exit 2, one line)."""
    with pytest.raises(TargetError, match="not a valid GGUF file") as e:
        load_gguf(path)
    assert text in str(e.value)
    assert text in inspect_error(path)
    return str(e.value)


# -- the header's counts against the file's size --------------------------------------------------

def test_counts_that_exactly_fill_the_file_are_read(tmp_path):
    """The smallest key/value (an empty key holding one uint8) is 13 bytes, the smallest tensor info
    (an empty name, no dims) 24: a file holding exactly that many passes the count check."""
    one_kv = tmp_path / "kv.gguf"
    one_kv.write_bytes(header(0, 1) + key(b"") + struct.pack("<IB", GGUFValueType.UINT8, 7))
    assert GGUFReader(str(one_kv)).fields[""].contents() == 7
    assert check_header(one_kv) == (3, 0, 1)
    assert read_gguf(one_kv).fields[""] == 7  # the last byte read is the file's last
    with pytest.raises(TargetError, match="holds no tensors"):
        load_gguf(one_kv)

    one_tensor = tmp_path / "t.gguf"
    one_tensor.write_bytes(header(1, 0) + tensor_info(b"", ()))
    assert check_header(one_tensor) == (3, 1, 0)
    (t,) = read_gguf(one_tensor).tensors
    assert (t.name, t.dims, t.type, t.offset) == ("", (), 0, 0)


def test_counts_one_past_the_file_are_refused(tmp_path):
    p = tmp_path / "kv.gguf"
    p.write_bytes(header(0, 2) + key(b"") + struct.pack("<IB", GGUFValueType.UINT8, 7))
    with pytest.raises(TargetError, match="claims 0 tensors and 2 metadata keys, more than 37 bytes can hold"):
        check_header(p)
    p.write_bytes(header(2, 0) + tensor_info(b"", ()))
    with pytest.raises(TargetError, match="claims 2 tensors and 0 metadata keys, more than 48 bytes can hold"):
        check_header(p)


def test_the_header_itself(tmp_path):
    p = tmp_path / "h.gguf"
    p.write_bytes(header(0, 0)[:23])
    with pytest.raises(TargetError, match="23 bytes is too short to hold the 24-byte header"):
        check_header(p)
    p.write_bytes(b"GGUG" + header(0, 0)[4:])
    with pytest.raises(TargetError, match="the magic is not GGUF"):
        check_header(p)
    p.write_bytes(header(0, 0))  # the 24 bytes alone: a file of nothing
    assert check_header(p) == (3, 0, 0)
    with pytest.raises(TargetError, match="holds no tensors"):
        load_gguf(p)


def test_version_2_is_read_as_version_3(tmp_path):
    p = tmp_path / "v2.gguf"
    p.write_bytes(header(0, 1, version=2) + key(b"k") + struct.pack("<IB", GGUFValueType.UINT8, 7))
    assert GGUFReader(str(p)).fields["k"].contents() == 7
    assert read_gguf(p).fields == {"GGUF.version": 2, "GGUF.tensor_count": 0, "GGUF.kv_count": 1, "k": 7}
    p.write_bytes(header(0, 1, version=1) + key(b"k") + struct.pack("<IB", GGUFValueType.UINT8, 7))
    with pytest.raises(TargetError, match="version 1; tiecheck reads GGUF versions 2 and 3"):
        check_header(p)


# -- strings and names ------------------------------------------------------------------------------

def test_a_string_of_4096_bytes_is_kept_and_a_longer_one_skipped(tmp_path):
    p = written(tmp_path / "s.gguf", kv=[("add_string", "test.kept", "k" * 4096),
                                         ("add_string", "test.long", "l" * 4097)])
    fields = read_gguf(p).fields
    assert fields["test.kept"] == GGUFReader(str(p)).fields["test.kept"].contents()
    assert fields["test.long"] is None
    assert list(fields).index("test.long") == len(fields) - 1  # skipped by its length: nothing after it lost


def test_a_name_of_64_kib_is_read_and_a_longer_one_refused(tmp_path):
    longest = "k" * (64 << 10)
    p = written(tmp_path / "k.gguf", kv=[("add_uint8", longest, 1)], tensors=[("t" * (64 << 10), np.ones(4, np.float32))])
    g = read_gguf(p)
    assert g.fields[longest] == 1
    assert g.tensors[0].name == "t" * (64 << 10)

    p = written(tmp_path / "k1.gguf", kv=[("add_uint8", longest + "k", 1)])
    refused(p, "metadata key 1 is longer than 65,536 bytes")
    p = written(tmp_path / "t1.gguf", tensors=[("t" * ((64 << 10) + 1), np.ones(4, np.float32))])
    refused(p, "the name of tensor 0 is longer than 65,536 bytes")


def test_a_key_that_is_not_utf8(tmp_path):
    p = written(tmp_path / "u.gguf", kv=[("add_uint8", "test.ab", 1)])
    edit(p, b"test.ab", b"test.\xff\xfe")
    refused(p, "metadata key 1 at byte ")
    assert "is not UTF-8" in refused(p, "is not UTF-8")


# -- value types and arrays -------------------------------------------------------------------------

def test_a_value_type_gguf_does_not_define(tmp_path):
    p = written(tmp_path / "v.gguf", kv=[("add_uint32", "test.n", 0xABCDEF)])
    edit(p, key(b"test.n") + struct.pack("<I", GGUFValueType.UINT32), key(b"test.n") + struct.pack("<I", 99))
    refused(p, "metadata 'test.n' has value type 99, which GGUF does not define")


def test_an_array_element_type_gguf_does_not_define(tmp_path):
    p = written(tmp_path / "a.gguf", kv=[("add_array", "test.a", [1, 2, 3])])
    edit(p, key(b"test.a") + struct.pack("<II", GGUFValueType.ARRAY, GGUFValueType.INT32),
         key(b"test.a") + struct.pack("<II", GGUFValueType.ARRAY, 13))
    refused(p, "metadata 'test.a' has value type 13, which GGUF does not define")


def test_arrays_are_kept_as_type_and_length(tmp_path):
    p = written(tmp_path / "a.gguf", kv=[("add_array", "test.i", [1, 2, 3]), ("add_array", "test.s", ["a", "", "cd"]),
                                         ("add_array", "test.f", [0.5, 1.5]), ("add_uint8", "test.after", 9)])
    fields, theirs = read_gguf(p).fields, GGUFReader(str(p)).fields
    assert fields["test.i"] == ArrayValue(GGUFValueType.INT32, 3)
    assert fields["test.s"] == ArrayValue(GGUFValueType.STRING, 3)
    assert fields["test.f"] == ArrayValue(GGUFValueType.FLOAT32, 2)
    assert fields["test.after"] == theirs["test.after"].contents() == 9  # each array skipped by its exact size


def test_an_array_longer_than_the_file(tmp_path):
    p = written(tmp_path / "a.gguf", kv=[("add_array", "test.i", [1, 2, 3])])
    edit(p, struct.pack("<IQ", GGUFValueType.INT32, 3), struct.pack("<IQ", GGUFValueType.INT32, 1 << 40))
    refused(p, "metadata 'test.i' (1,099,511,627,776 elements) at byte ")


def test_an_array_of_strings_that_exactly_fills_the_file_is_read(tmp_path):
    """Every string needs at least its 8-byte length: three empty strings are 24 bytes."""
    p = tmp_path / "s.gguf"
    body = key(b"s") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, 3)
    p.write_bytes(header(0, 1) + body + struct.pack("<QQQ", 0, 0, 0))
    assert GGUFReader(str(p)).fields["s"].contents() == ["", "", ""]
    assert read_gguf(p).fields["s"] == ArrayValue(GGUFValueType.STRING, 3)
    p.write_bytes(header(0, 1) + body.replace(struct.pack("<Q", 3), struct.pack("<Q", 4)) + struct.pack("<QQQ", 0, 0, 0))
    refused(p, "metadata 's' claims 4 strings, more than the file can hold")


def test_a_string_in_an_array_longer_than_the_file(tmp_path):
    p = written(tmp_path / "s.gguf", kv=[("add_array", "test.s", ["ab", "cd"])])
    edit(p, struct.pack("<Q", 2) + b"cd", struct.pack("<Q", 1 << 40) + b"cd")
    refused(p, "metadata 'test.s' at byte ")


def test_arrays_nested_four_deep_are_read_five_refused(tmp_path):
    p = written(tmp_path / "n.gguf", kv=[("add_array", "test.n", [[[[1, 2]], [[3]]]]), ("add_uint8", "test.after", 9)])
    theirs = GGUFReader(str(p)).fields
    assert theirs["test.n"].types == [GGUFValueType.ARRAY] * 4 + [GGUFValueType.INT32]
    fields = read_gguf(p).fields
    assert fields["test.n"] == ArrayValue(GGUFValueType.ARRAY, 1)
    assert fields["test.after"] == 9
    p = written(tmp_path / "n5.gguf", kv=[("add_array", "test.n", [[[[[1]]]]])])
    assert GGUFReader(str(p)).fields["test.n"].types == [GGUFValueType.ARRAY] * 5 + [GGUFValueType.INT32]
    refused(p, "metadata 'test.n' nests arrays more than 4 deep")


def test_an_array_of_arrays_that_exactly_fills_the_file_is_read(tmp_path):
    """Each inner array needs at least its type and count, 12 bytes: two empty ones are 24."""
    p = tmp_path / "a.gguf"
    inner = struct.pack("<IQ", GGUFValueType.UINT8, 0)
    body = key(b"a") + struct.pack("<II", GGUFValueType.ARRAY, GGUFValueType.ARRAY)
    p.write_bytes(header(0, 1) + body + struct.pack("<Q", 2) + inner * 2)
    assert GGUFReader(str(p)).fields["a"].types == [GGUFValueType.ARRAY, GGUFValueType.ARRAY]
    assert read_gguf(p).fields["a"] == ArrayValue(GGUFValueType.ARRAY, 2)
    p.write_bytes(header(0, 1) + body + struct.pack("<Q", 3) + inner * 2)
    refused(p, "metadata 'a' claims 3 arrays, more than the file can hold")


def test_a_key_that_appears_twice_is_refused_as_gguf_reader_refuses_it(tmp_path):
    p = written(tmp_path / "d.gguf", kv=[("add_uint8", "test.a", 1), ("add_uint8", "test.b", 2)],
                tensors=[("x", np.ones(4, np.float32))])
    edit(p, b"test.b", b"test.a")
    with pytest.raises(KeyError, match=r"Duplicate test\.a"):
        GGUFReader(str(p))
    refused(p, "metadata key 'test.a' appears twice")


# -- tensor infos -----------------------------------------------------------------------------------

def test_four_dims_are_read_five_refused(tmp_path):
    p = written(tmp_path / "d.gguf", tensors=[("x", np.ones((1, 2, 3, 4), np.float32))])
    assert list(GGUFReader(str(p)).tensors[0].shape) == [4, 3, 2, 1]
    assert tuple(load_gguf(p).tensors["x"].shape) == (1, 2, 3, 4)
    edit(p, key(b"x") + struct.pack("<I", 4), key(b"x") + struct.pack("<I", 5))
    refused(p, "tensor 'x' has 5 dims; ggml allows 4")


def test_a_tensor_name_that_appears_twice_is_refused_as_gguf_reader_refuses_it(tmp_path):
    p = written(tmp_path / "d.gguf", tensors=[("blk.a", np.ones(4, np.float32)), ("blk.b", np.ones(4, np.float32))])
    edit(p, key(b"blk.b"), key(b"blk.a"))
    with pytest.raises(ValueError, match=r"Found duplicated tensor with name blk\.a"):
        GGUFReader(str(p))
    refused(p, "tensor name 'blk.a' appears twice")


def test_a_ggml_type_gguf_does_not_define(tmp_path):
    p = written(tmp_path / "t.gguf", tensors=[("x", np.ones(4, np.float32))])
    edit(p, key(b"x") + struct.pack("<IQI", 1, 4, GGMLQuantizationType.F32),
         key(b"x") + struct.pack("<IQI", 1, 4, 4))  # 4 and 5 were Q4_2 and Q4_3, long removed
    refused(p, "tensor 'x' has ggml type 4, which gguf does not define")


def test_a_quantized_row_that_is_not_whole_blocks(tmp_path):
    q = gguf.quants.quantize(np.ones((2, 64), np.float32), GGMLQuantizationType.Q8_0)
    p = written(tmp_path / "q.gguf", tensors=[("x", q, GGMLQuantizationType.Q8_0)])
    edit(p, key(b"x") + struct.pack("<IQQ", 2, 64, 2), key(b"x") + struct.pack("<IQQ", 2, 48, 2))
    refused(p, "tensor 'x': Quantized tensor row size (48) is not a multiple of Q8_0 block size (32)")


@pytest.mark.parametrize(("ggml_type", "n", "fits"), [
    (GGMLQuantizationType.I8, (1 << 63) - 1, True), (GGMLQuantizationType.I8, 1 << 63, False),
    (GGMLQuantizationType.F32, 1 << 61, False), (GGMLQuantizationType.F32, (1 << 61) - 1, True)])
def test_tensor_bytes_at_the_limit_of_a_file(tmp_path, ggml_type, n, fits):
    """Up to 2**63 - 1 bytes a tensor is only missing from this file (truncated); past it, no file holds it."""
    arr = np.ones(4, np.int8 if ggml_type == GGMLQuantizationType.I8 else np.float32)
    p = written(tmp_path / "b.gguf", tensors=[("x", arr)])
    edit(p, key(b"x") + struct.pack("<IQ", 1, 4), key(b"x") + struct.pack("<IQ", 1, n))
    refused(p, "needs bytes" if fits else "more bytes than any file can hold")


# -- the alignment --------------------------------------------------------------------------------

@pytest.mark.parametrize("alignment", [0, 48, -32])
def test_an_alignment_that_is_not_a_power_of_two(tmp_path, alignment):
    method = "add_int32" if alignment < 0 else "add_uint32"
    p = written(tmp_path / "a.gguf", kv=[(method, "general.alignment", alignment)], tensors=[("x", np.ones(4, np.float32))])
    refused(p, f"general.alignment {alignment} is not a power of two")


def test_an_alignment_that_is_not_an_integer(tmp_path):
    p = written(tmp_path / "a.gguf", kv=[("add_float32", "general.alignment", 32.0)], tensors=[("x", np.ones(4, np.float32))])
    refused(p, "general.alignment 32.0 is not a power of two")


def test_an_alignment_of_one_leaves_tensors_unaligned(tmp_path):
    """GGUFWriter packs tensors back to back under an alignment of 1: a float32 tensor after a
    3-byte one starts at an odd byte, is read through a copy, and holds what was written."""
    odd = np.arange(3, dtype=np.int8)
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    p = written(tmp_path / "a.gguf", kv=[("add_uint32", "general.alignment", 1)],
                tensors=[("odd", odd), ("w", values)], alignment=1)
    theirs = {t.name: t for t in GGUFReader(str(p)).tensors}
    assert theirs["w"].data_offset % 4 != 0
    s = load_gguf(p)
    assert s.tensors["w"].numpy().tolist() == theirs["w"].data.tolist() == values.tolist()
    assert s.tensors["odd"].numpy().tolist() == [0, 1, 2]
    assert "w" not in s.file_spans  # a copy has no span in the file
    assert "odd" in s.file_spans
