"""Quantized or packed heads beside a wide embedding: the copy reported by meaning, values not compared."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tiecheck
from tiecheck.analyses.packed import PackedHead
from tiecheck.cli import main

transformers = pytest.importorskip("transformers")

from support.hf import EMB, HEAD, D, V, tiny_llama  # noqa: E402

safetensors_torch = pytest.importorskip("safetensors.torch")



pytestmark = pytest.mark.usefixtures("quiet_transformers")


def llama(tie: bool):
    return tiny_llama(tie, dtype=torch.bfloat16)


def state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def tc022(r) -> list[dict]:
    return [f for f in r.findings if f.code == "TC022"]


def bnb_head(model, kind: str) -> dict:
    """The head as bitsandbytes' Linear4bit (nf4, nested statistics) / Linear8bitLt state dict stores it:
    names, dtypes, shapes and the packed quant-state JSON of bitsandbytes 0.50, built by hand so the
    default run does not pay the library's ~12 s import (``test_layouts_match_bitsandbytes`` holds
    these against the library itself)."""
    w = model.lm_head.weight.detach()
    if kind == "int8":
        scb = w.float().abs().amax(dim=1)
        q = torch.round(w.float() * 127 / scb[:, None]).to(torch.int8)
        return {HEAD: q, "lm_head.SCB": scb, "lm_head.weight_format": torch.tensor(0, dtype=torch.uint8)}
    blocks = V * D // 64
    state = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [V, D], "nested_blocksize": 256,
             "nested_dtype": "float32", "nested_offset": 0.5}
    return {HEAD: torch.randint(0, 256, (V * D // 2, 1), dtype=torch.uint8),
            HEAD + ".absmax": torch.randint(0, 256, (blocks,), dtype=torch.uint8),
            HEAD + ".quant_map": torch.linspace(-1, 1, 16),
            HEAD + ".nested_absmax": torch.ones(1),
            HEAD + ".nested_quant_map": torch.linspace(-1, 1, 256),
            HEAD + ".quant_state.bitsandbytes__nf4": torch.frombuffer(bytearray(json.dumps(state).encode()),
                                                                      dtype=torch.uint8)}


def real_bnb_head(model, kind: str) -> dict:
    bnb = pytest.importorskip("bitsandbytes")
    w = model.lm_head.weight.detach().clone()
    if kind == "nf4":
        lin = bnb.nn.Linear4bit(D, V, bias=False, quant_type="nf4", compute_dtype=torch.bfloat16)
        lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        lin = bnb.nn.Linear8bitLt(D, V, bias=False, has_fp16_weights=False)
        lin.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    lin = lin.to("cpu")
    return {f"lm_head.{k}": v.detach().clone().contiguous() for k, v in lin.state_dict().items()}


@pytest.mark.skipif(not os.environ.get("TIECHECK_SLOW_TESTS"),
                    reason="imports bitsandbytes (~12 s); set TIECHECK_SLOW_TESTS=1")
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_layouts_match_bitsandbytes(tmp_path, kind):
    m = llama(tie=False)
    real, hand = real_bnb_head(m, kind), bnb_head(m, kind)
    key = HEAD + ".quant_state.bitsandbytes__nf4"
    # The quant state's JSON length follows its numbers; everything else matches exactly.
    assert {k: (v.dtype, tuple(v.shape)) for k, v in real.items() if k != key} == \
        {k: (v.dtype, tuple(v.shape)) for k, v in hand.items() if k != key}
    if kind == "nf4":
        assert json.loads(bytes(real[key].numpy())).keys() == json.loads(bytes(hand[key].numpy())).keys()
    rest = {k: v for k, v in state(m).items() if k != HEAD}
    r_real = tiecheck.analyze(str(saved(tmp_path, rest | real, "real.safetensors")))
    r_hand = tiecheck.analyze(str(saved(tmp_path, rest | hand, "hand.safetensors")))
    (p_real,), (p_hand,) = r_real.declared["packed_heads"], r_hand.declared["packed_heads"]
    assert p_real["head_bytes"] == sum(v.numel() * v.element_size() for v in real.values())
    assert {**p_real, "head_bytes": 0} == {**p_hand, "head_bytes": 0}


def saved(tmp_path, tensors: dict, name: str = "q.safetensors"):
    path = tmp_path / name
    safetensors_torch.save_file(tensors, str(path))
    return path


def test_nf4_head_beside_bf16_embedding(tmp_path):
    m = llama(tie=False)
    sd = {k: v for k, v in state(m).items() if k != HEAD} | bnb_head(m, "nf4")
    assert sd[HEAD].dtype == torch.uint8
    assert tuple(sd[HEAD].shape) == (V * D // 2, 1)
    r = tiecheck.analyze(str(saved(tmp_path, sd)))
    companions = sorted(k for k in sd if k.startswith(HEAD + "."))
    head_bytes = sum(sd[k].numel() * sd[k].element_size() for k in [HEAD, *companions])
    assert r.declared.packed_heads == (PackedHead(
        names=(EMB, HEAD), shape=(V, D), formats=("bfloat16", "nf4 (bitsandbytes 4-bit)"), head_bytes=head_bytes,
        embedding_bytes=V * D * 2, companions=tuple(companions)),)
    (f,) = tc022(r)
    assert (f.severity, list(f.names)) == ("info", [HEAD, EMB])
    assert f"{head_bytes:,} bytes" in f.message
    assert "not compared" in f.message
    assert r.summary.bytes_in_packed_head_copies == head_bytes
    assert r.content.copies == ()
    assert not [d for d in r.untied_duplicates if not d.constant]


def test_int8_head_with_scb_in_a_folder_that_declares_the_tie(tmp_path):
    m = llama(tie=True)
    d = tmp_path / "hf"
    m.save_pretrained(d)
    sd = state(m) | bnb_head(m, "int8")
    assert sd[HEAD].dtype == torch.int8
    assert "lm_head.SCB" in sd
    (d / "model.safetensors").unlink()
    safetensors_torch.save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    r = tiecheck.analyze(str(d))
    (p,) = r.declared.packed_heads
    assert list(p.formats) == ["bfloat16", "int8 (bitsandbytes LLM.int8)"]
    assert list(p.shape) == [V, D]
    assert list(p.companions) == ["lm_head.SCB", "lm_head.weight_format"]
    assert p.head_bytes == V * D + V * 4 + 1
    (f,) = tc022(r)
    assert f.severity == "warning"
    assert list(f.names) == [HEAD, EMB]
    assert f.message.startswith("config.json tie_word_embeddings (LlamaConfig)")
    assert "quantization broke the tie" in f.message
    # The declared layer sees two copies that cannot be compared, and says so instead of "different".
    (row,) = r.declared.ties
    assert row.stored == "two copies of different shape or dtype"
    assert not [f for f in r.findings if f.code == "TC015"]


def test_fp8_head_with_scale(tmp_path):
    m = llama(tie=False)
    sd = state(m)
    sd[HEAD] = sd[HEAD].to(torch.float8_e4m3fn)
    sd[HEAD + "_scale_inv"] = torch.ones(1)
    r = tiecheck.analyze(str(saved(tmp_path, sd)))
    (p,) = r.declared.packed_heads
    assert (list(p.formats), p.head_bytes, list(p.companions)) == (
        ["bfloat16", "float8_e4m3fn with scales"], V * D + 4, [HEAD + "_scale_inv"])


def test_same_format_is_left_to_the_content_pass(tmp_path):
    m = llama(tie=False)
    r = tiecheck.analyze(str(saved(tmp_path, state(m))))
    assert r.declared.packed_heads == ()
    assert tc022(r) == []
    assert r.summary.bytes_in_packed_head_copies == 0


def test_gguf_q8_output_beside_f16_embedding(tmp_path):
    gguf = pytest.importorskip("gguf")
    g = np.random.default_rng(0)
    emb = g.standard_normal((V, 32), dtype=np.float32)
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_vocab_size(V)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", emb.astype(np.float16))
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("output.weight", gguf.quants.quantize(emb, q8), raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = tiecheck.analyze(str(path))
    (p,) = r.declared.packed_heads
    row_bytes = 32 // 32 * 34  # Q8_0: 32 values in 34 bytes
    assert p == PackedHead(names=("token_embd.weight", "output.weight"), shape=(V, 32),
                           formats=("F16 (GGUF)", "Q8_0 (GGUF)"), head_bytes=V * row_bytes,
                           embedding_bytes=V * 32 * 2, companions=())
    assert [f.severity for f in tc022(r)] == ["info"]
    out = CliRunner().invoke(main, ["inspect", str(path)]).output
    assert "Heads stored in another format than the embedding (1)" in out
    assert "Q8_0 (GGUF)" in out


def test_malformed_quant_state_is_not_a_packing(tmp_path):
    m = llama(tie=False)
    sd = {k: v for k, v in state(m).items() if k != HEAD} | bnb_head(m, "nf4")
    key = HEAD + ".quant_state.bitsandbytes__nf4"
    sd[key] = torch.frombuffer(bytearray(b'{"shape": "not a shape"'), dtype=torch.uint8)
    r = tiecheck.analyze(str(saved(tmp_path, sd)))
    assert r.declared.packed_heads == ()
    assert tc022(r) == []
