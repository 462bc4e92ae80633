"""The ONNX graph read for its ties (``loaders/onnx_graph.py``): which Gather reads an embedding, which
MatMul/Gemm reads a head, through which Transpose/Identity chain, and which head holds a copy of an
embedding. Graphs are built with ``onnx.helper`` and checked by ``onnx.checker``; where the claim is
about what a graph computes, onnx's own ``ReferenceEvaluator`` runs it."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402 - after the importorskip that guards it
from onnx.reference import ReferenceEvaluator  # noqa: E402

import tiecheck  # noqa: E402
from tiecheck.errors import TargetError  # noqa: E402
from tiecheck.loaders import onnx_graph  # noqa: E402
from tiecheck.loaders.formats.onnx_files import load_onnx  # noqa: E402

V, D = 8, 4
IDS = helper.make_tensor_value_info("ids", TensorProto.INT64, [1])


def table(shape=(V, D), seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def gather(data: str, out: str = "x", name: str = "emb", **attrs):
    return helper.make_node("Gather", [data, "ids"], [out], name=name, **attrs)


def build(inits: dict[str, np.ndarray], nodes, outputs=("y",), *, check: bool = True) -> onnx.ModelProto:
    """A model of ``nodes`` over ``inits``; ``onnx.checker`` vouches for it unless ``check`` is off."""
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["rows", "cols"]) for o in outputs]
    graph = helper.make_graph(nodes, "g", [IDS], outs,
                              initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if check:
        onnx.checker.check_model(model)
    return model


def save(tmp_path, model, *, external: bool = False):
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=external, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    return path


def load(tmp_path, inits, nodes, outputs=("y",), *, external: bool = False, check: bool = True):
    return load_onnx(save(tmp_path, build(inits, nodes, outputs, check=check), external=external))


def pairs_of(sub) -> list[tuple]:
    return [(p["embedding"], p["head"], p["head_node"], p["head_op"], p["relation"], p["via"])
            for p in sub.extra["onnx"]["embedding_head"]]


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- how a head reads an initializer ------------------------------------------------------------

@pytest.mark.parametrize("external", [False, True])
def test_gemm_trans_b_over_a_plain_copy_is_a_copy(tmp_path, external):
    """nn.Linear exported as Gemm(transB=1) over a copy of the embedding: the copy is equal-shaped."""
    e = table()
    nodes = [gather("E"), helper.make_node("Gemm", ["x", "H"], ["y"], name="head", transB=1),
             # read again through a Transpose: transB undoes it, so this use reads H as stored (no copy's use)
             helper.make_node("Transpose", ["H"], ["Ht"], name="t"),
             helper.make_node("Gemm", ["y", "Ht"], ["z"], name="back", transB=1)]
    model = build({"E": e, "H": e.copy()}, nodes, ("y", "z"))
    ids = np.array([3], dtype=np.int64)
    y, z = ReferenceEvaluator(model).run(None, {"ids": ids})
    np.testing.assert_allclose(y, e[ids] @ e.T, rtol=1e-6)  # the head's logits are the tied ones
    np.testing.assert_allclose(z, y @ e, rtol=1e-6)
    before = fds()
    sub = load_onnx(save(tmp_path, model, external=external))
    assert fds() == before  # every data file opened for the comparison is closed again
    assert pairs_of(sub) == [("E", "H", "head", "Gemm", "copy", [])]
    assert sub.extra["onnx"]["embedding_head"][0]["bytes_copied"] == V * D * 4
    assert not sub.loader_findings  # an equal-shaped copy is the content pass's finding, not the graph's
    assert any("the head Gemm head reads H [8, 4], a copy of it: the tie was lost in the export (128 bytes stored "
               "twice)" in n for n in sub.source.notes)
    report = tiecheck.analyze(str(sub.source.target))
    assert [sorted(f.names) for f in report.findings if f.code == "TC005"] == [["E", "H"]]


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("attrs", [{}, {"perm": [1, 0]}])
def test_transpose_with_the_default_or_swapping_perm_is_followed(tmp_path, attrs, external):
    e = table()
    nodes = [gather("E"), helper.make_node("Transpose", ["E"], ["Et"], name="t", **attrs),
             helper.make_node("MatMul", ["x", "Et"], ["y"], name="head")]
    model = build({"E": e}, nodes)
    (y,) = ReferenceEvaluator(model).run(None, {"ids": np.array([5], dtype=np.int64)})
    np.testing.assert_allclose(y, e[[5]] @ e.T, rtol=1e-6)
    path = save(tmp_path, model, external=external)
    sub = load_onnx(path)
    assert pairs_of(sub) == [("E", "E", "head", "MatMul", "one tensor", ["Transpose t"])]
    assert sub.extra["onnx"]["embedding_head"][0]["bytes_copied"] == 0  # one initializer: nothing stored twice
    assert sub.extra["onnx"]["aliases"] == ["head:B"]
    # the alias is read where the embedding is: from its data file when it has one
    assert sub.file_spans.get("head:B") == sub.file_spans.get("E") == (sub.file_spans["E"] if external else None)
    assert tuple(sub.tensors["head:B"].shape) == (D, V)
    assert torch.equal(sub.tensors["head:B"], sub.tensors["E"].t())
    (group,) = tiecheck.analyze(str(path)).tie_groups
    assert group.kind == "transposed_alias"


def test_two_transposes_read_the_embedding_as_stored(tmp_path):
    e = table((D, D))
    nodes = [gather("E"), helper.make_node("Transpose", ["E"], ["a"], name="t1"),
             helper.make_node("Identity", ["a"], ["b"], name="i"),
             helper.make_node("Transpose", ["b"], ["c"], name="t2"), helper.make_node("MatMul", ["x", "c"], ["y"])]
    sub = load(tmp_path, {"E": e}, nodes)
    (p,) = sub.extra["onnx"]["embedding_head"]
    assert p["via"] == ["Transpose t2", "Identity i", "Transpose t1"]
    assert p["alias"] == "MatMul#4:B"  # an unnamed node is named by its op and index
    assert torch.equal(sub.tensors["MatMul#4:B"], sub.tensors["E"])
    assert any("(the head's use is listed as MatMul#4:B)" in n for n in sub.source.notes)


def test_a_transpose_that_keeps_the_axes_is_not_followed(tmp_path):
    e = table((D, D))
    nodes = [gather("E"), helper.make_node("Transpose", ["E"], ["a"], perm=[0, 1]),
             helper.make_node("MatMul", ["x", "a"], ["y"])]
    assert pairs_of(load(tmp_path, {"E": e}, nodes)) == []


@pytest.mark.parametrize(("chain", "found"), [(6, True), (7, False)])
def test_chains_are_followed_seven_nodes_deep(tmp_path, chain, found):
    """Identities then a Transpose: seven nodes between the head and the initializer are followed, eight not."""
    e = table()
    names = ["E", *[f"i{k}" for k in range(chain)]]
    nodes = [gather("E"), *[helper.make_node("Identity", [a], [b], name=b) for a, b in itertools.pairwise(names)],
             helper.make_node("Transpose", [names[-1]], ["t"], name="t"), helper.make_node("MatMul", ["x", "t"], ["y"])]
    sub = load(tmp_path, {"E": e}, nodes)
    assert [p[4] for p in pairs_of(sub)] == (["one tensor"] if found else [])


# -- which Gather is an embedding ---------------------------------------------------------------

@pytest.mark.parametrize(("node", "is_embedding"), [
    (helper.make_node("Gather", ["E", "ids"], ["x"], axis=0), True),
    (helper.make_node("Gather", ["E", "ids"], ["x"], axis=1), False),  # gathers columns: not a lookup
])
def test_only_a_gather_along_axis_0_is_an_embedding(tmp_path, node, is_embedding):
    e = table((D, D))
    sub = load(tmp_path, {"E": e}, [node, helper.make_node("MatMul", ["x", "E"], ["y"], name="head")])
    assert [p[4] for p in pairs_of(sub)] == (["one tensor"] if is_embedding else [])


def test_a_gather_of_the_transpose_is_no_embedding(tmp_path):
    e = table((D, D))
    nodes = [helper.make_node("Transpose", ["E"], ["Et"]), gather("Et"), helper.make_node("MatMul", ["x", "E"], ["y"])]
    assert pairs_of(load(tmp_path, {"E": e}, nodes)) == []


def test_a_one_dimensional_initializer_is_no_embedding(tmp_path):
    b = np.arange(V, dtype=np.float32)
    sub = load(tmp_path, {"b": b, "W": table((1, V))},
               [gather("b"), helper.make_node("Reshape", ["x", "shape"], ["r"]),
                helper.make_node("MatMul", ["W", "b"], ["y"])], check=False)
    assert pairs_of(sub) == []


def test_nodes_without_the_inputs_they_need_are_skipped(tmp_path):
    """A hostile graph: nodes with no data input are ignored, never an IndexError."""
    e = table()
    nodes = [helper.make_node("Gather", [], ["x"]), helper.make_node("Identity", [], ["i"]),
             helper.make_node("MatMul", ["E"], ["m"]), helper.make_node("Gemm", ["x", "i"], ["y"]),
             gather("E", "x2"), helper.make_node("MatMul", ["x2", "i"], ["z"])]
    sub = load(tmp_path, {"E": e}, nodes, ("y", "m", "z"), check=False)
    assert pairs_of(sub) == []


# -- which embedding a head copies ----------------------------------------------------------------

def test_the_copy_is_matched_to_the_embedding_it_copies(tmp_path):
    """Two embeddings of one shape: the head copies the second; the first shares its shape only."""
    e1, e2 = table(seed=1), table(seed=2)
    nodes = [gather("E1", "x1", "emb1"), gather("E2", "x2", "emb2"), helper.make_node("MatMul", ["x1", "H"], ["y"])]
    sub = load(tmp_path, {"E1": e1, "E2": e2, "H": e2.T.copy()}, nodes)
    assert [(p[0], p[4]) for p in pairs_of(sub)] == [("E2", "transposed copy")]


def test_equal_embeddings_give_the_first_in_graph_order(tmp_path):
    e = table()
    nodes = [gather("E2", "x2", "emb2"), gather("E1", "x1", "emb1"), helper.make_node("MatMul", ["x1", "H"], ["y"])]
    sub = load(tmp_path, {"E1": e, "E2": e.copy(), "H": e.T.copy()}, nodes)
    assert [(p[0], p[4]) for p in pairs_of(sub)] == [("E2", "transposed copy")]
    assert sub.extra["onnx"]["embedding_head"][0]["embedding_nodes"] == ["emb2"]  # E2's Gathers, not E1's


def test_a_symmetric_embedding_read_by_its_head_is_one_tensor_not_a_copy_of_itself(tmp_path):
    e = table((D, D))
    e = e + e.T
    sub = load(tmp_path, {"E": e}, [gather("E"), helper.make_node("MatMul", ["x", "E"], ["y"], name="head")])
    assert pairs_of(sub) == [("E", "E", "head", "MatMul", "one tensor", [])]
    assert sub.loader_findings == []


def test_a_symmetric_copy_read_transposed_is_reported_once_as_a_transposed_copy(tmp_path):
    e = table((D, D))
    e = e + e.T
    nodes = [gather("E"), helper.make_node("Gemm", ["x", "H"], ["y"], name="head", transB=1)]
    sub = load(tmp_path, {"E": e, "H": e.copy()}, nodes)
    assert [p[4] for p in pairs_of(sub)] == ["transposed copy"]


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("changed", [None, 0, V - 1])
@pytest.mark.parametrize("relation", ["copy", "transposed copy"])
def test_copies_are_compared_block_by_block(tmp_path, monkeypatch, external, changed, relation):
    """Blocks of one row or one column (``BLOCK_BYTES`` lowered): every block is compared, the last too."""
    monkeypatch.setattr(onnx_graph, "BLOCK_BYTES", 1)
    e = table()
    h = e.copy()
    if changed is not None:
        h[changed, D - 1] += 1
    if relation == "transposed copy":
        h, head = h.T.copy(), helper.make_node("MatMul", ["x", "H"], ["y"], name="head")
    else:
        head = helper.make_node("Gemm", ["x", "H"], ["y"], name="head", transB=1)
    sub = load(tmp_path, {"E": e, "H": h}, [gather("E"), head], external=external)
    assert set(sub.file_spans) == ({"E", "H"} if external else set())
    assert [p[4] for p in pairs_of(sub)] == ([] if changed is not None else [relation])


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("shape", [(1, D), (V, 1)])
def test_a_table_of_one_row_or_one_column_is_compared(tmp_path, shape, external):
    """The head last in the data file: a read one element too wide would run past its end."""
    e = table(shape)
    nodes = [gather("E"), helper.make_node("MatMul", ["x", "H"], ["y"])]
    sub = load(tmp_path, {"E": e, "H": e.T.copy()}, nodes, external=external)
    assert [p[4] for p in pairs_of(sub)] == ["transposed copy"]


def test_only_the_bytes_of_the_same_type_are_a_copy(tmp_path):
    e = table()
    nodes = [gather("E"), helper.make_node("MatMul", ["x", "H"], ["y"])]
    sub = load(tmp_path, {"E": e, "H": e.T.copy().view(np.int32)}, nodes, check=False)
    assert pairs_of(sub) == []


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int8, np.complex128])
@pytest.mark.parametrize("external", [False, True])
def test_every_element_size_is_compared(tmp_path, dtype, external):
    """Elements of 1, 2, 8 and 16 bytes (complex128, the widest type an initializer holds)."""
    e = (np.arange(V * D).reshape(V, D) * (1 + 1j if dtype is np.complex128 else 1)).astype(dtype)
    h = e.T.copy()
    nodes = [gather("E"), helper.make_node("MatMul", ["x", "H"], ["y"])]
    assert [p[4] for p in pairs_of(load(tmp_path, {"E": e, "H": h}, nodes, external=external, check=False))] \
        == ["transposed copy"]
    h[D - 1, V - 1] += 1
    assert pairs_of(load(tmp_path, {"E": e, "H": h}, nodes, external=external, check=False)) == []


def test_empty_initializers_are_no_copies(tmp_path):
    """A (0, 4) table and its (4, 0) transpose hold no bytes: nothing is stored twice, so nothing to warn of."""
    e = np.zeros((0, D), dtype=np.float32)
    sub = load(tmp_path, {"E": e, "H": e.T.copy()}, [gather("E"), helper.make_node("MatMul", ["x", "H"], ["y"])])
    assert pairs_of(sub) == []
    assert sub.loader_findings == []


def test_a_data_file_cut_after_loading_is_a_short_read(tmp_path):
    e = table()
    sub = load(tmp_path, {"E": e, "H": e.copy()}, [gather("E")], ("x",), external=True)
    (tmp_path / "m.data").write_bytes((tmp_path / "m.data").read_bytes()[:V * D * 4 + 8])
    reader = onnx_graph._Reader(sub.tensors, dict(sub.file_spans))
    try:
        assert reader.rows("E", 0, V).shape == (V, D)
        with pytest.raises(TargetError, match="short read: the file changed or is truncated"):
            reader.rows("H", 0, V)
        with pytest.raises(TargetError, match="short read: the file changed or is truncated"):
            reader.columns("H", 0, 1)
    finally:
        reader.close()


# -- how much is listed -------------------------------------------------------------------------

@pytest.mark.parametrize("readers", [16, 17])
def test_readers_are_named_up_to_sixteen(tmp_path, readers):
    e = table()
    nodes = [*[gather("E", f"x{k}", f"g{k}") for k in range(readers)],
             helper.make_node("Transpose", ["E"], ["Et"], name="t"), helper.make_node("MatMul", ["x0", "Et"], ["y"])]
    sub = load(tmp_path, {"E": e}, nodes)
    (p,) = sub.extra["onnx"]["embedding_head"]
    assert p["embedding_nodes"] == [f"g{k}" for k in range(16)]
    (note,) = [n for n in sub.source.notes if "(embedding) and by" in n]
    assert ("Gather g15 and 1 more (embedding)" in note) == (readers == 17)
    assert ("Gather g15 (embedding)" in note) == (readers == 16)


@pytest.mark.parametrize(("heads", "listed", "note"), [(2, 2, True), (3, 2, True), (1, 1, False)])
def test_pairs_are_listed_up_to_max_pairs(tmp_path, monkeypatch, heads, listed, note):
    monkeypatch.setattr(onnx_graph, "MAX_PAIRS", 2)
    e = table()
    nodes = [gather("E"), helper.make_node("Transpose", ["E"], ["Et"], name="t"),
             *[helper.make_node("MatMul", ["x", "Et"], [f"y{k}"], name=f"h{k}") for k in range(heads)]]
    sub = load(tmp_path, {"E": e}, nodes, tuple(f"y{k}" for k in range(heads)))
    assert len(sub.extra["onnx"]["embedding_head"]) == listed
    assert ("the graph's embedding/head pairs are listed up to 2" in sub.source.notes) == note


def test_at_most_1024_pairs_are_listed(tmp_path):
    """docs/schema.md's bound: 1,025 heads reading one embedding give 1,024 pairs and the note."""
    nodes = [gather("E"), helper.make_node("Transpose", ["E"], ["Et"], name="t"),
             *[helper.make_node("MatMul", ["x", "Et"], [f"y{k}"], name=f"h{k}") for k in range(1025)]]
    sub = load(tmp_path, {"E": table()}, nodes, ("y0",), check=False)
    assert len(sub.extra["onnx"]["embedding_head"]) == 1024
    assert "the graph's embedding/head pairs are listed up to 1,024" in sub.source.notes


def test_a_gemm_without_trans_b_reads_b_as_stored(tmp_path):
    """Gemm's transB defaults to 0: a Transpose before it is the one transpose, and H a plain copy read transposed."""
    e = table()
    nodes = [gather("E"), helper.make_node("Transpose", ["H"], ["Ht"], name="t"),
             helper.make_node("Gemm", ["x", "Ht"], ["y"], name="head")]
    model = build({"E": e, "H": e.copy()}, nodes)
    (y,) = ReferenceEvaluator(model).run(None, {"ids": np.array([2], dtype=np.int64)})
    np.testing.assert_allclose(y, e[[2]] @ e.T, rtol=1e-6)
    assert pairs_of(load_onnx(save(tmp_path, model))) == [("E", "H", "head", "Gemm", "copy", ["Transpose t"])]


def test_a_copy_read_through_two_transposes_is_no_head_of_that_embedding(tmp_path):
    """Transpose then Gemm(transB=1) reads H as stored: x @ H, not x @ E.T, so H is no copy of the head."""
    e = table((D, D))
    nodes = [gather("E"), helper.make_node("Transpose", ["H"], ["Ht"]),
             helper.make_node("Gemm", ["x", "Ht"], ["y"], name="head", transB=1)]
    sub = load(tmp_path, {"E": e, "H": e.copy()}, nodes)
    assert pairs_of(sub) == []
    assert not [n for n in sub.source.notes if "a copy of it" in n]


def test_four_transposes_read_the_embedding_as_stored(tmp_path):
    e = table()
    names = ["E", "a", "b", "c", "d"]
    nodes = [gather("E"), *[helper.make_node("Transpose", [p], [n]) for p, n in itertools.pairwise(names)],
             helper.make_node("MatMul", ["x", "d"], ["y"], name="head")]
    sub = load(tmp_path, {"E": e}, nodes, check=False)
    assert [p[4] for p in pairs_of(sub)] == ["one tensor"]
    assert torch.equal(sub.tensors["head:B"], sub.tensors["E"])
