"""Hostile files, made cheaply: every payload of round 3 (memory, hangs, class pollution, errors
that were not one line), each written into an empty folder, with the benign file of the same
format it is measured against.

Each writer takes a folder and returns the target (relative to it). Pickles are written opcode by
opcode (``pickletools`` names the bytes), zips with ``zipfile``, ONNX with ``onnx.helper`` and, for
200,000 initializers, by repeating one serialized initializer (protobuf merges repeated messages).
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from support.checkpoints import (
    llama_config,
    llama_tensors,
    set_field,
    tensor_pickle,
    tiny_state_dict,
    write_safetensors,
    zip_structure,
)

P2 = b"\x80\x02"
Writer = Callable[[Path], str]


def _key(name: str) -> bytes:
    raw = name.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _state_dict_pickle(value: bytes) -> bytes:
    """A protocol-2 pickle of {"w": <value>} where ``value`` is raw opcodes pushing one object."""
    return P2 + b"}(" + _key("w") + value + b"u."


def torch_zip(data_pkl: bytes, *, deflate: bool = False) -> Writer:
    """A torch.save zip whose data.pkl is ``data_pkl`` (stored, or deflated as a re-zipping tool would)."""
    def write(d: Path) -> str:
        good, path = d / "good.pt", d / "model.pt"
        torch.save(tiny_state_dict(), good)
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
            for info in zin.infolist():
                body = data_pkl if info.filename.endswith("/data.pkl") else zin.read(info)
                method = zipfile.ZIP_DEFLATED if deflate and info.filename.endswith("/data.pkl") else zipfile.ZIP_STORED
                zout.writestr(info.filename, body, compress_type=method)
        good.unlink()
        return "model.pt"
    return write


def empty_lists(n_batches: int) -> bytes:
    """A list of n_batches * 1,000 empty lists, appended in batches of 1,000 as pickle writes them."""
    return P2 + b"]" + (b"(" + b"]" * 1000 + b"e") * n_batches + b"."


def torch_saved(obj_factory, **kwargs) -> Writer:
    def write(d: Path) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # complex32 is experimental
            torch.save(obj_factory(), d / "model.pt", **kwargs)
        return "model.pt"
    return write


def overlapping_records(d: Path) -> str:
    """Two storage records whose directory entries point at the same bytes: torch would alias them."""
    path = d / "model.pt"
    torch.save({"a": torch.ones(4), "b": torch.full((4,), 2.0)}, path)
    with zipfile.ZipFile(path) as z:
        names = [i.filename for i in z.infolist()]
    i0, i1 = (next(i for i, n in enumerate(names) if n.endswith(f"/data/{k}")) for k in "01")
    blob = path.read_bytes()
    fields = {f.where: f for f in zip_structure(blob).fields}
    path.write_bytes(set_field(blob, fields[f"central[{i1}].header_offset"],
                               fields[f"central[{i0}].header_offset"].value))
    return "model.pt"


def legacy(data_pickle: bytes) -> Writer:
    """A legacy (non-zip) torch.save file whose object pickle is ``data_pickle``."""
    def write(d: Path) -> str:
        head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001,
                                                                {"protocol_version": 1001, "little_endian": True}))
        (d / "old.pt").write_bytes(head + data_pickle + pickle.dumps([], protocol=2))
        return "old.pt"
    return write


# -- DCP ------------------------------------------------------------------------------------------

def dcp_benign(d: Path) -> str:
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 - heavy; only the DCP payloads need it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(4), "b": torch.zeros(2)}, checkpoint_id=str(d / "ckpt"))
    return "ckpt"


def dcp_metadata(raw: bytes) -> Writer:
    def write(d: Path) -> str:
        dcp_benign(d)
        (d / "ckpt" / ".metadata").write_bytes(raw)
        return "ckpt"
    return write


def poisoned_metadata() -> bytes:
    """Ends with BUILD on DCP's Metadata class itself: a slot state that sets Metadata.__setstate__
    (to another metadata class), which breaks every later DCP read in the process when unpickled."""
    m = "torch.distributed.checkpoint.metadata"
    return (P2 + f"c{m}\nMetadata\n".encode() + b"N}(" + _key("__setstate__") + f"c{m}\nChunkStorageMetadata\n".encode()
            + b"u\x86b.")


def dcp_stride0_chunks(d: Path) -> str:
    """A tensor of 2**28 float32 split in two chunks, each a stride-0 view of 4 bytes: a 4.5 KB folder."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader  # noqa: PLC0415
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex  # noqa: PLC0415

    dcp_benign(d)
    ckpt = d / "ckpt"
    md = FileSystemReader(str(ckpt)).read_metadata()  # trusted: our own fixture
    half = 1 << 27
    data = ckpt / "__0_0.distcp"
    chunks, items = [], {}
    blob = data.read_bytes()
    for i in range(2):
        buf = io.BytesIO()
        torch.save(torch.zeros(1).expand(half), buf)
        raw = buf.getvalue()
        offset = len(blob)
        blob += raw
        chunks.append(ChunkStorageMetadata(offsets=torch.Size([i * half]), sizes=torch.Size([half])))
        info = next(iter(md.storage_data.values()))
        items[MetadataIndex("w", torch.Size([i * half]), i)] = type(info)(relative_path=data.name, offset=offset,
                                                                          length=len(raw))
    data.write_bytes(blob)
    meta = md.state_dict_metadata["w"]
    meta.size = torch.Size([2 * half])
    meta.chunks = chunks
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != "w"} | items
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    return "ckpt"


# -- GGUF, ONNX, HF, PEFT ---------------------------------------------------------------------------

def gguf_benign(d: Path) -> str:
    from harness import write_gguf  # noqa: PLC0415 - the fixture writer of the fuzz harness

    write_gguf(d / "m.gguf")
    return "m.gguf"


def gguf_with_kv(kv: bytes, n_kv: int = 1) -> Writer:
    """The benign GGUF file with ``kv`` (raw key/value bytes) added to its metadata."""
    def write(d: Path) -> str:
        gguf_benign(d)
        p = d / "m.gguf"
        blob = p.read_bytes()
        version, n_tensors, old = struct.unpack_from("<IQQ", blob, 4)
        p.write_bytes(blob[:4] + struct.pack("<IQQ", version, n_tensors, old + n_kv) + kv + blob[24:])
        return "m.gguf"
    return write


def gguf_key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def gguf_uint8_array(n: int) -> bytes:
    return gguf_key("test.bytes") + struct.pack("<IIQ", 9, 0, n) + bytes(n)  # ARRAY of UINT8


def gguf_nested_arrays(depth: int) -> bytes:
    body = struct.pack("<IQ", 0, 0)  # the innermost: an empty array of UINT8
    for _ in range(depth):
        body = struct.pack("<IQ", 9, 1) + body  # an array holding one array
    return gguf_key("test.nested") + struct.pack("<I", 9) + body


def onnx_inline(d: Path) -> str:
    from onnx import TensorProto, helper  # noqa: PLC0415 - the [onnx] extra

    e = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    inits = [helper.make_tensor("E", TensorProto.FLOAT, [8, 4], e.flatten().tolist()),
             helper.make_tensor("H", TensorProto.FLOAT, [4, 8], e.t().flatten().tolist())]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], name="emb"),
             helper.make_node("MatMul", ["x", "H"], ["y"], name="head")]
    _save_onnx(d / "m.onnx", nodes, inits)
    return "m.onnx"


def _save_onnx(path: Path, nodes, inits, extra: bytes = b"") -> None:
    from onnx import TensorProto, helper  # noqa: PLC0415 - the [onnx] extra

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=inits)
    path.write_bytes(helper.make_model(graph).SerializeToString() + extra)


def onnx_many_uses(n: int) -> Writer:
    """One embedding read by n Gathers, its transposed copy by n MatMuls."""
    def write(d: Path) -> str:
        from onnx import TensorProto, helper  # noqa: PLC0415 - the [onnx] extra

        e = torch.arange(32, dtype=torch.float32).reshape(8, 4)
        inits = [helper.make_tensor("E", TensorProto.FLOAT, [8, 4], e.flatten().tolist()),
                 helper.make_tensor("H", TensorProto.FLOAT, [4, 8], e.t().flatten().tolist())]
        nodes = [helper.make_node("Gather", ["E", "ids"], [f"x{i}"], name=f"g{i}") for i in range(n)]
        nodes += [helper.make_node("MatMul", [f"x{i}", "H"], ["y" if i == 0 else f"h{i}"], name=f"m{i}")
                  for i in range(n)]
        _save_onnx(d / "m.onnx", nodes, inits)
        return "m.onnx"
    return write


def onnx_many_pairs(n: int) -> Writer:
    """n embeddings and n heads of one shape, all different: every pair a candidate."""
    def write(d: Path) -> str:
        from onnx import TensorProto, helper  # noqa: PLC0415 - the [onnx] extra

        inits, nodes = [], []
        for i in range(n):
            inits.append(helper.make_tensor(f"E{i}", TensorProto.FLOAT, [2, 2], [float(i), 0.0, 0.0, 1.0]))
            inits.append(helper.make_tensor(f"H{i}", TensorProto.FLOAT, [2, 2], [float(i), 1.0, 0.0, 1.0]))
            nodes.append(helper.make_node("Gather", [f"E{i}", "ids"], [f"x{i}"], name=f"g{i}"))
            nodes.append(helper.make_node("MatMul", [f"x{i}", f"H{i}"], ["y" if i == 0 else f"h{i}"], name=f"m{i}"))
        _save_onnx(d / "m.onnx", nodes, inits)
        return "m.onnx"
    return write


def onnx_many_initializers(n: int) -> Writer:
    """n one-element initializers: one serialized, repeated with new names (protobuf merges the
    repeated graph messages), so writing 200,000 takes a fraction of a second."""
    def write(d: Path) -> str:
        from onnx import TensorProto, helper  # noqa: PLC0415 - the [onnx] extra

        one = helper.make_tensor("w0000000", TensorProto.FLOAT, [1], [1.5]).SerializeToString()
        assert one.count(b"w0000000") == 1
        entries = [b"\x2a" + _varint(len(one)) + one.replace(b"w0000000", f"w{i:07d}".encode()) for i in range(1, n)]
        graph = b"".join(entries)  # GraphProto field 5: initializer
        _save_onnx(d / "m.onnx", [], [helper.make_tensor("w0000000", TensorProto.FLOAT, [1], [1.5])],
                   extra=b"\x3a" + _varint(len(graph)) + graph)  # ModelProto field 7: graph, merged
        return "m.onnx"
    return write


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def hf_folder(config: dict | None = None, extra: dict | None = None) -> Writer:
    def write(d: Path) -> str:
        folder = d / "model"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config or llama_config()))
        write_safetensors(folder / "model.safetensors", {**llama_tensors(), **(extra or {})})
        return "model"
    return write


def peft_adapter(config_bytes: bytes | None = None) -> Writer:
    def write(d: Path) -> str:
        folder = d / "adapter"
        folder.mkdir()
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
               "target_modules": ["q_proj"], "base_model_name_or_path": None}
        (folder / "adapter_config.json").write_bytes(config_bytes or json.dumps(cfg).encode())
        write_safetensors(folder / "adapter_model.safetensors",
                          {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
                           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2)})
        return "adapter"
    return write


def deep_json(depth: int) -> bytes:
    return b'{"peft_type": "LORA", "x": ' + b"[" * depth + b"]" * depth + b"}"


BENIGN: dict[str, Writer] = {
    "torch.save": torch_saved(tiny_state_dict),
    "legacy torch.save": torch_saved(tiny_state_dict, _use_new_zipfile_serialization=False),
    "DCP": dcp_benign,
    "GGUF": gguf_benign,
    "ONNX": onnx_inline,
    "Hugging Face": hf_folder(),
    "PEFT": peft_adapter(),
}

# (format, name, writer, expected): expected is a regular expression the one-line error must match,
# or a callable checking the JSON report of a run that must succeed.
Check = Callable[[dict], bool]


def _constant_group(report: dict) -> bool:
    return any(d["constant"] and sorted(d["names"]) == ["a", "b"] for d in report["untied_duplicates"])


def _note(text: str) -> Check:
    return lambda report: any(text in n for n in report["source"]["notes"])


def payloads() -> list[tuple[str, str, Writer, object]]:
    pb = 2 ** 62
    return [
        ("torch.save", "data.pkl storing memo entry 2**26", torch_zip(P2 + b"}r" + struct.pack("<I", 2 ** 26) + b"."),
         r"stores memo entry 67,108,864 where the next is 0"),
        ("torch.save", "data.pkl storing memo entry 2**30", torch_zip(P2 + b"}r" + struct.pack("<I", 2 ** 30) + b"."),
         r"stores memo entry 1,073,741,824"),
        ("torch.save", "a deflated data.pkl inflating to 64 MiB of empty lists", torch_zip(empty_lists(65536), deflate=True),
         r"declares 65,\d{3},\d{3} bytes|makes more objects than a pickle"),
        ("torch.save", "a stored data.pkl of 8 MiB of empty lists", torch_zip(empty_lists(8192)),
         r"makes more objects than a pickle of 8,\d{3},\d{3} bytes"),
        ("torch.save", "a dict that contains itself", torch_zip(P2 + b"}q\x00(" + _key("a") + b"h\x00u."),
         r"contains itself \(a cycle\)"),
        ("torch.save", "dicts nested 100,000 deep",
         torch_zip(P2 + (b"}(" + _key("a")) * 100_000 + b"}" + b"u" * 100_000 + b"."), r"nests more than 256 MARKs"),
        ("torch.save", "tuples nested 100,000 deep", torch_zip(_state_dict_pickle(b")" + b"\x85" * 100_000)),
         r"nests containers more than 100 deep"),
        ("torch.save", "a dict keyed by 10**5000 (LONG4)",
         torch_zip(P2 + b"}(\x8b" + struct.pack("<i", 2077) + (10 ** 5000).to_bytes(2077, "little", signed=True)
                   + _key("a") + b"u."), r"uses the opcode LONG4"),
        ("torch.save", "a dict keyed by 2**2000 (LONG1)",
         torch_zip(P2 + b"}(\x8a\xfb" + (2 ** 2000).to_bytes(251, "little", signed=True) + _key("a") + b"u."),
         r"uses a int as a dict key"),
        ("torch.save", "POP", torch_zip(P2 + b"}N0."), r"uses the opcode POP.*torch.load refuses it too"),
        ("torch.save", "DUP", torch_zip(P2 + b"}2."), r"uses the opcode DUP"),
        ("torch.save", "a protocol-4 torch.save file", torch_saved(tiny_state_dict, pickle_protocol=4),
         r"uses the opcode FRAME"),
        ("torch.save", "a (2**62, 4) tensor of stride 0", torch_zip(tensor_pickle((pb, 4), (0, 1))),
         r"numel overflow"),
        ("torch.save", "a dimension of 2**70", torch_zip(tensor_pickle((2 ** 70,), (1,))), r"out of range"),
        ("torch.save", "two storage records sharing bytes", overlapping_records, r"overlaps record"),
        ("torch.save", "expand(1, 2**27) twice", torch_saved(lambda: {"a": torch.zeros(1).expand(1, 2 ** 27),
                                                                      "b": torch.zeros(1).expand(1, 2 ** 27)}),
         _constant_group),
        ("torch.save", "expand(2**20, 2**20) twice", torch_saved(lambda: {"a": torch.zeros(1).expand(2 ** 20, 2 ** 20),
                                                                          "b": torch.zeros(1).expand(2 ** 20, 2 ** 20)}),
         _constant_group),
        ("torch.save", "complex32 records", torch_saved(lambda: {"a": torch.zeros(4, dtype=torch.complex32)}),
         _note("ComplexHalf")),
        ("legacy torch.save", "a legacy pickle of 8 MiB of empty lists", legacy(empty_lists(8192)),
         r"makes more objects than a pickle"),
        ("legacy torch.save", "a legacy pickle storing memo entry 2**26",
         legacy(P2 + b"}r" + struct.pack("<I", 2 ** 26) + b"."), r"stores memo entry 67,108,864"),
        ("DCP", ".metadata storing memo entry 2**26", dcp_metadata(P2 + b"}r" + struct.pack("<I", 2 ** 26) + b"."),
         r"stores memo entry 67,108,864"),
        ("DCP", ".metadata of 8 MiB of empty lists", dcp_metadata(empty_lists(8192)), r"makes more objects"),
        ("DCP", ".metadata ending with BUILD on the Metadata class", dcp_metadata(poisoned_metadata()),
         r"sets the state of 'torch.distributed.checkpoint.metadata.Metadata'"),
        ("DCP", "two stride-0 chunks of 2**27 elements", dcp_stride0_chunks, _note("described from the metadata")),
        ("GGUF", "a metadata array of 4M uint8", gguf_with_kv(gguf_uint8_array(4 << 20)),
         lambda report: report["gguf"]["architecture"] == "llama"),
        ("GGUF", "arrays of arrays 5,000 deep", gguf_with_kv(gguf_nested_arrays(5000)), r"nests arrays more than 4 deep"),
        ("ONNX", "1,500 Gathers and 1,500 MatMuls on one pair", onnx_many_uses(1500),
         lambda report: len(report["onnx"]["embedding_head"]) == 1024),
        ("ONNX", "1,500 embeddings and 1,500 heads of one shape", onnx_many_pairs(1500),
         lambda report: report["onnx"]["embedding_head"] == []),
        ("Hugging Face", "a tensor name of 1.7 MB",
         hf_folder(extra={"model.layers.0.mlp.experts." * 64000 + "w": torch.ones(2)}), r"is 1,728,001 characters long"),
        ("Hugging Face", 'architectures ["Trainer"]', hf_folder({**llama_config(), "architectures": ["Trainer"]}),
         lambda report: report["hf"]["architecture"]["class"] == "LlamaForCausalLM"),
        ("PEFT", "adapter_config.json nested 100,000 deep", peft_adapter(deep_json(100_000)), r"nested too deeply"),
    ]


class Table(str):
    """Expect a report in the default table format holding this text (the JSON of 200,000 tensor rows
    adds its own text, 51 MB, to what is measured)."""


# 200,000 equal initializers (one duplicate group of 200,000 names): the report lists 200,000 tensors,
# which costs what it costs in any format; TIECHECK_SLOW_TESTS=1 runs it.
SLOW = [("ONNX", "200,000 equal initializers", onnx_many_initializers(200_000),
         Table("200000 initializers (0 in external data)"))]
