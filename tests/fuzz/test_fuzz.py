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

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
pytest.importorskip("transformers")

import json

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from harness import Fixture, Worker, build_fixtures, copy_fixture, hostile_cases, run_case  # noqa: E402
from support.checkpoints import field_values, flip_bits, safetensors_with_header, set_field, structure  # noqa: E402

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
    assert fuzz.seen_exit.get(0, 0) - before.get(0, 0) == len(fuzz.fixtures) == 9


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
    which = data.draw(st.sampled_from(sorted(ZIPS) + ["dcp"]), label="archive")
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


@pytest.mark.parametrize("fixture, name, mutate", hostile_cases(), ids=[c[1] for c in hostile_cases()])
def test_hostile_inputs(fuzz, fixture, name, mutate):
    """Hand-made: petabyte claims, outside paths, symlink loops, FIFOs, zip bombs, absurd configs."""
    fuzz.run(fuzz.fixtures[fixture], mutate, name)
