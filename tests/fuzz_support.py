"""The fuzz harness: valid fixtures of every format, their structure, mutations, a worker, invariants.

``build_fixtures`` writes one small valid checkpoint per format. ``structure`` finds the
boundaries and editable fields of each file (zip local headers, central directory and end
record; safetensors length, JSON header and data), so mutations aim where parsers decide
things. ``Worker`` runs ``tiecheck inspect`` on a mutated copy in a long-lived process (see
``fuzz_worker.py``) and ``check_case`` holds the answer to the invariants every input must
keep: exit 0, 1 or 2; one clear line for an error, never a traceback; an answer within the time
bound; bounded peak memory; the input's bytes, mtime and folder unchanged.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from formats_helpers import write_safetensors, write_sharded

WORKER = Path(__file__).with_name("fuzz_worker.py")

CASE_TIMEOUT_S = 30  # per case; the slowest valid fixture takes well under a second
PEAK_GROWTH_MB = 256  # a case may raise the worker's peak RSS by this much; fixtures are a few KB
AS_BACKSTOP_MB = 8192  # address-space limit above the warm worker's size: protects the test machine only


# -- fixtures ----------------------------------------------------------------------------------

def tiny_state_dict(seed: int = 0) -> dict:
    """A tied embedding and head, a norm and a block: a few hundred bytes of tensors."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(8, 4, generator=g)
    return {"embed.weight": emb, "head.weight": emb, "norm.weight": torch.ones(4),
            "norm.bias": torch.zeros(4), "block.weight": torch.randn(4, 4, generator=g),
            "step": torch.tensor(3)}


def untied(sd: dict) -> dict:
    return {k: v.clone() for k, v in sd.items()}


@dataclass
class Fixture:
    name: str
    root: Path  # folder holding the fixture (copied per case)
    target: str  # relative to root: what `tiecheck inspect` gets
    files: list[str]  # relative paths of the files mutations may change


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(8, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.norm(self.embed(x)))


def _llama_config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 32, "tie_word_embeddings": True}


def _llama_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,),
              "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
              "model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.k_proj.weight": (4, 8),
              "model.layers.0.self_attn.v_proj.weight": (4, 8), "model.layers.0.self_attn.o_proj.weight": (8, 8),
              "model.layers.0.mlp.gate_proj.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (16, 8),
              "model.layers.0.mlp.down_proj.weight": (8, 16)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def build_fixtures(base: Path, *, with_hf: bool = True) -> dict[str, Fixture]:
    """One valid checkpoint of every format, each in its own folder under ``base``."""
    import warnings

    fx: dict[str, Fixture] = {}

    def folder(name: str) -> Path:
        p = base / name
        p.mkdir(parents=True)
        return p

    sd = tiny_state_dict()
    d = folder("torch_zip")
    torch.save(sd, d / "model.pt")
    fx["torch_zip"] = Fixture("torch_zip", d, "model.pt", ["model.pt"])

    d = folder("torch_legacy")
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 2},
               d / "ckpt.pt", _use_new_zipfile_serialization=False)
    fx["torch_legacy"] = Fixture("torch_legacy", d, "ckpt.pt", ["ckpt.pt"])

    d = folder("safetensors")
    write_safetensors(d / "model.safetensors", untied(sd), metadata={"format": "pt"})
    fx["safetensors"] = Fixture("safetensors", d, "model.safetensors", ["model.safetensors"])

    d = folder("sharded")
    write_sharded(d / "ckpt", untied(sd), shards=2)
    names = sorted(p.name for p in (d / "ckpt").iterdir())
    fx["sharded"] = Fixture("sharded", d, "ckpt", [f"ckpt/{n}" for n in names])

    if with_hf:
        d = folder("hf")
        (d / "model").mkdir()
        (d / "model" / "config.json").write_text(json.dumps(_llama_config(), indent=1))
        write_safetensors(d / "model" / "model.safetensors", _llama_tensors())
        fx["hf"] = Fixture("hf", d, "model", ["model/config.json", "model/model.safetensors"])

    d = folder("pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(_Tiny(), (torch.tensor([[1, 2]]),))
        torch.export.save(ep, d / "tiny.pt2")
    fx["pt2"] = Fixture("pt2", d, "tiny.pt2", ["tiny.pt2"])

    d = folder("dcp")
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP warns and saves as one rank
        dcp.save({"model": untied(sd), "step": 7}, checkpoint_id=str(d / "ckpt"))
    names = sorted(p.name for p in (d / "ckpt").iterdir())
    fx["dcp"] = Fixture("dcp", d, "ckpt", [f"ckpt/{n}" for n in names])
    return fx


# -- structure ---------------------------------------------------------------------------------

@dataclass
class ZipField:
    """A little-endian integer field of a zip header: where it is and what it holds."""

    where: str  # e.g. "central[2].compress_size"
    offset: int
    size: int
    value: int


@dataclass
class Structure:
    boundaries: list[int] = field(default_factory=list)  # offsets where a parser changes state
    regions: list[tuple[int, int]] = field(default_factory=list)  # byte ranges parsers interpret
    fields: list[ZipField] = field(default_factory=list)  # zip header fields worth editing
    names: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of zip entry names


_LOCAL = [("method", 8, 2), ("crc", 14, 4), ("compress_size", 18, 4), ("file_size", 22, 4), ("name_len", 26, 2),
          ("extra_len", 28, 2)]
_CENTRAL = [("version_needed", 6, 2), ("flags", 8, 2), ("method", 10, 2), ("crc", 16, 4), ("compress_size", 20, 4),
            ("file_size", 24, 4), ("name_len", 28, 2), ("extra_len", 30, 2), ("comment_len", 32, 2),
            ("header_offset", 42, 4)]
_EOCD = [("disk_entries", 8, 2), ("total_entries", 10, 2), ("cd_size", 12, 4), ("cd_offset", 16, 4),
         ("comment_len", 20, 2)]


def _fields(data: bytes, base: int, spec, label: str) -> list[ZipField]:
    fmt = {2: "<H", 4: "<I"}
    return [ZipField(f"{label}.{n}", base + off, size, struct.unpack_from(fmt[size], data, base + off)[0])
            for n, off, size in spec]


def zip_structure(data: bytes) -> Structure:
    """Local headers, data records, central directory entries and end record of every zip in ``data``.

    A DCP ``.distcp`` file is several zips back to back (one per chunk); each end record locates
    its own directory, relative to where its zip starts.
    """
    s = Structure()
    eocd = data.find(b"PK\x05\x06")
    while eocd != -1 and eocd + 22 <= len(data):
        cd_size, cd_offset = struct.unpack_from("<II", data, eocd + 12)
        base = eocd - cd_size - cd_offset  # where this zip starts in the file
        if data[eocd - 20:eocd - 16] == b"PK\x06\x07":  # a zip64 end record and locator sit before it
            base -= 56 + 20
        if base >= 0:
            _one_zip(data, s, base, base + cd_offset, cd_size, eocd)
        eocd = data.find(b"PK\x05\x06", eocd + 4)
    s.boundaries = sorted({b for b in s.boundaries if 0 < b < len(data)})
    return s


def _one_zip(data: bytes, s: Structure, base: int, cd_start: int, cd_size: int, eocd: int) -> None:
    pos, i = cd_start, len([f for f in s.fields if f.where.endswith(".header_offset")])
    while pos < cd_start + cd_size and data[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, pos + 28)
        s.boundaries += [pos, pos + 46]
        s.regions.append((pos, pos + 46 + n + m + k))
        s.fields += _fields(data, pos, _CENTRAL, f"central[{i}]")
        s.names.append((pos + 46, n))
        local = base + struct.unpack_from("<I", data, pos + 42)[0]
        csize = struct.unpack_from("<I", data, pos + 20)[0]
        ln, lm = struct.unpack_from("<HH", data, local + 26)
        start = local + 30 + ln + lm
        s.boundaries += [local, local + 30, start, start + csize]
        s.regions.append((local, start))
        s.fields += _fields(data, local, _LOCAL, f"local[{i}]")
        s.names.append((local + 30, ln))
        pos += 46 + n + m + k
        i += 1
    s.boundaries += [cd_start, eocd, eocd + 22]
    s.regions.append((eocd, eocd + 22))
    s.fields += _fields(data, eocd, _EOCD, f"eocd@{eocd}")


def safetensors_structure(data: bytes) -> Structure:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    s = Structure(boundaries=[1, 4, 7, 8, 9, 8 + n - 1, 8 + n], regions=[(0, 8 + n)])
    for name, spec in header.items():
        if name != "__metadata__":
            a, b = spec["data_offsets"]
            s.boundaries += [8 + n + a, 8 + n + b]
    s.boundaries = sorted({b for b in s.boundaries if 0 < b < len(data)})
    return s


def structure(data: bytes) -> Structure:
    """Where a file's parsers decide things; the whole file for JSON and pickles."""
    if data[:4] == b"PK\x03\x04":
        return zip_structure(data)
    if len(data) > 9 and data[8:9] == b"{":
        return safetensors_structure(data)
    if data[:1] == b"\x80":  # a pickle (legacy torch.save, DCP .metadata): every byte is an opcode or argument
        return Structure(boundaries=_pickle_boundaries(data), regions=[(0, len(data))])
    return Structure(boundaries=sorted({1, len(data) // 2, len(data) - 1}), regions=[(0, len(data))])


def _pickle_boundaries(data: bytes) -> list[int]:
    """Where each pickle of a file of concatenated pickles ends (legacy torch.save writes five)."""
    import pickletools

    out, pos = [], 0
    import io

    buf = io.BytesIO(data)
    while pos < len(data):
        try:
            for _op, _arg, p in pickletools.genops(buf):
                pass
        except Exception:  # noqa: BLE001 - raw storage bytes follow the last pickle
            break
        pos = buf.tell()
        out.append(pos)
        if data[pos:pos + 1] != b"\x80":
            break
    return sorted({b for b in out if 0 < b < len(data)} | {1, 2, len(data) - 1})


# -- cases -------------------------------------------------------------------------------------

def copy_fixture(fx: Fixture, dest: Path) -> Path:
    shutil.copytree(fx.root, dest, symlinks=True)
    return dest


def set_read_only(root: Path, read_only: bool) -> None:
    """chmod -R a-w (or back to u+w), folders included, without following symlinks."""
    paths = [root] + [Path(d) / n for d, ds, fs in os.walk(root) for n in ds + fs]
    for p in paths:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        p.chmod(mode & ~0o222 if read_only else mode | stat.S_IWUSR)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: its bytes and mtime (files), its target (links)."""
    out = {}
    for d, ds, fs in os.walk(root):
        for n in ds + fs:
            p = Path(d) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", p.read_bytes(), p.stat().st_mtime_ns)
            else:
                out[rel] = ("dir",)
    return out


@dataclass
class Result:
    exit_code: int | None
    stdout: str = ""
    stderr: str = ""
    raw: str = ""  # written to file descriptors 1 and 2 directly (C++ warnings, crashes)
    escaped: str | None = None  # an exception that got past the CLI's error handling
    peak_growth_mb: float = 0.0
    elapsed: float = 0.0
    timed_out: bool = False
    crashed: bool = False


class Worker:
    """One ``fuzz_worker.py`` process; restarted after a hang or a crash."""

    def __init__(self, scratch: Path, warmup: list[list[str]] = ()):
        self.scratch = scratch
        # Commands run after every start, unmeasured: imports (torch, transformers) cost seconds and
        # a hundred MiB once, which must not count against the first case of a fresh worker.
        self.warmup = list(warmup)
        self.cwd = scratch / "cwd"  # the worker's current folder: must stay empty
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.capture = scratch / "capture.txt"
        self.proc: subprocess.Popen | None = None
        self.warm = False

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, str(WORKER), str(self.capture)], cwd=self.cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.scratch / "worker.log", "ab"), text=True, bufsize=1)
        line = self._read_line(120)
        if line is None or not json.loads(line).get("ready"):
            raise RuntimeError(f"the fuzz worker did not start: {(self.scratch / 'worker.log').read_text()[-2000:]}")
        self.warm = False
        for args in self.warmup:
            self._ask({"args": args, "timeout": 120}, 120)

    def _ask(self, req: dict, timeout: float) -> str | None:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read_line(timeout)

    def _read_line(self, timeout: float) -> str | None:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout)
        sel.close()
        if not ready:
            return None
        return self.proc.stdout.readline() or None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def run(self, args: list[str], timeout: float = CASE_TIMEOUT_S) -> Result:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        req: dict = {"args": args, "timeout": timeout - 2}
        if not self.warm:
            req["limit_as_extra_mb"] = AS_BACKSTOP_MB
            self.warm = True
        line = self._ask(req, timeout)
        raw = self.capture.read_text(errors="replace") if self.capture.exists() else ""
        if line is None:
            crashed = self.proc.poll() is not None
            self.stop()
            return Result(None, raw=raw, timed_out=not crashed, crashed=crashed)
        out = json.loads(line)
        return Result(out.get("exit_code"), out.get("stdout", ""), out.get("stderr", ""), raw, out.get("escaped"),
                      out.get("peak_growth_mb", 0.0), out.get("elapsed", 0.0))


def problems(res: Result, case: str) -> list[str]:
    """What the answer to one case breaks, empty when every invariant holds."""
    out = []
    if res.timed_out:
        out.append(f"no answer within {CASE_TIMEOUT_S} s (hang); where it was:\n{res.raw[-3000:]}")
        return out
    if res.crashed:
        out.append(f"the process died:\n{res.raw[-3000:]}")
        return out
    if res.escaped:
        out.append(f"an exception escaped the CLI:\n{res.escaped[-3000:]}")
    if res.exit_code not in (0, 1, 2):
        out.append(f"exit code {res.exit_code}")
    text = res.stdout + res.stderr + res.raw
    if "Traceback" in text:
        out.append("a traceback in the output")
    if res.raw.strip():
        out.append(f"printed past click (C++ or interpreter output): {res.raw.strip()[:500]!r}")
    if res.exit_code == 2:
        lines = res.stderr.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("tiecheck: error: "):
            out.append(f"an error that is not one line: {res.stderr[:1500]!r}")
        elif "rerun with --debug for the traceback" in lines[0]:  # handle_errors' line for an unforeseen exception
            out.append(f"an error tiecheck did not understand: {lines[0][:500]}")
    elif res.stderr.strip():
        out.append(f"stderr on exit {res.exit_code}: {res.stderr[:500]!r}")
    if res.peak_growth_mb > PEAK_GROWTH_MB:
        out.append(f"peak RSS grew by {res.peak_growth_mb:.0f} MiB (bound {PEAK_GROWTH_MB})")
    return [f"{case}: {p}" for p in out]


def run_case(worker: Worker, root: Path, target: str, case: str, extra_args=()) -> tuple[Result, list[str]]:
    """Run `tiecheck inspect` on ``root/target`` made read-only; check the invariants and the inputs."""
    before = snapshot(root)
    set_read_only(root, True)
    try:
        res = worker.run(["inspect", str(root / target), "--no-flops", *extra_args])
    finally:
        set_read_only(root, False)
    found = problems(res, case)
    if snapshot(root) != before:
        found.append(f"{case}: the input changed (bytes, mtime or the folder's entries)")
    if any(worker.cwd.iterdir()):
        found.append(f"{case}: files appeared in the working folder: {sorted(os.listdir(worker.cwd))}")
        for p in worker.cwd.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return res, found


# -- mutations ---------------------------------------------------------------------------------

INTERESTING_U32 = (0, 1, 0x7FFFFFFF, 0xFFFFFFFF)
INTERESTING_U16 = (0, 1, 0x7FFF, 0xFFFF)


def flip_bits(data: bytes, positions: list[int], bits: list[int]) -> bytes:
    b = bytearray(data)
    for p, bit in zip(positions, bits):
        b[p % len(b)] ^= 1 << (bit % 8)
    return bytes(b)


def set_field(data: bytes, f: ZipField, value: int) -> bytes:
    b = bytearray(data)
    value &= (1 << (8 * f.size)) - 1
    b[f.offset:f.offset + f.size] = value.to_bytes(f.size, "little")
    return bytes(b)


def field_values(f: ZipField, file_size: int) -> list[int]:
    """Values an edited header field takes: extremes, off by one, past the end of the file."""
    extremes = INTERESTING_U16 if f.size == 2 else INTERESTING_U32
    return sorted({*extremes, f.value + 1, max(0, f.value - 1), f.value * 2 + 1, file_size, file_size + 1,
                   8 if f.where.endswith("method") else 0, 12 if f.where.endswith("method") else 0, 99})


def rewrite_zip_entry(src: Path, dst: Path, name_suffix: str, payload: bytes) -> None:
    """Copy a zip, replacing the record whose name ends with ``name_suffix`` (as a hand edit would)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = payload if info.filename.endswith(name_suffix) else zin.read(info)
            zout.writestr(info, data)


def safetensors_with_header(header, data_bytes: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file with a hand-written header (any JSON value) and a stated length."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if length is None else length
    return n.to_bytes(8, "little", signed=False) + hb + data_bytes


def safetensors_header_cases() -> list[tuple[str, bytes]]:
    """Hand-made headers: lengths and offsets past the end, overlaps, petabyte claims, odd JSON."""
    f32 = lambda *shape: {"dtype": "F32", "shape": list(shape)}  # noqa: E731
    data = bytes(64)
    pb = 10 ** 15
    cases = {
        "length past the end": safetensors_with_header({"a": {**f32(4), "data_offsets": [0, 16]}}, data,
                                                       length=10 ** 6),
        "length 2**64-1": safetensors_with_header({"a": {**f32(4), "data_offsets": [0, 16]}}, data,
                                                  length=2 ** 64 - 1),
        "length zero": safetensors_with_header(b"{}", data, length=0),
        "length inside the JSON": safetensors_with_header({"a": {**f32(4), "data_offsets": [0, 16]}}, data,
                                                          length=10),
        "offsets past the end": safetensors_with_header({"a": {**f32(4), "data_offsets": [0, 16]},
                                                         "b": {**f32(4), "data_offsets": [16, 2 ** 62 + 16]}}, data),
        "overlapping tensors": safetensors_with_header({"a": {**f32(8), "data_offsets": [0, 32]},
                                                        "b": {**f32(8), "data_offsets": [16, 48]}}, data[:48]),
        "same span twice": safetensors_with_header({"a": {**f32(4), "data_offsets": [0, 16]},
                                                    "b": {**f32(4), "data_offsets": [0, 16]}}, data[:16]),
        "a petabyte claimed": safetensors_with_header({"a": {**f32(pb), "data_offsets": [0, 4 * pb]}}, data),
        "a petabyte of zero-size rows": safetensors_with_header({"a": {**f32(pb, 0), "data_offsets": [0, 0]}}, b""),
        "shape overflowing int64": safetensors_with_header(
            {"a": {**f32(2 ** 62, 2 ** 62, 0), "data_offsets": [0, 0]}}, b""),
        "shape with 100 dims": safetensors_with_header({"a": {**f32(*([1] * 100)), "data_offsets": [0, 4]}}, data[:4]),
        "negative offsets": safetensors_with_header({"a": {**f32(4), "data_offsets": [-16, 0]}}, data[:16]),
        "float shape": safetensors_with_header({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}},
                                               data[:16]),
        "unknown dtype": safetensors_with_header({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
                                                 data[:16]),
        "deeply nested JSON": safetensors_with_header(b"[" * 100_000 + b"]" * 100_000),
        "deeply nested metadata": safetensors_with_header(
            b'{"__metadata__": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"),
        "a JSON list": safetensors_with_header([1, 2, 3]),
        "invalid UTF-8": safetensors_with_header(b'{"\xff\xfe": 1}'),
        "duplicate names": safetensors_with_header(
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', data[:8]),
        "metadata not strings": safetensors_with_header({"__metadata__": {"x": [1, {"y": None}]},
                                                         "a": {**f32(1), "data_offsets": [0, 4]}}, data[:4]),
        "huge integer": safetensors_with_header(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 +
                                                b'], "data_offsets": [0, 4]}}', data[:4]),
        "NaN offsets": safetensors_with_header(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [NaN, 4]}}',
                                               data[:4]),
        "empty file after the length": (16).to_bytes(8, "little"),
    }
    return list(cases.items())


# -- hand-made hostile cases, per format -----------------------------------------------------------

Mutation = Callable[[Path], "str | None"]  # edits a copied fixture in place; may return another target


def _edit_zip_json(path: Path, suffix: str, edit) -> None:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(suffix))
        obj = json.loads(z.read(name))
    edit(obj)
    tmp = path.with_name(path.name + ".tmp")
    rewrite_zip_entry(path, tmp, suffix, json.dumps(obj).encode())
    tmp.replace(path)


def _pt2_entry(obj: dict) -> dict:
    return next(iter(obj["config"].values()))


def _pt2_cases() -> list[tuple[str, object]]:
    cfg = "_weights_config.json"
    pb = {"as_int": 10 ** 15}

    def meta(**changes):
        def edit(obj):
            _pt2_entry(obj)["tensor_meta"].update(changes)
        return lambda d: _edit_zip_json(d / "tiny.pt2", cfg, edit)

    def entry(**changes):
        return lambda d: _edit_zip_json(d / "tiny.pt2", cfg, lambda obj: _pt2_entry(obj).update(changes))

    return [
        ("pt2 tensor claiming a petabyte", meta(sizes=[pb, pb], strides=[pb, {"as_int": 1}])),
        ("pt2 sizes overflowing int64", meta(sizes=[{"as_int": 2 ** 62}] * 3, strides=[{"as_int": 1}] * 3)),
        ("pt2 negative stride", meta(strides=[{"as_int": -4}, {"as_int": 1}])),
        ("pt2 negative size", meta(sizes=[{"as_int": -8}, {"as_int": 4}])),
        ("pt2 storage offset past the record", meta(storage_offset={"as_int": 10 ** 6})),
        ("pt2 symbolic size", meta(sizes=[{"as_expr": "s0"}, {"as_int": 4}])),
        ("pt2 sizes not a list", meta(sizes=7)),
        ("pt2 dtype a list", meta(dtype=[7])),
        ("pt2 unknown dtype", meta(dtype=999)),
        ("pt2 record outside its folder", entry(path_name="../models/model.json")),
        ("pt2 record missing", entry(path_name="weight_99")),
        ("pt2 raw weights read as a pickle", entry(use_pickle=True)),
        ("pt2 config not a mapping", lambda d: _edit_zip_json(d / "tiny.pt2", cfg, lambda o: o.update(config=[1]))),
        ("pt2 deeply nested graph JSON",
         lambda d: _rewrite(d / "tiny.pt2", "models/model.json", b"[" * 100_000 + b"]" * 100_000)),
        ("pt2 archive_format not pt2", lambda d: _rewrite(d / "tiny.pt2", "archive_format", b"pt3")),
    ]


def _rewrite(path: Path, suffix: str, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    rewrite_zip_entry(path, tmp, suffix, payload)
    tmp.replace(path)


def _dcp_edit(edit):
    def mutate(d: Path) -> None:
        import pickle

        from tiecheck.loaders.dcp import read_metadata

        md = read_metadata(d / "ckpt")
        edit(md)
        (d / "ckpt" / ".metadata").write_bytes(pickle.dumps(md))
    return mutate


def _dcp_cases() -> list[tuple[str, object]]:
    import dataclasses

    def first_tensor(md):
        return next(v for v in md.state_dict_metadata.values() if hasattr(v, "chunks"))

    def storage(md, **changes):
        md.storage_data = {k: dataclasses.replace(v, **changes) for k, v in md.storage_data.items()}

    def claim_pb(md):
        t = first_tensor(md)
        t.size = torch.Size([10 ** 15, 10 ** 15])
        t.chunks[0].sizes = torch.Size([10 ** 15, 10 ** 15])

    def claim_whole_pb(md):
        t = first_tensor(md)
        t.size = torch.Size([10 ** 15])
        t.chunks = [type(t.chunks[0])(offsets=torch.Size([0]), sizes=torch.Size([10 ** 15]))]

    def chunk_rank_mismatch(md):
        first_tensor(md).chunks[0].sizes = torch.Size([1])

    def strings(md):
        md.state_dict_metadata = {"a": "not metadata"}

    return [
        ("dcp size claiming 10^30 elements", _dcp_edit(claim_pb)),
        ("dcp whole tensor claiming a petabyte", _dcp_edit(claim_whole_pb)),
        ("dcp chunk of another rank", _dcp_edit(chunk_rank_mismatch)),
        ("dcp chunk offsets past the file", _dcp_edit(lambda md: storage(md, offset=10 ** 12))),
        ("dcp chunk lengths past the file", _dcp_edit(lambda md: storage(md, length=10 ** 12))),
        ("dcp data file outside the folder", _dcp_edit(lambda md: storage(md, relative_path="../x.distcp"))),
        ("dcp data file absolute", _dcp_edit(lambda md: storage(md, relative_path="/etc/passwd"))),
        ("dcp entries of the wrong type", _dcp_edit(strings)),
        ("dcp metadata a plain dict", lambda d: (d / "ckpt" / ".metadata").write_bytes(
            __import__("pickle").dumps({"state_dict_metadata": {}}))),
        ("dcp metadata empty", lambda d: (d / "ckpt" / ".metadata").write_bytes(b"")),
    ]


def _torch_zip_cases() -> list[tuple[str, object]]:
    import pickle

    def storage_claim(numel: int, shape: tuple):
        """data.pkl rewritten to claim a storage (and a tensor over it) far larger than its record."""
        class Claim(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
                    return ("storage", torch.FloatStorage, "0", "cpu", numel)
                return None

            def reducer_override(self, obj):
                if isinstance(obj, torch.Tensor):
                    return torch._utils._rebuild_tensor_v2, (obj.untyped_storage(), 0, shape,
                                                              (1,) * len(shape), False, {})
                return NotImplemented

        import io

        buf = io.BytesIO()
        Claim(buf, protocol=2).dump({"embed.weight": torch.zeros(4)})
        return lambda d: _rewrite(d / "model.pt", "data.pkl", buf.getvalue())

    def bomb(d: Path) -> None:
        """data.pkl deflated, declaring 2 GiB: what a zip bomb looks like to miniz."""
        path = d / "model.pt"
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            data = {i.filename: z.read(i) for i in infos}
        with zipfile.ZipFile(path, "w") as z:
            for i in infos:
                if i.filename.endswith("data.pkl"):
                    z.writestr(i.filename, data[i.filename] + b"\0" * (64 << 20), zipfile.ZIP_DEFLATED)
                else:
                    z.writestr(i, data[i.filename])
        raw = bytearray(path.read_bytes())
        s = zip_structure(bytes(raw))
        for f in s.fields:
            if f.where in ("central[0].file_size", "local[0].file_size"):
                raw[f.offset:f.offset + 4] = (2 << 30).to_bytes(4, "little")
        path.write_bytes(bytes(raw))

    return [
        ("torch zip storage claiming 10^9 elements", storage_claim(10 ** 9, (10 ** 9,))),
        ("torch zip storage claiming a petabyte", storage_claim(10 ** 15, (4,))),
        ("torch zip big-endian byteorder", lambda d: _rewrite(d / "model.pt", "byteorder", b"big")),
        ("torch zip unknown byteorder", lambda d: _rewrite(d / "model.pt", "byteorder", b"middle")),
        ("torch zip storage alignment garbage", lambda d: _rewrite(d / "model.pt", ".storage_alignment", b"x")),
        ("torch zip deflated data.pkl declaring 2 GiB", bomb),
        ("torch zip data.pkl empty", lambda d: _rewrite(d / "model.pt", "data.pkl", b"")),
        ("torch zip data.pkl a protocol-5 pickle", lambda d: _rewrite(
            d / "model.pt", "data.pkl", pickle.dumps({"a": 1}, protocol=5))),
    ]


def _legacy_cases() -> list[tuple[str, object]]:
    import tarfile

    def claim(numel: int):
        def mutate(d: Path) -> None:
            p = d / "ckpt.pt"
            data = p.read_bytes()
            i = data.find(b"cpuq")  # the storage's location string, then BINPUT, then its element count
            j = i + len(b"cpuq") + 1
            assert data[j:j + 1] == b"K", "fixture layout changed"
            p.write_bytes(data[:j] + b"\x8a\x08" + numel.to_bytes(8, "little") + data[j + 2:])
        return mutate

    def tar(d: Path) -> None:
        """A legacy file that is also a tar archive: torch tries tar first and extracts it."""
        p = d / "ckpt.pt"
        member = d / "storages"
        member.write_bytes(b"\x80\x02K\x00.")
        with tarfile.open(p, "w", format=tarfile.GNU_FORMAT) as t:
            # The member's name is the tar's first bytes: \x80\x02 makes them a pickle's PROTO 2 too.
            info = t.gettarinfo(member, arcname=b"\x80\x02storages".decode("utf-8", "surrogateescape"))
            with open(member, "rb") as fh:
                t.addfile(info, fh)
        member.unlink()

    return [
        ("legacy storage claiming 8 GiB", claim(2 * 10 ** 9)),
        ("legacy storage claiming a petabyte", claim(10 ** 15)),
        ("legacy file that is also a tar archive", tar),
    ]


def _index_cases() -> list[tuple[str, object]]:
    index = "ckpt/model.safetensors.index.json"

    def edit(fn):
        def mutate(d: Path) -> None:
            p = d / index
            obj = json.loads(p.read_text())
            fn(obj, d)
            p.write_text(json.dumps(obj))
        return mutate

    def first(obj):
        return next(iter(obj["weight_map"]))

    def name_shard(shard, prepare=None):
        def fn(obj, d):
            if prepare:
                prepare(d)
            obj["weight_map"][first(obj)] = shard
        return edit(fn)

    def copy_outside(d):
        shutil.copy(next((d / "ckpt").glob("*.safetensors")), d / "outside.safetensors")

    return [
        ("index naming a missing shard", name_shard("missing.safetensors")),
        ("index naming a shard outside the folder", name_shard("../outside.safetensors", copy_outside)),
        ("index naming an absolute path", name_shard(str(Path("/etc/hostname")))),
        ("index naming a shard in a subfolder", name_shard("sub/x.safetensors",
                                                           lambda d: (d / "ckpt/sub").mkdir())),
        ("index naming itself", name_shard("model.safetensors.index.json")),
        ("index naming a folder", name_shard("dir.safetensors", lambda d: (d / "ckpt/dir.safetensors").mkdir())),
        ("index naming a symlink loop", name_shard("loop.safetensors",
                                                   lambda d: os.symlink("loop.safetensors", d / "ckpt/loop.safetensors"))),
        ("index naming a FIFO", name_shard("fifo.safetensors", lambda d: os.mkfifo(d / "ckpt/fifo.safetensors"))),
        ("index naming /dev/zero through a link",
         name_shard("zero.safetensors", lambda d: os.symlink("/dev/zero", d / "ckpt/zero.safetensors"))),
        ("index naming a number", name_shard(5)),
        ("index weight_map a list", edit(lambda o, d: o.update(weight_map=[]))),
        ("index deeply nested", lambda d: (d / index).write_bytes(b'{"weight_map": {}, "x": ' + b"[" * 100_000 +
                                                                  b"]" * 100_000 + b"}")),
        ("folder with a symlink to itself", lambda d: os.symlink(".", d / "ckpt/loop")),
        ("folder with a self-referencing symlink", lambda d: os.symlink("self", d / "ckpt/self")),
        ("folder with a FIFO", lambda d: os.mkfifo(d / "ckpt/zz.safetensors")),
        ("target a symlink loop", lambda d: (os.symlink("b", d / "a"), os.symlink("a", d / "b")) and "a"),
        ("target a FIFO", lambda d: os.mkfifo(d / "fifo") or "fifo"),
    ]


def _hf_cases() -> list[tuple[str, object]]:
    def config(**changes):
        return lambda d: (d / "model/config.json").write_text(json.dumps({**_llama_config(), **changes}))

    return [
        ("hf config with a million layers", config(num_hidden_layers=10 ** 6)),
        ("hf config with a petabyte vocabulary", config(vocab_size=10 ** 15)),
        ("hf config with 10^12 positions", config(max_position_embeddings=10 ** 12)),
        ("hf config of the wrong types", config(hidden_size="x", architectures=[None, 5, "../x"])),
        ("hf config naming remote code", config(architectures=["Evil"], auto_map={"AutoModelForCausalLM": "evil.Evil"})),
        ("hf config deeply nested", lambda d: (d / "model/config.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)),
        ("hf config of 20 MB", lambda d: (d / "model/config.json").write_bytes(b'{"a": "' + b"x" * (20 << 20) + b'"}')),
        ("hf config a FIFO", lambda d: ((d / "model/config.json").unlink(), os.mkfifo(d / "model/config.json"))),
        ("hf weights a symlink loop", lambda d: ((d / "model/model.safetensors").unlink(),
                                                 os.symlink("model.safetensors", d / "model/model.safetensors"))),
        ("hf folder with a symlink to itself", lambda d: os.symlink(".", d / "model/sub")),
    ]


def hostile_cases() -> list[tuple[str, str, object]]:
    """(fixture, name, mutation) for every hand-made hostile input."""
    out = [("safetensors", f"safetensors {name}",
            lambda d, b=blob: (d / "model.safetensors").write_bytes(b)) for name, blob in safetensors_header_cases()]
    out += [("pt2", n, m) for n, m in _pt2_cases()]
    out += [("dcp", n, m) for n, m in _dcp_cases()]
    out += [("torch_zip", n, m) for n, m in _torch_zip_cases()]
    out += [("torch_legacy", n, m) for n, m in _legacy_cases()]
    out += [("sharded", n, m) for n, m in _index_cases()]
    out += [("hf", n, m) for n, m in _hf_cases()]
    return out
