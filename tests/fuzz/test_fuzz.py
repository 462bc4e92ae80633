"""Fuzzing every loader: mutated copies of valid fixtures, run through ``tiecheck inspect``.

Every case must keep the invariants of ``harness.problems``: exit 0, 1 or 2; an error in
one line (never a traceback, never "unexpected"); an answer within the time bound; peak RSS
raised by less than ``PEAK_GROWTH_MB``; the input's bytes, mtime and folder unchanged, on a
read-only copy. The normal suite runs a short, deterministic selection (``derandomize``); for a
long local run, set the number of examples per property:
    TIECHECK_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py

and, to aim a long run at some formats only (the bit flips draw from those fixtures):
    TIECHECK_FUZZ_EXAMPLES=300 TIECHECK_FUZZ_FORMATS=onnx,gguf pytest tests/fuzz -k "onnx or gguf"

which also cuts one byte either side of every structural boundary and draws fresh random
examples on each run (hypothesis prints how to reproduce a failure).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
pytest.importorskip("transformers")

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import Fixture, Worker, _rewrite, build_fixtures, copy_fixture, hostile_cases, run_case
from support.checkpoints import field_values, flip_bits, safetensors_with_header, set_field, structure

LONG = int(os.environ.get("TIECHECK_FUZZ_EXAMPLES", "0"))
FORMATS = [f for f in os.environ.get("TIECHECK_FUZZ_FORMATS", "").split(",") if f]


def fuzz_settings(short: int):
    """``short`` examples in the normal suite, deterministic; TIECHECK_FUZZ_EXAMPLES in a long run."""
    return settings(max_examples=LONG or short, deadline=None, derandomize=not LONG, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Harness:
    base: Path
    fixtures: dict[str, Fixture]
    worker: Worker
    cases: int = 0
    seen_exit: dict[int, int] = field(default_factory=dict)

    def run(self, fx: Fixture, mutate, label: str) -> None:
        case = self.base / "case"
        if case.exists():
            shutil.rmtree(case)
        copy_fixture(fx, case)
        target = mutate(case)
        target = target if isinstance(target, str) else fx.target
        res, found = run_case(self.worker, case, target, f"{fx.name}: {label}")
        self.cases += 1
        self.seen_exit[res.exit_code] = self.seen_exit.get(res.exit_code, 0) + 1
        assert not found, "\n".join(found)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    fixtures = build_fixtures(base / "fixtures")
    warm = [["inspect", str(fx.root / fx.target), "--no-flops"] for fx in fixtures.values()]
    worker = Worker(base / "worker", warmup=warm)
    harness = Harness(base, fixtures, worker)
    yield harness
    worker.stop()
    # Shown with -s: what the run covered (the README records these figures).
    print(f"\nfuzz: {harness.cases} cases, exit codes {dict(sorted(harness.seen_exit.items()))}")


ZIPS = {"torch_zip": "model.pt", "pt2": "tiny.pt2"}


def _write(rel: str, data: bytes):
    def mutate(d: Path) -> None:
        (d / rel).write_bytes(data)
    return mutate


def test_valid_fixtures_are_clean(fuzz):
    """The harness measures what it claims: every valid fixture loads, exit 0, within the bounds."""
    before = dict(fuzz.seen_exit)
    for fx in fuzz.fixtures.values():
        fuzz.run(fx, lambda d: None, "unchanged")
    assert fuzz.seen_exit.get(0, 0) - before.get(0, 0) == len(fuzz.fixtures) >= 9


@pytest.mark.parametrize("name", ["torch_zip", "torch_legacy", "safetensors", "sharded", "hf", "pt2", "dcp", "onnx",
                                  "gguf"])
def test_truncation_at_every_structural_boundary(fuzz, name):
    """Cut each file where a parser changes state: zip local headers, data, central directory and end
    record; safetensors' length, JSON header and each tensor's data; between a legacy file's pickles."""
    fx = fuzz.fixtures[name]
    for rel in fx.files:
        data = (fx.root / rel).read_bytes()
        cuts = sorted({c for b in structure(data).boundaries for c in ((b - 1, b, b + 1) if LONG else (b,))
                       if 0 <= c < len(data)} | {0})
        for cut in cuts:
            fuzz.run(fx, _write(rel, data[:cut]), f"{rel} cut at byte {cut} of {len(data)}")


@fuzz_settings(short=130)
@given(data=st.data())
def test_bit_flips(fuzz, data):
    """1-4 bits flipped, mostly where parsers read (headers, directories, JSON, pickles, GGUF tensor
    infos, ONNX initializers)."""
    fx = fuzz.fixtures[data.draw(st.sampled_from(FORMATS or sorted(fuzz.fixtures)), label="fixture")]
    rel = data.draw(st.sampled_from(fx.files), label="file")
    blob = (fx.root / rel).read_bytes()
    regions = structure(blob).regions
    if regions and data.draw(st.integers(0, 9), label="aim") < 7:
        a, b = data.draw(st.sampled_from(regions), label="region")
        pos = st.integers(a, max(a, b - 1))
    else:
        pos = st.integers(0, len(blob) - 1)
    positions = data.draw(st.lists(pos, min_size=1, max_size=4), label="positions")
    bits = data.draw(st.lists(st.integers(0, 7), min_size=len(positions), max_size=len(positions)), label="bits")
    fuzz.run(fx, _write(rel, flip_bits(blob, positions, bits)), f"{rel} bits {bits} flipped at {positions}")


@fuzz_settings(short=100)
@given(data=st.data())
def test_zip_directory_edits(fuzz, data):
    """A field of a local header, a central directory entry or the end record set to an extreme, an
    off-by-one, a value past the end of the file; or an entry renamed."""
    which = data.draw(st.sampled_from([*sorted(ZIPS), "dcp"]), label="archive")
    fx = fuzz.fixtures[which]
    rel = ZIPS.get(which) or next(f for f in fx.files if f.endswith(".distcp"))
    blob = (fx.root / rel).read_bytes()
    s = structure(blob)
    if data.draw(st.integers(0, 9), label="kind") < 8:
        f = data.draw(st.sampled_from(s.fields), label="field")
        value = data.draw(st.sampled_from(field_values(f, len(blob))) | st.integers(0, 2 ** (8 * f.size) - 1),
                          label="value")
        fuzz.run(fx, _write(rel, set_field(blob, f, value)), f"{rel} {f.where}: {f.value} -> {value}")
    else:
        off, n = data.draw(st.sampled_from(s.names), label="name")
        new = data.draw(st.binary(min_size=n, max_size=n), label="new name")
        fuzz.run(fx, _write(rel, blob[:off] + new + blob[off + n:]), f"{rel} entry name at {off} -> {new!r}")


@fuzz_settings(short=30)
@given(data=st.data())
def test_gguf_header_edits(fuzz, data):
    """A GGUF header count, a string or array length, a tensor's n_dims, dim, type or data offset set
    to an extreme, an off-by-one or a value past the end of the file."""
    fx = fuzz.fixtures["gguf"]
    blob = (fx.root / "m.gguf").read_bytes()
    f = data.draw(st.sampled_from(structure(blob).fields), label="field")
    value = data.draw(st.sampled_from(field_values(f, len(blob))) | st.integers(0, 2 ** (8 * f.size) - 1),
                      label="value")
    fuzz.run(fx, _write("m.gguf", set_field(blob, f, value)), f"m.gguf {f.where}: {f.value} -> {value}")


_EXTERNAL_VALUES = (st.sampled_from(["", "w.data", "../w.data", "/etc/passwd", ".", "m.onnx", "w.data\0x", "nope",
                                     "-1", "-128", "0", "1", "127", "129", "256", "257", "1e3", "0x10", " 16", "nan",
                                     str(2 ** 63), str(2 ** 64), "9" * 400])
                    | st.integers(-2 ** 65, 2 ** 65).map(str) | st.text(max_size=12))


@fuzz_settings(short=30)
@given(data=st.data())
def test_onnx_initializer_edits(fuzz, data):
    """An initializer's external data location, offset or length set to another file, a path outside
    the folder, a negative, huge or malformed number; a key removed; its dims, type or data location
    changed."""
    import onnx  # noqa: PLC0415 - an optional extra, imported by the fixture already

    fx = fuzz.fixtures["onnx"]
    model = onnx.load(str(fx.root / "m.onnx"), load_external_data=False)
    i = data.draw(st.integers(0, len(model.graph.initializer) - 1), label="initializer")
    t = model.graph.initializer[i]
    kind = data.draw(st.sampled_from(["value", "value", "value", "drop key", "dims", "type", "location"]),
                     label="kind")
    if kind == "value" and t.external_data:
        e = t.external_data[data.draw(st.integers(0, len(t.external_data) - 1), label="key")]
        e.value = data.draw(_EXTERNAL_VALUES, label="value")
        what = f"{e.key}={e.value!r}"
    elif kind == "drop key" and t.external_data:
        what = f"without {t.external_data.pop(data.draw(st.integers(0, len(t.external_data) - 1))).key}"
    elif kind == "dims":
        del t.dims[:]
        t.dims.extend(data.draw(st.lists(_DIMS.filter(lambda n: n < 2 ** 63), max_size=4), label="dims"))  # int64
        what = f"dims {list(t.dims)}"
    elif kind == "type":
        t.data_type = data.draw(st.integers(0, 30), label="type")
        what = f"data_type {t.data_type}"
    else:
        t.data_location = 1 - t.data_location
        what = f"data_location {t.data_location}"
    blob = model.SerializeToString()
    fuzz.run(fx, _write("m.onnx", blob), f"m.onnx initializer {t.name!r} {what}")


_DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "C64", "F64", "X", ""])
_DIMS = st.one_of(st.integers(0, 8), st.sampled_from([10 ** 15, 2 ** 31, 2 ** 62, 2 ** 63, 2 ** 64]),
                  st.integers(-4, -1))


@fuzz_settings(short=60)
@given(entries=st.lists(st.tuples(st.text(max_size=6), _DTYPES, st.lists(_DIMS, max_size=4),
                                  st.tuples(st.integers(-8, 256), st.integers(-8, 256)) | st.just(None)),
                        max_size=5),
       data_len=st.integers(0, 256), length_delta=st.sampled_from([0, 0, 0, -1, 1, 8, -8, 2 ** 40]))
def test_safetensors_headers(fuzz, entries, data_len, length_delta):
    """Hand-written headers: shapes and offsets that disagree, overlap, run past the end or claim
    petabytes; unknown dtypes; a stated header length off by a little or by a terabyte."""
    header = {}
    for name, dtype, shape, offsets in entries:
        spec = {"dtype": dtype, "shape": shape}
        if offsets is not None:
            spec["data_offsets"] = list(offsets)
        header[name] = spec

    raw = json.dumps(header).encode()
    blob = safetensors_with_header(raw, bytes(data_len), length=max(0, len(raw) + length_delta))
    fuzz.run(fuzz.fixtures["safetensors"], _write("model.safetensors", blob),
             f"header {header} + {data_len} data bytes, length {len(raw)}{length_delta:+}")


@pytest.mark.parametrize(("fixture", "name", "mutate"), hostile_cases(), ids=[c[1] for c in hostile_cases()])
def test_hostile_inputs(fuzz, fixture, name, mutate):
    """Hand-made: petabyte claims, outside paths, symlink loops, FIFOs, zip bombs, absurd configs."""
    fuzz.run(fuzz.fixtures[fixture], mutate, name)


# -- round 3: the new readers' inputs, generated --------------------------------------------------

def _opcode_stream(codes: list[int], args: list[bytes]) -> bytes:
    return b"\x80\x02" + b"".join(bytes([c]) + a for c, a in zip(codes, args, strict=True)) + b"."


# Opcodes with their argument bytes drawn as the format requires (lengths sometimes lying).
_ARGS = {ord("K"): 1, ord("h"): 1, ord("q"): 1, ord("M"): 2, ord("J"): 4, ord("j"): 4, ord("r"): 4, ord("G"): 8,
         0x8A: 1, ord("U"): 1, ord("X"): 4}
_OPCODES = st.sampled_from(b"}]()tu\x85\x86\x87eaNs\x88\x89RbQ\x81c" + bytes(_ARGS) + b"012\x8b\x8c\x94\x93")


@st.composite
def _pickle_body(draw):
    codes = draw(st.lists(_OPCODES, max_size=40))
    args = []
    for c in codes:
        if c in (ord("X"), ord("U")):  # a string: a length, then (up to) that many bytes
            text = draw(st.binary(max_size=12))
            n = draw(st.sampled_from([len(text), len(text) + 1, 2 ** 31]))
            args.append((n.to_bytes(4, "little") if c == ord("X") else bytes([n % 256])) + text)
        elif c == ord("c"):  # GLOBAL: two lines, sometimes a name the readers take
            args.append(draw(st.sampled_from([b"collections\nOrderedDict\n", b"torch._utils\n_rebuild_tensor_v2\n",
                                              b"torch\nFloatStorage\n", b"os\nsystem\n", b"x\n"])))
        elif c == 0x8A:  # LONG1
            args.append(draw(st.binary(max_size=9).map(lambda b: bytes([len(b)]) + b)))
        else:
            args.append(draw(st.binary(min_size=_ARGS.get(c, 0), max_size=_ARGS.get(c, 0))))
    return _opcode_stream(codes, args)


@fuzz_settings(short=25)
@given(body=_pickle_body())
def test_data_pkl_opcode_streams(fuzz, body):
    """Generated pickles as a torch.save zip's data.pkl: the record reader's loop against every opcode
    torch's unpickler takes (and a few it refuses), lying lengths, memo indices and stack shapes."""
    fx = fuzz.fixtures["torch_zip"]
    fuzz.run(fx, lambda d: _rewrite(d / "model.pt", "data.pkl", body), f"data.pkl {body!r}")


@fuzz_settings(short=25)
@given(data=st.data())
def test_dcp_metadata_edits(fuzz, data):
    """DCP metadata with its fields replaced by values of the wrong type or range, pickled with every
    protocol, or a generated opcode stream: the inert-record reader and its checks."""
    import pickle  # noqa: PLC0415 - the edited metadata is pickled as DCP pickles it

    import torch  # noqa: PLC0415
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415

    fx = fuzz.fixtures["dcp"]
    if data.draw(st.integers(0, 4), label="raw") == 0:
        body = data.draw(_pickle_body(), label="pickle")
        fuzz.run(fx, _write("ckpt/.metadata", body), f".metadata {body!r}")
        return
    md = dcp.FileSystemReader(str(fx.root / "ckpt")).read_metadata()  # trusted: our own fixture
    values = st.one_of(st.none(), st.integers(-2 ** 64, 2 ** 64), st.text(max_size=8),
                       st.lists(st.integers(0, 2 ** 62), max_size=3).map(torch.Size),
                       st.lists(st.integers(-4, 8), max_size=3), st.just(torch.float32), st.just({}))
    entry = data.draw(st.sampled_from(sorted(md.state_dict_metadata)), label="entry")
    meta = md.state_dict_metadata[entry]
    field = data.draw(st.sampled_from(["size", "chunks", "chunk sizes", "chunk offsets", "dtype", "storage offset",
                                       "storage length", "storage path", "planner", "entry"]), label="field")
    value = data.draw(values, label="value")
    if field == "size" and hasattr(meta, "size"):
        meta.size = value
    elif field == "chunks" and hasattr(meta, "chunks"):
        meta.chunks = value
    elif field.startswith("chunk ") and getattr(meta, "chunks", None):
        setattr(meta.chunks[0], field.split()[1], value)
    elif field == "dtype" and hasattr(meta, "properties"):
        meta.properties.dtype = value
    elif field.startswith("storage "):
        key = next(iter(md.storage_data))
        attr = {"offset": "offset", "length": "length", "path": "relative_path"}[field.split()[1]]
        md.storage_data[key] = dataclasses.replace(md.storage_data[key], **{attr: value})
    elif field == "planner":
        md.planner_data = {entry: value} if value is not None else value
    else:
        md.state_dict_metadata[entry] = value
    protocol = data.draw(st.integers(2, pickle.HIGHEST_PROTOCOL), label="protocol")
    try:
        raw = pickle.dumps(md, protocol=protocol)
    except Exception:  # noqa: BLE001 - a value pickle itself cannot write (TensorProperties' encoding)
        return
    fuzz.run(fx, _write("ckpt/.metadata", raw), f".metadata {field}={value!r} (protocol {protocol})")


def _gguf_value(depth: int = 0):
    """(type, encoded value) of a GGUF metadata value, lengths sometimes lying, arrays nested."""
    scalars = st.sampled_from([(0, 1), (1, 1), (2, 2), (3, 2), (4, 4), (5, 4), (6, 4), (7, 1), (10, 8), (11, 8),
                               (12, 8)]).flatmap(lambda ts: st.binary(min_size=ts[1], max_size=ts[1]).map(
                                   lambda b: (ts[0], b)))
    strings = st.tuples(st.binary(max_size=16), st.sampled_from([0, 0, 1, -1, 2 ** 40])).map(
        lambda sb: (8, struct.pack("<Q", max(0, len(sb[0]) + sb[1])) + sb[0]))
    unknown = st.integers(13, 2 ** 32 - 1).map(lambda t: (t, b""))
    if depth >= 3:
        return st.one_of(scalars, strings, unknown)
    arrays = st.tuples(st.lists(_gguf_value(depth + 1), max_size=4), st.sampled_from([0, 0, 1, 2 ** 40])).map(
        lambda xs: (9, struct.pack("<IQ", xs[0][0][0] if xs[0] else 0, len(xs[0]) + xs[1])
                    + b"".join(v for _, v in xs[0])))
    return st.one_of(scalars, strings, unknown, arrays)


@fuzz_settings(short=25)
@given(kvs=st.lists(st.tuples(st.sampled_from(["general.name", "llama.vocab_size", "general.alignment",
                                               "tokenizer.ggml.tokens", "x", ""]), _gguf_value()),
                    min_size=1, max_size=4))
def test_gguf_metadata_values(fuzz, kvs):
    """Generated key/values (scalars, strings, arrays nested three deep, unknown types, lying lengths,
    duplicate keys) added to a valid GGUF file's metadata: the header reader alone meets them."""
    fx = fuzz.fixtures["gguf"]
    blob = (fx.root / "m.gguf").read_bytes()
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
    extra = b"".join(struct.pack("<Q", len(k)) + k.encode() + struct.pack("<I", t) + v for k, (t, v) in kvs)
    out = blob[:4] + struct.pack("<IQQ", version, n_tensors, n_kv + len(kvs)) + extra + blob[24:]
    fuzz.run(fx, _write("m.gguf", out), f"m.gguf with {kvs!r}")


@fuzz_settings(short=25)
@given(data=st.data())
def test_onnx_graphs(fuzz, data):
    """Generated graphs over the fixture's initializers: Gather, MatMul, Gemm, Transpose and Identity
    nodes reading initializers or each other (cycles, dangling inputs, odd attributes, repeated or
    empty names): the embedding/head search."""
    import onnx  # noqa: PLC0415 - an optional extra, imported by the fixture already
    from onnx import helper  # noqa: PLC0415

    fx = fuzz.fixtures["onnx"]
    model = onnx.load(str(fx.root / "m.onnx"), load_external_data=False)
    names = ["E", "H", "b", "ids", "", "v0", "v1", "v2"]
    del model.graph.node[:]
    for i in range(data.draw(st.integers(0, 12), label="nodes")):
        op = data.draw(st.sampled_from(["Gather", "MatMul", "Gemm", "Transpose", "Identity", "Add"]), label="op")
        inputs = data.draw(st.lists(st.sampled_from(names), min_size=0, max_size=3), label="inputs")
        attrs = {}
        if op == "Transpose":
            attrs["perm"] = data.draw(st.lists(st.integers(-2, 3), min_size=1, max_size=3), label="perm")
        elif op == "Gemm":
            attrs["transB"] = data.draw(st.integers(-1, 2), label="transB")
        elif op == "Gather":
            attrs["axis"] = data.draw(st.integers(-2, 2), label="axis")
        name = data.draw(st.sampled_from(["", "n", f"n{i}", "x" * 300]), label="name")
        model.graph.node.append(helper.make_node(op, inputs, [f"v{i % 3}"], name=name, **attrs))
    fuzz.run(fx, _write("m.onnx", model.SerializeToString()), f"m.onnx nodes {list(model.graph.node)!r}"[:3000])


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3), max_leaves=8)


@fuzz_settings(short=25)
@given(data=st.data())
def test_peft_configs(fuzz, data):
    """adapter_config.json with fields of the wrong type or value, unknown keys, or not JSON at all:
    peft reads it or refuses it, in one line either way."""
    fx = fuzz.fixtures.get("peft")
    if fx is None:
        pytest.skip("peft is not installed")
    from harness import ADAPTER_CONFIG  # noqa: PLC0415 - the fixture's own config

    if data.draw(st.integers(0, 5), label="raw") == 0:
        raw = data.draw(st.binary(max_size=64) | st.just(b'{"peft_type": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
                        label="bytes")
    else:
        cfg = dict(ADAPTER_CONFIG)
        for key in data.draw(st.lists(st.sampled_from([*sorted(ADAPTER_CONFIG), "layers_to_transform", "x"]),
                                      min_size=1, max_size=3), label="keys"):
            if data.draw(st.booleans(), label="drop"):
                cfg.pop(key, None)
            else:
                cfg[key] = data.draw(_JSON | st.sampled_from(["LORA", "IA3", "PROMPT_TUNING", ".*", "lm_head"]),
                                     label=key)
        raw = json.dumps(cfg).encode()
    fuzz.run(fx, _write("adapter/adapter_config.json", raw), f"adapter_config.json {raw[:300]!r}")
