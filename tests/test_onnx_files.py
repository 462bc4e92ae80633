"""ONNX models: ties kept or lost by each exporter, read without loading external data, and hostile files."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from click.testing import CliRunner

import tiecheck
from tiecheck.cli import main
from tiecheck.errors import TargetError
from tiecheck.loaders import detect

from support.cli import inspect_error
from support.models import TinyLM

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402 - after the importorskip that guards it

from tiecheck.loaders.formats import onnx_files  # noqa: E402 - needs onnx


def _export(model, path, *, dynamo: bool, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 4, dtype=torch.long),), str(path), dynamo=dynamo, **kw)
    return path


V, D = 256, 64  # above onnxscript's 8192-element constant-folding limit: the dynamo exporter keeps Transpose


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TinyLM(vocab=V, d=D)


@pytest.fixture(scope="module")
def torchscript_onnx(tmp_path_factory, tiny):
    return _export(tiny, tmp_path_factory.mktemp("ts") / "tiny.onnx", dynamo=False)


@pytest.fixture(scope="module")
def dynamo_onnx(tmp_path_factory, tiny):
    pytest.importorskip("onnxscript")
    path = tmp_path_factory.mktemp("dynamo") / "tiny.onnx"
    # external_data=True writes the weights to tiny.onnx.data beside the model
    return _export(tiny, path, dynamo=True, external_data=True, verbose=False)


def test_detected_by_content(torchscript_onnx, tmp_path):
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(torchscript_onnx.read_bytes())
    assert detect.sniff_file(renamed) == detect.ONNX
    assert tiecheck.analyze(str(renamed)).source.format == "ONNX"


def test_torchscript_exporter_loses_the_tie_as_a_transposed_copy(torchscript_onnx, tiny):
    r = tiecheck.analyze(str(torchscript_onnx))
    assert r.tie_groups == ()
    pairs = r.extra["onnx"]["embedding_head"]
    assert len(pairs) == 1
    p = pairs[0]
    assert (p["embedding"], p["embedding_nodes"], p["head_node"], p["head_op"], p["relation"], p["bytes_copied"]) \
        == ("embed.weight", ["/embed/Gather"], "/lm_head/MatMul", "MatMul", "transposed copy", V * D * 4)
    assert p["head"].startswith("onnx::MatMul")
    tc005 = [f for f in r.findings if f.code == "TC005"]
    assert [sorted(f.names) for f in tc005] == [sorted(["embed.weight", p["head"]])]
    assert f"{V * D * 4:,} bytes wasted" in tc005[0].message
    assert "MatMul /lm_head/MatMul" in tc005[0].message
    # the stored transpose is exactly the embedding's transpose
    stored = {t.name: t for t in r.tensors}
    assert stored[p["head"]].shape == (D, V)
    assert stored["embed.weight"].shape == (V, D)
    assert any("a transposed copy of it: the tie was lost in the export" in n for n in r.source.notes)


def test_dynamo_exporter_keeps_one_initializer(dynamo_onnx):
    assert (dynamo_onnx.parent / "tiny.onnx.data").is_file()
    r = tiecheck.analyze(str(dynamo_onnx))
    assert len(r.tie_groups) == 1
    g = r.tie_groups[0]
    (pair,) = r.extra["onnx"]["embedding_head"]
    assert pair["relation"] == "one tensor"
    assert pair["head_op"] == "MatMul"
    assert any(v.startswith("Transpose ") for v in pair["via"])
    assert sorted(g.names) == sorted([pair["embedding"], pair["alias"]])
    assert g.kind == "transposed_alias"
    assert g.bytes_saved == V * D * 4
    assert r.extra["onnx"]["external_files"] == ["tiny.onnx.data"]
    assert not [f for f in r.findings if f.code == "TC005"]


def test_external_initializers_are_views_of_the_data_file(dynamo_onnx):
    sub = onnx_files.load_onnx(dynamo_onnx)
    data = str(dynamo_onnx.parent / "tiny.onnx.data")
    mapped = [n for n, s in sub.file_spans.items() if s.path == data]
    assert mapped
    assert all(not sub.tensors[n].untyped_storage().resizable() for n in mapped)
    # the bytes read through the mapping are the file's
    name = mapped[0]
    t = sub.tensors[name]
    off = sub.file_spans[name].offset + t.storage_offset() * t.element_size()
    with open(data, "rb") as fh:
        fh.seek(off)
        raw = fh.read(t.numel() * t.element_size())
    assert raw == t.contiguous().numpy().tobytes()


@pytest.mark.skipif(not os.environ.get("TIECHECK_SLOW_TESTS"),
                    reason="exports GPT-2 with the dynamo exporter (~30 s); set TIECHECK_SLOW_TESTS=1")
def test_gpt2_dynamo_export_keeps_the_tie(tmp_path):
    # transformers 5's GPT-2 does not export with the TorchScript exporter (aten::diff in its mask code).
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("onnxscript")
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=1, n_head=2, n_positions=16,
                                  tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, use_cache=False)
    torch.manual_seed(0)

    class Logits(torch.nn.Module):  # the export's output: logits only
        def __init__(self):
            super().__init__()
            self.gpt2 = transformers.GPT2LMHeadModel(cfg)

        def forward(self, idx):
            return self.gpt2(idx).logits

    path = _export(Logits(), tmp_path / "gpt2.onnx", dynamo=True, external_data=True, verbose=False)
    r = tiecheck.analyze(str(path))
    (pair,) = r.extra["onnx"]["embedding_head"]
    assert (pair["embedding"], pair["relation"], pair["head_node"]) == ("gpt2.lm_head.weight", "one tensor",
                                                                        "node_linear")
    assert [sorted(g.names) for g in r.tie_groups] == [["gpt2.lm_head.weight", "node_linear:B"]]


def test_flops_say_pytorch_only(torchscript_onnx):
    r = tiecheck.analyze(str(torchscript_onnx), flops=True)
    assert r.flops.available is False
    assert "PyTorch modules only" in r.flops.reason


# -- hostile files ----------------------------------------------------------------------------

def _model_with_external(tmp_path, location: str, *, offset: int = 0, length: int | None = None,
                         dims=(4, 2), data: bytes = b"\0" * 32):
    (tmp_path / "w.data").write_bytes(data)
    t = TensorProto()
    t.name, t.data_type = "w", TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length if length is not None
                                                                                  else len(data)))):
        e = t.external_data.add()
        e.key, e.value = k, v
    node = helper.make_node("Gather", ["w", "x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], initializer=[t])
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../w.data", "sub/../../w.data", "/etc/passwd"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    path = _model_with_external(tmp_path, location)
    assert "lies outside the model's folder; refusing to read it" in inspect_error(path)


def test_valid_external_data_reads(tmp_path):
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    r = tiecheck.analyze(str(_model_with_external(tmp_path, "w.data", data=data)))
    assert [t.name for t in r.tensors] == ["w"]
    assert list(r.tensors[0].shape) == [4, 2]


def test_truncated_external_data(tmp_path):
    path = _model_with_external(tmp_path, "w.data", length=32, data=b"\0" * 32)
    (tmp_path / "w.data").write_bytes(b"\0" * 20)
    assert "the data file is truncated" in inspect_error(path)


def test_external_length_disagrees_with_dims(tmp_path):
    assert "needs 32 bytes but its external data says" in inspect_error(_model_with_external(tmp_path, "w.data",
                                                                                    length=16))


def test_dims_that_overflow(tmp_path):
    path = _model_with_external(tmp_path, "w.data", dims=(1 << 40, 1 << 40))
    assert "more bytes than any file can hold" in inspect_error(path)


def test_truncated_protobuf(torchscript_onnx, tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(torchscript_onnx.read_bytes()[:5000])
    msg = inspect_error(cut)
    assert "not a valid ONNX model" in msg
    assert "truncated or corrupt" in msg


def test_protobuf_size_is_bounded(tmp_path, monkeypatch):
    path = _model_with_external(tmp_path, "w.data")
    monkeypatch.setattr(onnx_files, "MAX_PROTO", 16)
    with pytest.raises(TargetError, match="exceeds protobuf's 2 GiB limit"):
        onnx_files.load_onnx(path)
    assert os.path.getsize(path) > 16


# -- tiecheck diff across formats: matched by content -----------------------------------------

@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("pt") / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    return path


def test_diff_torchscript_export_shows_the_tie_became_copies(tiny_pt, torchscript_onnx):
    d = tiecheck.diff(str(tiny_pt), str(torchscript_onnx))
    assert d.matching == "content"
    assert d.exit_code == 1
    assert d.kept == ()
    assert d.b_only == ()
    (g,) = d.lost
    assert list(g.names) == ["embed.weight", "lm_head.weight"]
    assert g.broken_into_duplicates
    assert g.bytes_copied == V * D * 4
    assert sorted((x.names[0].split("::")[0], x.method) for x in g.in_b) == \
        [("embed.weight", "exact bytes"), ("onnx", "transpose")]
    rows = {m.a: [b.method for b in m.b] for m in d.matches}
    assert rows[("block.bias",)] == ["exact bytes"]
    assert rows[("block.weight",)] == ["transpose"]
    from_cli = CliRunner().invoke(main, ["diff", str(tiny_pt), str(torchscript_onnx)])
    assert from_cli.exit_code == 1
    assert f"became 2 copies (+{V * D * 4:,} bytes)" in from_cli.output
    assert "embed.weight    256×64 float32  embed.weight [256×64 float32]" in from_cli.output


def test_diff_dynamo_export_keeps_the_tie(tiny_pt, dynamo_onnx):
    d = tiecheck.diff(str(tiny_pt), str(dynamo_onnx))
    assert d.exit_code == 0
    assert d.lost == ()
    (g,) = d.kept
    assert list(g.names) == ["embed.weight", "lm_head.weight"]
    assert g.tied_in_b
    (b,) = g.in_b
    assert b.method == "exact bytes"
    assert "lm_head.weight" in b.names
    assert "node_linear_1:B" in b.names


@pytest.mark.parametrize("changed", [False, True])
def test_transposed_copy_in_external_data_is_compared_with_pread(tmp_path, changed):
    e = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    h = e.t().contiguous()
    if changed:
        h[3, 5] += 1
    (tmp_path / "w.data").write_bytes(e.numpy().tobytes() + h.numpy().tobytes())
    inits = []
    for name, t, off in (("E", e, 0), ("H", h, 128)):
        init = TensorProto()
        init.name, init.data_type, init.data_location = name, TensorProto.FLOAT, TensorProto.EXTERNAL
        init.dims.extend(t.shape)
        for k, v in (("location", "w.data"), ("offset", str(off)), ("length", "128")):
            x = init.external_data.add()
            x.key, x.value = k, v
        inits.append(init)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], name="emb"),
             helper.make_node("MatMul", ["x", "H"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=inits)
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    sub = onnx_files.load_onnx(path)
    assert set(sub.file_spans) == {"E", "H"}
    pairs = sub.extra["onnx"]["embedding_head"]
    assert pairs == ([] if changed else [{"embedding": "E", "embedding_nodes": ["emb"], "head": "H",
                                           "head_node": "head", "head_op": "MatMul", "via": [], "shape": [8, 4],
                                           "dtype": "float32", "relation": "transposed copy", "bytes_copied": 128}])


@pytest.mark.parametrize("location", [".", "sub"])
def test_external_data_that_is_a_folder_is_one_line(tmp_path, location):
    (tmp_path / "sub").mkdir()
    path = _model_with_external(tmp_path, location)
    assert "is not a regular file" in inspect_error(path)
    with pytest.raises(tiecheck.TiecheckError, match="is not a regular file"):
        tiecheck.analyze(str(path))
