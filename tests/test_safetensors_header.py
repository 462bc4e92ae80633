"""The safetensors header read as columns: the plain layout the writer emits is matched as text
(``_fast_columns``); every other header, and every header a rule refuses, is parsed record by record
as before (``_checked_columns``). Both must give the same answer, refusal for refusal."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiecheck.loaders.formats.safetensors_header as st
from tiecheck.errors import TargetError
from tiecheck.loaders.formats.safetensors_files import load_safetensors_file
from tiecheck.loaders.formats.safetensors_header import read_header


def _outcome(path):
    """(columns, None) or (None, the refusal's line) of ``read_header``."""
    try:
        h = read_header(path)
    except TargetError as e:
        return None, str(e)
    return (h.metadata, h.names, h.index, [tuple(k) for k in h.kinds], list(h.begins), list(h.ends),
            h.header_len, h.file_size), None


def _record_by_record(path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(st, "_fast_columns", lambda *a: None)
        return _outcome(path)


def _header_bytes(path) -> bytes:
    raw = path.read_bytes()
    return raw[8:8 + int.from_bytes(raw[:8], "little")]


def _write(path, header: str, data: bytes, pad: bool = True):
    raw = header.encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def test_the_writers_files_take_the_fast_path_and_read_as_safetensors_reads_them(tmp_path, monkeypatch):
    tensors = {"model.embed.weight": torch.randn(6, 4), "model.norm.weight": torch.ones(4, dtype=torch.bfloat16),
               "model.steps": torch.arange(3, dtype=torch.int64), "empty": torch.zeros(0, 3),
               "flag": torch.tensor(True), "scale": torch.tensor([2.5], dtype=torch.float16),
               "naïve.ünïcode": torch.randn(2, 2, dtype=torch.float64)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "a, \"quoted\" {value}"})
    fast, _ = _outcome(path)
    reference, _ = _record_by_record(path, monkeypatch)
    assert fast == reference

    def refuse(*a):
        raise AssertionError("parsed record by record")

    monkeypatch.setattr(st, "_checked_columns", refuse)
    header = read_header(path)  # the fast path alone
    with safe_open(str(path), "pt") as f:
        listed = f.keys()
        assert set(header.names) == set(listed)
        assert header.metadata == f.metadata()
        for name in listed:
            entry = header.entries[name]
            assert list(entry.shape) == f.get_slice(name).get_shape()
            assert entry.dtype == f.get_slice(name).get_dtype()
    loaded = load_file(str(path))
    sub = load_safetensors_file(path)
    assert set(sub.tensors) == set(loaded)
    for name, t in loaded.items():
        assert torch.equal(sub.tensors[name], t)
        assert sub.tensors[name].dtype == t.dtype


def _plain(**edits) -> tuple[str, bytes]:
    """A header in the writer's plain layout over a (4,) F32 "a" and a (2,) F32 "b", then ``edits``
    applied as text replacements."""
    header = ('{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
              '"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}')
    for old, new in edits.values():
        assert old in header
        header = header.replace(old, new)
    return header, bytes(range(24))


REFUSED = {
    "duplicate name": dict(e=('"b":', '"a":')),
    "gap": dict(e=("[16,24]", "[20,28]")),
    "overlap": dict(e=("[16,24]", "[12,20]")),
    "size mismatch": dict(e=('"shape":[2]', '"shape":[3]')),
    "unknown dtype": dict(e=('"dtype":"F32","shape":[2]', '"dtype":"Q7","shape":[2]')),
    "begin after end": dict(e=("[16,24]", "[24,16]")),
    "offset beyond int64": dict(e=("[16,24]", "[16,99999999999999999999]")),
    "leading zero": dict(e=("[0,16]", "[00,16]")),
    "negative": dict(e=("[0,16]", "[-1,16]")),
    "float offset": dict(e=("[16,24]", "[16,24.0]")),
    "shape overflow": dict(e=('"shape":[2]', '"shape":[4611686018427387904,4611686018427387904,0]')),
    "brace for a comma": dict(e=(',"b":', '{"b":')),
    "no comma": dict(e=(',"b":', '"b":')),
    "trailing comma": dict(e=("[16,24]}}", "[16,24]},}")),
    "control character in a name": dict(e=('"b":', '"b\x01":')),
    "a record named __metadata__": dict(e=('"b":', '"__metadata__":')),
    "metadata not an object": dict(e=('{"format":"pt"}', '[1]')),
    "two closing braces": dict(e=("[16,24]}}", "[16,24]}}}")),
    "nothing after the metadata": dict(e=(',"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
                                          '"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}', "")),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_header_a_rule_refuses_is_refused_in_the_same_words(tmp_path, monkeypatch, case):
    header, data = _plain(**REFUSED[case])
    path = _write(tmp_path / "m.safetensors", header, data)
    raw = _header_bytes(path)
    got, refusal = _outcome(path)
    want, want_refusal = _record_by_record(path, monkeypatch)
    assert (got, refusal) == (want, want_refusal)
    assert refusal is not None
    assert "not a valid safetensors file" in refusal
    assert st._fast_columns(path, raw, len(data)) is None


ACCEPTED = {
    "the plain layout": {},
    "an escaped quote in a name": dict(e=('"b":', '"b\\"c":')),
    "an escaped letter": dict(e=('"b":', '"\\u0062x":')),
    "a name that looks like a record's end": dict(e=('"b":', '"b},":')),
    "spaces": dict(e=(',"b":', ', "b": ')),
    "keys in another order": dict(e=('{"dtype":"F32","shape":[2],"data_offsets":[16,24]}',
                                     '{"shape":[2],"dtype":"F32","data_offsets":[16,24]}')),
    "metadata last": dict(m=('{"__metadata__":{"format":"pt"},', "{"),
                          e=("[16,24]}}", '[16,24]},"__metadata__":{"format":"pt"}}')),
    "no metadata": dict(m=('{"__metadata__":{"format":"pt"},', "{")),
    "offsets out of file order": dict(a=("[0,16]", "[8,24]"), b=("[16,24]", "[0,8]")),
    "an empty tensor": dict(e=('"shape":[2],"data_offsets":[16,24]}}',
                               '"shape":[2],"data_offsets":[16,24]},"z":{"dtype":"I8","shape":[0,5],'
                               '"data_offsets":[24,24]}}')),
    "two dimensions": dict(e=('"shape":[4]', '"shape":[2,2]')),
    "a signed zero": dict(e=("[0,16]", "[-0,16]")),  # JSON's -0 is 0: not the writer's layout, but valid
    "metadata shaped as a record": dict(e=('"__metadata__":{"format":"pt"}',
                                           '"__metadata__":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}')),
}
# Those in the writer's plain layout, which the fast path reads itself.
PLAIN = {"the plain layout", "a name that looks like a record's end", "no metadata", "offsets out of file order",
         "an empty tensor", "two dimensions", "metadata shaped as a record"}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
@pytest.mark.parametrize("chunk", [1 << 20, 1])
def test_a_header_read_either_way_gives_the_same_columns(tmp_path, monkeypatch, case, chunk):
    monkeypatch.setattr(st, "_FAST_CHUNK", chunk)  # 1: a cut after every record, where a name can fake one
    header, data = _plain(**ACCEPTED[case])
    path = _write(tmp_path / "m.safetensors", header, data)
    got, refusal = _outcome(path)
    assert refusal is None
    assert got == _record_by_record(path, monkeypatch)[0]
    fast = st._fast_columns(path, _header_bytes(path), len(data))
    # A name ending "}," fakes a cut after it: that part does not tile, and the header is parsed as before.
    assert (fast is not None) == (case in PLAIN and not (chunk == 1 and "end" in case))


def test_a_header_without_padding_and_unaligned_data_is_still_mapped(tmp_path):
    header, data = _plain()
    path = _write(tmp_path / "m.safetensors", header, data, pad=False)
    assert (8 + len(header)) % 4  # the case: data starts off the element size
    sub = load_safetensors_file(path)
    assert sub.tensors["a"].tolist() == torch.frombuffer(bytearray(data[:16]), dtype=torch.float32).tolist()
    assert "copied into memory" in " ".join(sub.source.notes)
