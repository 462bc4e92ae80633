"""The fuzz harness: valid fixtures of every format, their structure, mutations, a worker, invariants.

``build_fixtures`` writes one small valid checkpoint per format. ``structure`` finds the
boundaries and editable fields of each file (zip local headers, central directory and end
record; safetensors length, JSON header and data), so mutations aim where parsers decide
things. ``Worker`` runs ``tiecheck inspect`` on a mutated copy in a long-lived process (see
``worker.py``) and ``check_case`` holds the answer to the invariants every input must
keep: exit 0, 1 or 2; one clear line for an error, never a traceback; an answer within the time
bound; bounded peak memory; the input's bytes, mtime and folder unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
import selectors
import shutil
import subprocess
import sys
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from support.checkpoints import (
    cloned,
    llama_config,
    llama_tensors,
    rewrite_zip_entry,
    safetensors_with_header,
    set_read_only,
    snapshot,
    tensor_pickle,
    tiny_state_dict,
    write_safetensors,
    write_sharded,
    zip_structure,
)
from support.models import TinyExportLM

WORKER = Path(__file__).with_name("worker.py")

CASE_TIMEOUT_S = 30  # per case; the slowest valid fixture takes well under a second
PEAK_GROWTH_MB = 256  # a case may raise the worker's peak RSS by this much; fixtures are a few KB
AS_BACKSTOP_MB = 8192  # address-space limit above the warm worker's size: protects the test machine only


@dataclass
class Fixture:
    name: str
    root: Path  # folder holding the fixture (copied per case)
    target: str  # relative to root: what `tiecheck inspect` gets
    files: list[str]  # relative paths of the files mutations may change


def build_fixtures(base: Path, *, with_hf: bool = True) -> dict[str, Fixture]:
    """One valid checkpoint of every format, each in its own folder under ``base``."""

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
    write_safetensors(d / "model.safetensors", cloned(sd), metadata={"format": "pt"})
    fx["safetensors"] = Fixture("safetensors", d, "model.safetensors", ["model.safetensors"])

    d = folder("sharded")
    write_sharded(d / "ckpt", cloned(sd), shards=2)
    names = sorted(p.name for p in (d / "ckpt").iterdir())
    fx["sharded"] = Fixture("sharded", d, "ckpt", [f"ckpt/{n}" for n in names])

    if with_hf:
        d = folder("hf")
        (d / "model").mkdir()
        (d / "model" / "config.json").write_text(json.dumps(llama_config(), indent=1))
        write_safetensors(d / "model" / "model.safetensors", llama_tensors())
        fx["hf"] = Fixture("hf", d, "model", ["model/config.json", "model/model.safetensors"])

    d = folder("pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(TinyExportLM(), (torch.tensor([[1, 2]]),))
        torch.export.save(ep, d / "tiny.pt2")
    fx["pt2"] = Fixture("pt2", d, "tiny.pt2", ["tiny.pt2"])

    d = folder("dcp")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP warns and saves as one rank
        dcp.save({"model": cloned(sd), "step": 7}, checkpoint_id=str(d / "ckpt"))
    names = sorted(p.name for p in (d / "ckpt").iterdir())
    fx["dcp"] = Fixture("dcp", d, "ckpt", [f"ckpt/{n}" for n in names])

    d = folder("onnx")
    write_onnx(d)
    fx["onnx"] = Fixture("onnx", d, "m.onnx", ["m.onnx", "w.data"])

    d = folder("gguf")
    write_gguf(d / "m.gguf")
    fx["gguf"] = Fixture("gguf", d, "m.gguf", ["m.gguf"])

    if importlib.util.find_spec("peft") is not None:  # reading an adapter needs the [peft] extra
        d = folder("peft")
        write_adapter(d / "adapter")
        fx["peft"] = Fixture("peft", d, "adapter", ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"])
    return fx


ADAPTER_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
                  "target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "base_model_name_or_path": None,
                  "bias": "none", "fan_in_fan_out": False, "inference_mode": True}


def write_adapter(d: Path) -> Path:
    """A tiny LoRA adapter folder, as peft's save_pretrained lays it out (written directly: no model)."""
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG, indent=2))
    write_safetensors(d / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2),
        "base_model.model.lm_head.modules_to_save.weight": torch.arange(128.0).reshape(16, 8)})
    return d


def write_onnx(d: Path) -> Path:
    """A tiny ONNX model in ``d``: an embedding E and its transposed copy H in the external file
    ``w.data`` (the TorchScript exporter's lost tie), and a bias stored inline."""
    from onnx import TensorProto, helper  # noqa: PLC0415 - an optional extra; only this fixture needs it

    e = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    (d / "w.data").write_bytes(e.numpy().tobytes() + e.t().contiguous().numpy().tobytes())
    inits = []
    for name, shape, off in (("E", (8, 4), 0), ("H", (4, 8), 128)):
        init = TensorProto()
        init.name, init.data_type, init.data_location = name, TensorProto.FLOAT, TensorProto.EXTERNAL
        init.dims.extend(shape)
        for k, v in (("location", "w.data"), ("offset", str(off)), ("length", "128")):
            x = init.external_data.add()
            x.key, x.value = k, v
        inits.append(init)
    inits.append(helper.make_tensor("b", TensorProto.FLOAT, [8], [0.5] * 8))
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], name="emb"),
             helper.make_node("MatMul", ["x", "H"], ["h"], name="head"),
             helper.make_node("Add", ["h", "b"], ["y"], name="bias")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=inits)
    path = d / "m.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


def write_gguf(path: Path) -> Path:
    """A tiny llama GGUF file without output.weight (llama.cpp's declared tie), one tensor quantized."""
    import gguf  # noqa: PLC0415 - an optional extra; only this fixture needs it

    g = torch.Generator().manual_seed(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_vocab_size(64)
    w.add_embedding_length(32)
    w.add_context_length(16)
    w.add_tensor("token_embd.weight", torch.randn(64, 32, generator=g).numpy())
    q = torch.randn(32, 32, generator=g).numpy()
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", torch.ones(32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- structure ---------------------------------------------------------------------------------

def copy_fixture(fx: Fixture, dest: Path) -> Path:
    shutil.copytree(fx.root, dest, symlinks=True)
    return dest


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
                                     stderr=open(self.scratch / "worker.log", "ab"),  # noqa: SIM115 - the worker's, for its life
                                     text=True, bufsize=1)
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
        out.append(f"no answer within the case's time bound (hang); where it was:\n{res.raw[-3000:]}")
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


def run_case(worker: Worker, root: Path, target: str, case: str, extra_args=(),
             timeout: float = CASE_TIMEOUT_S) -> tuple[Result, list[str]]:
    """Run `tiecheck inspect` on ``root/target`` made read-only; check the invariants and the inputs."""
    before = snapshot(root)
    set_read_only(root, True)
    try:
        res = worker.run(["inspect", str(root / target), "--no-flops", *extra_args], timeout)
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
        # DCP's own reader (plain pickle.load): the fixture is ours, so it is trusted here.
        md = dcp.FileSystemReader(str(d / "ckpt")).read_metadata()
        edit(md)
        (d / "ckpt" / ".metadata").write_bytes(pickle.dumps(md))
    return mutate


def _dcp_cases() -> list[tuple[str, object]]:
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
    def storage_claim(numel: int, shape: tuple):
        """data.pkl rewritten to claim a storage (and a tensor over it) far larger than its record."""
        body = tensor_pickle(shape, (1,) * len(shape), numel=numel, name="embed.weight")
        return lambda d: _rewrite(d / "model.pt", "data.pkl", body)

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
        return lambda d: (d / "model/config.json").write_text(json.dumps({**llama_config(), **changes}))

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
