"""The safetensors files fix writes: the header padded as the format asks, and the data placed so that\nthe kernel copies each tensor page by page."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tiecheck.loaders.hf_config_edits import set_path
from tiecheck.repair import fix
from tiecheck.repair.write import PAGE, aligned_data_start, header_bytes

from support.checkpoints import llama_config, llama_tensors, sharded_head_copy, write_safetensors, write_sharded

ENTRIES = [("w", "F32", (3,), 0, 12)]


def _json(head: bytes) -> dict:
    n = int.from_bytes(head[:8], "little")
    assert n == len(head) - 8
    return json.loads(head[8:])


def _header(path) -> bytes:
    raw = path.read_bytes()
    return raw[8:8 + int.from_bytes(raw[:8], "little")]


def _file_offsets(path) -> dict[str, int]:
    """Each tensor's first byte in the file: 8 + the header's length + its data offset."""
    head = _header(path)
    return {k: 8 + len(head) + v["data_offsets"][0] for k, v in json.loads(head).items() if k != "__metadata__"}


def test_the_header_is_padded_with_spaces_to_8_bytes():
    head = header_bytes(ENTRIES, {})
    assert len(head) % 8 == 0
    assert head.endswith(b" ")
    assert _json(head) == {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}


@pytest.mark.parametrize("mod_page", [0, 8, 1024, PAGE - 8])
def test_the_data_starts_where_asked_within_a_page(mod_page):
    """The kernel copies page by page only when source and copy sit at the same offset in a page."""
    head = header_bytes(ENTRIES, {"format": "pt"}, mod_page)
    assert len(head) % PAGE == mod_page
    assert _json(head)["__metadata__"] == {"format": "pt"}


@pytest.mark.parametrize(("copies", "start"), [
    ([(PAGE + 8, 0, 100)], 8),  # one range: its source's offset within a page
    ([(PAGE + 12, 0, 100)], 0),  # not a multiple of 8: tensors must stay 8-byte aligned, so the default
    ([(16, 0, 10), (48, 8, 20)], 40),  # the offset that keeps the most bytes aligned
    ([(16, 0, 10), (48, 0, 10)], 16),  # a tie: the smaller offset
    ([(8, 16, 4)], PAGE - 8),  # a range earlier in its source than in the copy
    ([], 0),
])
def test_the_data_start_keeps_the_most_copied_bytes_at_their_offset_within_a_page(copies, start):
    assert aligned_data_start(copies) == start


def test_a_fixed_file_keeps_its_tensors_offsets_within_a_page(tmp_path):
    """Page-aligned copies are the fast path of os.copy_file_range: the copy's tensors sit at the
    source's offset within a page, whatever the header's length."""
    torch.manual_seed(0)
    emb = torch.randn(64, 16)
    tensors = {"tok_emb.weight": emb, "head.weight": emb.clone(), "ln.weight": torch.ones(16)}
    src = write_safetensors(tmp_path / "in.safetensors", tensors, metadata={"note": "x" * 300})
    out = tmp_path / "out.safetensors"
    assert fix(src, out).verified
    src_at, out_at = _file_offsets(src), _file_offsets(out)
    assert set(out_at) == {"tok_emb.weight", "ln.weight"}
    for name, at in out_at.items():
        assert at % PAGE == src_at[name] % PAGE, name
    # The JSON itself changed length (the head dropped, an alias added, no spaces): padding made up the difference.
    assert len(_header(out).rstrip()) != len(_header(src).rstrip())


def test_a_fixed_file_starts_every_tensor_at_a_multiple_of_its_element_size(tmp_path):
    """Dropping a 6-byte half-precision tensor would leave the float32 after it at byte 6: the
    writer orders by element size, largest first, as safetensors does."""
    half = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)
    tensors = {"a": half, "b": half.clone(), "w": torch.tensor([4.0, 5.0])}
    src = write_safetensors(tmp_path / "in.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    assert fix(src, out, tie=["b=a"]).verified
    entries = {k: v for k, v in json.loads(_header(out)).items() if k != "__metadata__"}
    size = {"F16": 2, "F32": 4}
    assert {k: v["data_offsets"][0] % size[v["dtype"]] for k, v in entries.items()} == {"a": 0, "w": 0}
    assert entries["w"]["data_offsets"][0] == 0
    assert torch.equal(load_file(out)["w"], tensors["w"])


def test_untie_in_a_sharded_folder_names_the_new_copy_in_the_index(tmp_path):
    """A tied Llama folder in two shards stores no lm_head; --untie writes one beside the embedding,
    and the new index must say which shard holds it, or transformers would not load it from there."""
    folder = tmp_path / "in"
    index = write_sharded(folder, llama_tensors())
    (folder / "config.json").write_text(json.dumps(llama_config()))
    embed_shard = json.loads(index.read_text())["weight_map"]["model.embed_tokens.weight"]
    out = tmp_path / "out"
    assert fix(folder, out, untie=["lm_head.weight,model.embed_tokens.weight"]).verified
    weight_map = json.loads((out / index.name).read_text())["weight_map"]
    assert weight_map["lm_head.weight"] == embed_shard
    assert torch.equal(load_file(out / embed_shard)["lm_head.weight"], llama_tensors()["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_dotted_config_key_is_set_inside_its_sub_config():
    """A Llava folder may declare its tie only as text_config.tie_word_embeddings (see
    test_declared.py): fix must rewrite that key, not add a top-level one beside it."""
    cfg = {"text_config": {"tie_word_embeddings": True, "vocab_size": 16}, "model_type": "llava"}
    set_path(cfg, "text_config.tie_word_embeddings", False)
    set_path(cfg, "vision_config.hidden_size", 8)
    assert cfg == {"text_config": {"tie_word_embeddings": False, "vocab_size": 16}, "model_type": "llava",
                   "vision_config": {"hidden_size": 8}}


def test_untie_in_a_torch_save_file_saves_each_name_its_own_storage(tmp_path):
    emb = torch.arange(32.0).view(8, 4)
    src = tmp_path / "in.pt"
    torch.save({"emb.weight": emb, "head.weight": emb, "ln.weight": torch.ones(4)}, src)
    out = tmp_path / "out.pt"
    result = fix(src, out, untie=["head.weight,emb.weight"])
    assert result.verified, [(c.name, c.detail) for c in result.checks]
    loaded = torch.load(out, weights_only=True)
    assert loaded["head.weight"].untyped_storage().data_ptr() != loaded["emb.weight"].untyped_storage().data_ptr()
    assert torch.equal(loaded["head.weight"], emb)
    assert torch.equal(loaded["emb.weight"], emb)


def test_a_name_inside_a_nested_mapping_of_a_torch_save_file_is_retied_there(tmp_path):
    """The loader flattens nested mappings to dotted names (head.weight below); the writer must
    find the tensor it names inside them."""
    emb = torch.arange(32.0).view(8, 4)
    src = tmp_path / "in.pt"
    torch.save({"emb.weight": emb, "head": {"weight": emb.clone()}, "ln.weight": torch.ones(4)}, src)
    out = tmp_path / "out.pt"
    assert fix(src, out, tie=["head.weight=emb.weight"]).verified
    loaded = torch.load(out, weights_only=True)
    assert loaded["head"]["weight"].data_ptr() == loaded["emb.weight"].data_ptr()


def test_a_sharded_copy_keeps_the_index_metadata_and_counts_its_own_size(tmp_path):
    index = sharded_head_copy(tmp_path / "in", rows=8, shards=2)
    raw = json.loads(index.read_text())
    raw["metadata"] = {"total_size": 0, "format": "pt"}
    index.write_text(json.dumps(raw))
    out = tmp_path / "out"
    assert fix(index, out).verified
    meta = json.loads((out / index.name).read_text())["metadata"]
    assert meta == {"total_size": 5 * 8 * 8 * 4, "format": "pt"}  # five 8x8 float32 tensors: a bare index ties none
