"""torch.save zips read as records (loaders/torchzip.py) must say exactly what torch.load says.

Every case is analysed twice, once through the record reader and once with it turned off (the
torch.load(mmap=True) path), and the reports must be equal; the tensors made on access must be
the ones torch.load returns; what the reader does not build reaches torch.load after its bounds, and what
breaks them is refused in one line.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import zipfile
from collections import OrderedDict

import pytest
import torch
from click.testing import CliRunner

import tiecheck
from tiecheck.cli import main
from tiecheck.errors import TargetError, UntrustedPickleError
from tiecheck.loaders import load_target
from tiecheck.loaders.fileview import file_spans
from tiecheck.loaders.formats import torchfile
from tiecheck.loaders.formats.archive_tensors import ArchiveTensors
from tiecheck.loaders.formats.sharded import ShardedTensors
from tiecheck.loaders.formats.torchzip import read_archive
from tiecheck.loaders.tensor_facts import fact_of

from support.checkpoints import rewrite_zip_entry, tensor_pickle
from support.models import TinyLM


def _views_and_dtypes() -> dict:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "base": base,
        "row": base[1],  # a view at an offset
        "t": base.t(),  # strided: same storage, another layout
        "cols": base[:, 2:4],  # strided, not contiguous, at an offset
        "bf16": torch.linspace(-1, 1, 7).to(torch.bfloat16),
        "f8": torch.linspace(-1, 1, 5).to(torch.float8_e4m3fn),  # written by _rebuild_tensor_v3
        "u16": torch.arange(5).to(torch.uint16),  # v3 as well
        "flags": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5),
        "c64": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64),
    }


CASES = {
    "tied state dict": lambda: TinyLM().state_dict(),
    "views and dtypes": _views_and_dtypes,
    "parameters": lambda: dict(TinyLM(tie=False).named_parameters()),  # _rebuild_parameter, requires_grad
    "training checkpoint": lambda: {"model": TinyLM().state_dict(), "step": 7, "lr": 0.1,
                                    "optimizer": {"state": {0: {"step": torch.tensor(3.0),
                                                                "exp_avg": torch.zeros(4)}},
                                                  "param_groups": [{"lr": 0.1, "params": [0]}]}},
    "DDP prefix": lambda: OrderedDict((f"module.{k}", v) for k, v in TinyLM().state_dict().items()),
}


def _without_records(monkeypatch) -> None:
    monkeypatch.setattr(torchfile, "read_archive", lambda path: None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_equals_torch_load_path(case, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    torch.save(CASES[case](), path)
    assert read_archive(str(path)) is not None, "the reader should take what torch.save writes"
    fast = tiecheck.analyze(str(path)).to_dict()
    _without_records(monkeypatch)
    slow = tiecheck.analyze(str(path)).to_dict()
    assert fast == slow


@pytest.mark.parametrize("case", sorted(CASES))
def test_tensors_facts_and_spans_equal_torch_load(case, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    torch.save(CASES[case](), path)
    fast = load_target(str(path))
    assert isinstance(fast.tensors, ArchiveTensors)
    _without_records(monkeypatch)
    slow = load_target(str(path))
    assert list(fast.tensors) == list(slow.tensors)
    fast_facts = {f.name: f for f in fast.tensors.facts()}
    for name, t in slow.tensors.items():
        made = fast.tensors[name]
        assert made.dtype == t.dtype, name
        assert made.shape == t.shape, name
        assert made.stride() == t.stride(), name
        assert made.storage_offset() == t.storage_offset(), name
        assert made.requires_grad == t.requires_grad, name
        assert torch.equal(made.view(torch.uint8) if made.dim() and made.dtype.itemsize == 1 else made,
                           t.view(torch.uint8) if t.dim() and t.dtype.itemsize == 1 else t), name
        f, g = fast_facts[name], tiecheck.loaders.tensor_facts.fact_of(name, t)
        # Everything but the address, which each mapping has its own of.
        assert (f.shape, f.stride, f.dtype, f.byte_start, f.byte_end, f.storage_bytes, f.requires_grad,
                f.is_floating) == (g.shape, g.stride, g.dtype, g.byte_start, g.byte_end, g.storage_bytes,
                                   g.requires_grad, g.is_floating), name
        # The fact describes the tensor the mapping makes, address included.
        assert f.storage == ("cpu", made.untyped_storage().data_ptr()) or f.numel == 0, name
    # Which names share a storage, and where each storage starts in the file.
    assert _partition(fast.tensors.facts()) == _partition([tiecheck.loaders.tensor_facts.fact_of(n, t) for n, t in slow.tensors.items()])
    assert {n: s.offset for n, s in fast.file_spans.items()} == \
        {n: s.offset for n, s in file_spans(slow.tensors, str(path)).items()}


def _partition(facts) -> list[list[str]]:
    by: dict = {}
    for f in facts:
        if f.storage is not None and f.numel:
            by.setdefault(f.storage, []).append(f.name)
    return sorted(sorted(v) for v in by.values())


class _Marker:
    """A global torch's weights-only unpickler refuses; unpickling it would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_foreign_global_is_refused_by_name_and_never_called(tmp_path):
    path, touched = tmp_path / "evil.pt", tmp_path / "touched"
    torch.save({"w": torch.ones(2), "x": _Marker(str(touched))}, path)
    assert not touched.exists()  # torch.save itself does not call it
    with pytest.raises(UntrustedPickleError, match=r"the global 'io.open' \(data.pkl, byte \d+ of the file\)"):
        read_archive(str(path))
    assert not touched.exists()
    with pytest.raises(UntrustedPickleError, match=r"io\.open"):
        load_target(str(path))
    assert not touched.exists()


def test_a_namespace_checkpoint_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "args.pt"
    torch.save({"model": TinyLM().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UntrustedPickleError, match=r"argparse\.Namespace"):  # weights-only refuses it too
        load_target(str(path))
    assert load_target(str(path), trust_pickle=True).source.key == "model"


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_a_global_the_weights_only_unpickler_allows_goes_to_torch_load_after_the_bounds(tmp_path):
    """A quantized tensor: torch._utils._rebuild_qtensor is allowed but not built here. The pickle is
    still read through the loop's bounds; only then does torch.load read the file."""
    path = tmp_path / "q.pt"
    torch.save({"q": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8), "w": torch.ones(2)}, path)
    assert read_archive(str(path)) is None
    sub = load_target(str(path))
    assert sorted(sub.tensors) == ["q", "w"]
    assert not isinstance(sub.tensors, ArchiveTensors)


def _rewritten_pickle(src, dst, obj_bytes: bytes) -> None:
    rewrite_zip_entry(src, dst, "/data.pkl", obj_bytes)


def test_a_tensor_past_its_storage_is_refused_in_one_line(tmp_path):
    src, bad = tmp_path / "ok.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    with zipfile.ZipFile(src) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    # Shape (4,) -> (9,): the record's 16 bytes cannot hold nine floats.
    # BINPERSID, offset BININT1 0, size BININT1 4 TUPLE1: the size becomes 9.
    patched = pkl.replace(b"QK\x00K\x04\x85", b"QK\x00K\x09\x85", 1)
    assert patched != pkl
    _rewritten_pickle(src, bad, patched)
    with pytest.raises(TargetError, match=r"a tensor of size \[9\] at offset 0 reaches past the end of storage"):
        read_archive(str(bad))
    with pytest.raises(TargetError, match="reaches past the end"):
        load_target(str(bad))
    with pytest.raises(RuntimeError, match="resize storage"):  # torch.load refuses it too
        torch.load(bad, weights_only=True)


def test_big_endian_archives_are_left_to_torch_load(tmp_path):
    src, big = tmp_path / "ok.pt", tmp_path / "big.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    rewrite_zip_entry(src, big, "/byteorder", b"big")
    assert read_archive(str(src)) is not None
    assert read_archive(str(big)) is None


def test_compressed_records_are_left_to_torch_load(tmp_path):
    src, packed = tmp_path / "ok.pt", tmp_path / "deflated.pt"
    torch.save({"w": torch.zeros(64)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert read_archive(str(packed)) is None


def test_the_memo_cycle_is_broken(tmp_path):
    """The unpickler's memo holds its bound builders: left alone, that cycle outlives the read while
    the analysis pauses the collector."""
    path = tmp_path / "ckpt.pt"
    torch.save(TinyLM().state_dict(), path)
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        read_archive(str(path))
        assert gc.collect() == 0
    finally:
        if was:
            gc.enable()


def _torch_shards(folder, sd: dict, shards: int = 3):
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        part = {n: sd[n] for n in names[i::shards]}
        torch.save(part, folder / f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin")
        weight_map.update({n: f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for n in part})
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_sharded_torch_save_index_reads_records(tmp_path, monkeypatch):
    sd = {k: v.clone() for k, v in TinyLM(tie=False).state_dict().items()}
    sd["lm_head.weight"] = sd["embed.weight"].clone()  # a broken tie across shards: an untied duplicate
    index = _torch_shards(tmp_path, sd)
    fast = load_target(str(index))
    assert isinstance(fast.tensors, ShardedTensors)
    assert fast.tensors.facts() == [fact_of(n, t) for n, t in fast.tensors.items()]
    report = tiecheck.analyze(str(index)).to_dict()
    assert [d["names"] for d in report["untied_duplicates"]] == [["embed.weight", "lm_head.weight"]]
    _without_records(monkeypatch)
    assert not isinstance(load_target(str(index)).tensors, ShardedTensors)
    assert tiecheck.analyze(str(index)).to_dict() == report


# -- the record reader refuses what torch.load refuses ---------------------------------------------

@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # PROTO followed by a zero byte
def test_the_opcode_set_is_the_one_torchs_weights_only_unpickler_implements():
    """Asked of torch itself: an opcode torch's unpickler does not implement is 'Unsupported operand'
    there, and exactly those are refused by the loop."""
    import io  # noqa: PLC0415 - only this test feeds bytes to torch's unpickler
    import pickletools  # noqa: PLC0415

    from torch import _weights_only_unpickler  # noqa: PLC0415

    from tiecheck.loaders.pickleloop import TORCH_OPCODES  # noqa: PLC0415

    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")
        try:
            _weights_only_unpickler.Unpickler(io.BytesIO(b"\x80\x02" + code + b"\x00" * 16)).load()
            unsupported = False
        except Exception as e:  # noqa: BLE001 - any other failure means torch got past the opcode
            unsupported = f"Unsupported operand {code[0]}" in str(e)  # not a later byte's
        assert unsupported == (code[0] not in TORCH_OPCODES), op.name


@pytest.mark.parametrize(("name", "data_pkl"), [
    ("POP", b"\x80\x02}N0."),
    ("DUP", b"\x80\x02}2."),
    ("LONG4 key", b"\x80\x02}(\x8b\x02\x00\x00\x00\x01\x00X\x01\x00\x00\x00au."),
])
def test_opcodes_torch_load_refuses_are_refused(tmp_path, name, data_pkl):
    src, bad = tmp_path / "ok.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2)}, src)
    _rewritten_pickle(src, bad, data_pkl)
    with pytest.raises(Exception, match="Unsupported operand"):
        torch.load(bad, weights_only=True)
    with pytest.raises(UntrustedPickleError, match=r"uses the opcode \w+.*torch.load refuses it too"):
        read_archive(str(bad))


@pytest.mark.parametrize(("size", "stride", "torch_says"), [
    ((2 ** 62, 4), (0, 1), "numel: integer multiplication overflow"),
    ((2 ** 70,), (1,), "Overflow when unpacking long"),
])
def test_tensor_geometry_torch_refuses_is_refused(tmp_path, size, stride, torch_says):
    storage = torch.UntypedStorage(16)
    with pytest.raises((RuntimeError, TypeError), match=torch_says):
        torch.empty(0).set_(storage, 0, size, stride)
    src, bad = tmp_path / "ok.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(4)}, src)
    _rewritten_pickle(src, bad, tensor_pickle(size, stride))
    with pytest.raises(TargetError, match=r"numel overflow|out of range|reaching past"):
        read_archive(str(bad))


def _short_record(tmp_path, compress: bool = False):
    """A torch.save zip whose first storage record (16 bytes: four floats) was rewritten as 12 bytes."""
    src, bad = tmp_path / "ok.pt", tmp_path / "short.pt"
    torch.save({"a": torch.arange(4.0), "b": torch.full((4,), 7.0)}, src)
    kind = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w", kind) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data/0"):
                assert len(data) == 16
                data = data[:12]
            zout.writestr(info.filename, data, compress_type=kind)
    return bad


def test_torch_load_mmap_reads_a_short_record_silently_and_its_copy_path_refuses(tmp_path):
    """What torch does with a storage record shorter than its storage: the mapped path slices past
    the record (the next record's bytes become the last value); the copying path refuses."""
    bad = _short_record(tmp_path)
    got = torch.load(bad, mmap=True, weights_only=True)
    assert got["a"].shape == (4,)
    assert torch.equal(got["a"][:3], torch.arange(3.0))
    with pytest.raises(RuntimeError, match=r"record size \(12 bytes\) does not match expected size \(16 bytes"):
        torch.load(bad, weights_only=True)


SHORT = r"storage '0' claims 16 bytes, but its record data/0 holds 12; the file is truncated or corrupt"


@pytest.mark.parametrize("how", ["records", "torch.load (whole)", "trusted", "trusted, whole", "compressed"])
def test_a_storage_record_shorter_than_its_storage_is_refused_in_every_path(tmp_path, how):
    bad = _short_record(tmp_path, compress=how == "compressed")
    if how == "compressed":
        assert read_archive(str(bad)) is None  # left to torch.load, which maps the file
    with pytest.raises(TargetError, match=SHORT):
        tiecheck.loaders.load_path(bad, trust_pickle="trusted" in how, whole="whole" in how)


@pytest.mark.parametrize("protocol", [1, 2, 4])  # the loop walks protocol 2 only (1: INT, 4: FRAME)
def test_a_trusted_pickle_the_loop_would_refuse_still_has_its_records_checked(tmp_path, protocol):
    """--trust-pickle lets the file name any global (a Namespace here) in any protocol torch.save
    writes; its storages are checked anyway, before torch.load runs anything of it."""
    src, bad = tmp_path / "ok.pt", tmp_path / "short.pt"
    touched = tmp_path / "touched"
    obj = {"args": argparse.Namespace(lr=0.1), "model": {"w": torch.arange(4.0)}}
    torch.save(obj, src, pickle_protocol=protocol)
    with zipfile.ZipFile(src) as z:
        record = z.read(next(n for n in z.namelist() if n.endswith("/data/0")))
    rewrite_zip_entry(src, bad, "/data/0", record[:12])
    assert tiecheck.loaders.load_path(src, trust_pickle=True, whole=True).checkpoint["args"].lr == 0.1
    with pytest.raises(TargetError, match=SHORT):
        tiecheck.loaders.load_path(bad, trust_pickle=True, whole=True)
    # The storage ids are read with stand-ins for the file's globals: a global that would create a
    # file runs neither there nor in torch.load, which the refusal comes before.
    evil, evil_short = tmp_path / "evil.pt", tmp_path / "evil_short.pt"
    torch.save({"w": torch.arange(4.0), "x": _Marker(str(touched))}, evil, pickle_protocol=protocol)
    with zipfile.ZipFile(evil) as z:
        record = z.read(next(n for n in z.namelist() if n.endswith("/data/0")))
    rewrite_zip_entry(evil, evil_short, "/data/0", record[:12])
    with pytest.raises(TargetError, match=SHORT):
        tiecheck.loaders.load_path(evil_short, trust_pickle=True, whole=True)
    assert not touched.exists()


def test_a_short_storage_record_is_refused_by_fix_in_one_line_and_nothing_is_written(tmp_path):
    bad = _short_record(tmp_path)
    out = tmp_path / "fixed.pt"
    for args in (["fix", str(bad), "-o", str(out)], ["inspect", str(bad)], ["inspect", "--trust-pickle", str(bad)]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        errors = [line for line in res.output.splitlines() if "error" in line]
        assert len(errors) == 1, res.output
        assert "claims 16 bytes, but its record data/0 holds 12" in errors[0], res.output
        assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.pt", "short.pt"]


@pytest.mark.parametrize("whole", [False, True])
def test_a_tensor_one_element_past_its_storage_is_refused(tmp_path, whole):
    """Four floats of storage: size (4,) fits, size (5,) ends one element past; torch refuses it too."""
    src, fits, bad = tmp_path / "ok.pt", tmp_path / "fits.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(4)}, src)
    _rewritten_pickle(src, fits, tensor_pickle((4,), (1,)))
    _rewritten_pickle(src, bad, tensor_pickle((5,), (1,)))
    assert tiecheck.loaders.load_path(fits, whole=whole).tensors["w"].shape == (4,)
    with pytest.raises(RuntimeError, match="resize storage that is not resizable"):
        torch.load(bad, weights_only=True, mmap=True)
    with pytest.raises(TargetError, match=r"size \[5\] at offset 0 reaches past the end of storage|"
                                          r"truncated or corrupt \(RuntimeError: Trying to resize storage"):
        tiecheck.loaders.load_path(bad, whole=whole)


def test_an_archive_without_exactly_one_data_pkl_is_left_to_the_format_check(tmp_path):
    """No data.pkl, or two root folders each with one: torch.load cannot read either; the record
    reader takes neither, and the loader names what is wrong in one line."""
    src, none, two = tmp_path / "ok.pt", tmp_path / "none.pt", tmp_path / "two.pt"
    torch.save({"w": torch.ones(2)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(none, "w") as z0, zipfile.ZipFile(two, "w") as z2:
        for info in zin.infolist():
            data = zin.read(info)
            if not info.filename.endswith("/data.pkl"):
                z0.writestr(info.filename, data)
            z2.writestr(info.filename, data)
            z2.writestr("other/" + info.filename.split("/", 1)[1], data)
    for bad, torch_says in ((none, "failed locating file data.pkl"), (two, "is not in a subdirectory")):
        with pytest.raises(RuntimeError, match=torch_says):
            torch.load(bad, weights_only=True)
        assert read_archive(str(bad)) is None
    with pytest.raises(TargetError, match=r"expected one root folder holding data.pkl, found 2 folder\(s\) and 2 "
                                          r"data.pkl record\(s\)"):
        load_target(str(two))


def test_a_deflated_data_pkl_is_read_only_as_far_as_its_compressed_size_makes_plausible(tmp_path):
    """20 MiB of pickle deflated to about 21 kB: more than 64 times its size plus 16 MiB, refused
    before it is inflated."""
    src, bomb = tmp_path / "ok.pt", tmp_path / "bomb.pt"
    torch.save({"w": torch.ones(2)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                data = data[:-1] + b"N" * (20 << 20) + b"."  # NONE, twenty million times, then STOP
            zout.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(bomb) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    limit = 64 * info.compress_size + (16 << 20)
    with pytest.raises(TargetError, match=rf"declares {info.file_size:,} bytes; tiecheck reads at most {limit:,}"):
        read_archive(str(bomb))


def test_an_experimental_dtype_warns_as_torch_load_warns(tmp_path):
    """torch warns that complex32 is experimental when it makes such a tensor (once per process, so
    in a fresh interpreter here); the record reader raises the same warning, and the report carries it
    as a note instead of letting it reach stderr."""
    path = tmp_path / "c32.pt"
    torch.save({"c": torch.zeros(2, dtype=torch.complex32)}, path)
    res = subprocess.run([sys.executable, "-m", "tiecheck.cli", "inspect", str(path), "--no-flops"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "warning while reading: ComplexHalf support is experimental" in res.stdout
    assert res.stderr == ""


@pytest.mark.parametrize(("size", "stride", "taken"), [
    ((2 ** 63 - 1,), (0,), True),  # the largest int64: torch takes it (a broadcast element)
    ((2 ** 63,), (1,), False),  # one past: torch cannot unpack it
    ((1,), (2 ** 63 - 1,), True),
    ((1,), (2 ** 63,), False),
])
def test_sizes_and_strides_are_int64_as_torch_unpacks_them(tmp_path, size, stride, taken):
    src, bad = tmp_path / "ok.pt", tmp_path / "edge.pt"
    torch.save({"w": torch.ones(4)}, src)
    _rewritten_pickle(src, bad, tensor_pickle(size, stride))
    if taken:
        assert torch.load(bad, weights_only=True)["w"].shape == size
        obj, _ = read_archive(str(bad))
        assert obj["w"].shape == size
    else:
        with pytest.raises(TypeError, match="Overflow when unpacking long"):
            torch.load(bad, weights_only=True)
        with pytest.raises(TargetError, match=r"describes a tensor with a storage, offset, size, stride or "
                                              r"requires_grad of the wrong type or out of range"):
            read_archive(str(bad))
