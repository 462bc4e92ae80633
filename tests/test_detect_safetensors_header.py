"""A safetensors file whose header length starts with the bytes of a pickle's PROTO opcode.

The first 8 bytes of a safetensors file are its header length, little-endian: a header of 1,408 bytes
(0x0580) starts the file with ``80 05``, the bytes a protocol 5 pickle starts with. ``save_pretrained``
writes such headers (a one-layer GTE model saved by transformers 5 has one): the file is safetensors,
read as such, not a legacy torch.save refused as a pickle no torch writes.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

import tiecheck
from tiecheck.loaders.detect import SAFETENSORS, TORCH_SAVE_LEGACY, sniff_file

safetensors_torch = pytest.importorskip("safetensors.torch")


def _with_header_length(path, length: int) -> None:
    """Writes a safetensors file with safetensors' own writer, its metadata padded to a header of ``length``."""
    tensors = {"emb.weight": torch.arange(12.0).reshape(3, 4), "head.weight": torch.ones(3, 4)}
    pad = 0
    while True:
        safetensors_torch.save_file(tensors, str(path), metadata={"pad": "x" * pad})
        n = struct.unpack("<Q", path.read_bytes()[:8])[0]
        if n >= length:
            break
        pad += 1
    assert n == length, n


@pytest.mark.parametrize("length", [0x0280, 0x0380, 0x0480, 0x0580])
def test_a_header_length_that_reads_as_a_pickle_proto_is_still_safetensors(tmp_path, length):
    path = tmp_path / "model.safetensors"
    _with_header_length(path, length)
    head = path.read_bytes()[:2]
    assert head[0] == 0x80  # PROTO, and a protocol 2-5: what a pickle starts with
    assert 2 <= head[1] <= 5
    assert safetensors_torch.load_file(str(path))["emb.weight"].equal(torch.arange(12.0).reshape(3, 4))
    assert sniff_file(path) == SAFETENSORS
    r = tiecheck.analyze(str(path), flops=False)
    assert r.source.format == "safetensors"
    assert sorted(t.name for t in r.tensors) == ["emb.weight", "head.weight"]


def test_a_gte_folder_transformers_writes_with_such_a_header_is_read(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CONFIG_MAPPING["gte"].from_dict(
        {"vocab_size": 32, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 16, "max_position_embeddings": 16})
    transformers.AutoModel.from_config(cfg).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes()[:2] == b"\x80\x05"
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["GteModel"]
    r = tiecheck.analyze(str(tmp_path), flops=False)
    assert r.source.format == "Hugging Face folder (safetensors)"


def test_a_legacy_torch_save_is_still_a_legacy_torch_save(tmp_path):
    for protocol in (2, 4, 5):
        path = tmp_path / f"legacy{protocol}.pt"
        torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
        assert path.read_bytes()[8:9] != b"{"
        assert sniff_file(path) == TORCH_SAVE_LEGACY
