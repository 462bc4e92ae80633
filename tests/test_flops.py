"""FLOPs analysis: fvcore + handles against the PaLM formula and torch's FlopCounterMode.

Real models only: Hugging Face models built from tiny configs (nothing is downloaded) and
small hand-written modules; large shapes are built on the meta device.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from tiecheck import models  # the project's own subpackage: a packaging break must fail, not skip
from tiecheck.flops import (
    PARTS,
    FlopsResult,
    ModelInputs,
    analytic_flops,
    count_flops,
    handles,
    synthesize_inputs,
)

pytestmark = pytest.mark.usefixtures("flops_path")  # both ways of tracing a small model (conftest.py)

transformers.logging.set_verbosity_error()

T = 32  # sequence length for the tiny models
D = 64
V = 1000  # differs from every hidden and MLP width, so only the logits have V columns


def close(a: float, b: float, rel: float = 0.01) -> bool:
    return abs(a - b) <= rel * abs(b)


# --- model builders ----------------------------------------------------------------------


def gpt2(tied: bool = True, device: str = "cpu", **kw) -> nn.Module:
    cfg = GPT2Config(n_layer=2, n_embd=D, n_head=4, vocab_size=V, n_positions=128, bos_token_id=0,
                     eos_token_id=0, tie_word_embeddings=tied, **kw)
    with torch.device(device):
        return GPT2LMHeadModel(cfg).eval()


def gpt2_n_matmul(layers: int = 2, d: int = D, vocab: int = V) -> int:
    return layers * 12 * d * d + d * vocab  # qkv 3d², out d², mlp 8d²; plus lm_head


def llama(device: str = "cpu") -> nn.Module:
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=160, max_position_embeddings=128)
    with torch.device(device):
        return LlamaForCausalLM(cfg).eval()


LLAMA_N = 2 * (2 * D * D + 2 * D * 32 + 3 * D * 160) + D * V  # q,o + k,v with 2 KV heads of 16


def t5(device: str = "cpu") -> nn.Module:
    cfg = T5Config(vocab_size=V, d_model=D, d_kv=16, d_ff=160, num_layers=2, num_decoder_layers=2,
                   num_heads=4, decoder_start_token_id=0)
    with torch.device(device):
        return T5ForConditionalGeneration(cfg).eval()


T5_N = 2 * (4 * D * D + 2 * D * 160) + 2 * (8 * D * D + 2 * D * 160) + D * V
T5_ATTN_LAYERS = 2 + 2 * 2  # encoder self; decoder self + cross


def bert(device: str = "cpu") -> nn.Module:
    cfg = BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=160, max_position_embeddings=128)
    with torch.device(device):
        return BertForMaskedLM(cfg).eval()


BERT_N = 2 * (4 * D * D + 2 * D * 160) + D * D + D * V  # layers, MLM transform, decoder


# --- torch's FlopCounterMode, with the CPU SDPA kernel it has no formula for ---------------


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def torch_flops(model: nn.Module, mi: ModelInputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        mi(model)
    return fc.get_total_flops()


# --- the analytic formula ------------------------------------------------------------------


def test_analytic_matches_the_issue_numbers_for_gpt2_124m():
    n = gpt2_n_matmul(12, 768, 50257)
    weights = analytic_flops(n, 0, 1024, 768)
    attention = analytic_flops(0, 12, 1024, 768)
    assert round(weights / 1e9, 2) == 252.99
    assert round(attention / 1e9, 2) == 38.65
    assert round(analytic_flops(n, 12, 1024, 768) / 1e9, 2) == 291.65
    assert analytic_flops(n, 12, 1024, 768, batch_size=4) == 4 * analytic_flops(n, 12, 1024, 768)
    assert analytic_flops(n, 12, 1024, 768, attention="causal-half") == weights + attention // 2


def test_analytic_rejects_unknown_convention():
    with pytest.raises(ValueError, match="attention must be one of"):
        analytic_flops(1, 1, 1, 1, attention="half")


def test_gpt2_124m_on_meta_gives_the_analytic_count():
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    r = count_flops(model, seq_len=1024)
    assert r.available
    assert r.method == "meta"
    assert round(r.forward / 1e9, 2) == 291.65
    assert round(r.by_part["attention"] / 1e9, 2) == 38.65
    assert r.by_part["embedding"] == 0
    assert r.forward == analytic_flops(gpt2_n_matmul(12, 768, 50257), 12, 1024, 768)


# --- cross-checks on Hugging Face models -----------------------------------------------------

HF_CASES = {
    # name: (builder, N_matmul, attention layers)
    "gpt2": (gpt2, gpt2_n_matmul(), 2),
    "llama-gqa": (llama, LLAMA_N, 2),
    "t5": (t5, T5_N, T5_ATTN_LAYERS),
    "bert": (bert, BERT_N, 2),
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_hf_models_agree_with_formula_and_flop_counter_mode(name, flops_path):
    build, n_matmul, layers = HF_CASES[name]
    model = build()
    r = count_flops(model, batch_size=2, seq_len=T)
    assert r.available, r.reason
    assert r.method == flops_path
    assert r.uncounted_ops == {}
    expected = analytic_flops(n_matmul, layers, T, D, batch_size=2)
    assert close(r.forward, expected), (r.forward, expected)
    mi = synthesize_inputs(model, 2, T)
    reference = torch_flops(model, mi)
    assert close(r.forward, reference), (r.forward, reference)
    # the parts partition the total, and the attention part is QK^T and AV alone
    assert sum(r.by_part.values()) == r.forward
    assert close(r.by_part["attention"], analytic_flops(0, layers, T, D, batch_size=2))
    assert r.by_part["output_projection"] == 2 * 2 * T * D * V
    assert r.by_part["embedding"] == 0


def test_parts_of_gpt2():
    r = count_flops(gpt2(), seq_len=T)
    b = r.by_part
    assert b["attention_projections"] == 2 * (2 * T * 4 * D * D)
    assert b["mlp"] == 2 * (2 * T * 8 * D * D)
    assert b["output_projection"] == 2 * T * D * V
    assert b["other"] == 0
    assert r.output_projection_share == pytest.approx(b["output_projection"] / r.forward)
    assert r.attention_calls == {"calls": 2, "causal": 2}


def test_eager_attention_counts_like_sdpa():
    sdpa = count_flops(gpt2(), seq_len=T)
    eager = count_flops(gpt2(attn_implementation="eager"), seq_len=T)
    assert "scaled_dot_product_attention" not in eager.by_operator
    assert eager.by_part == sdpa.by_part
    assert eager.attention_calls["causal"] == 4  # QK^T and AV per layer, both causal


def test_t5_is_counted_as_encoder_decoder():
    r = count_flops(t5(device="meta"), seq_len=T, tgt_seq_len=16)
    assert r.family == "encoder-decoder"
    d = r.to_dict()
    assert d["seq_len"] == T
    assert d["tgt_seq_len"] == 16
    assert d["tokens"] == T + 16
    enc = analytic_flops(2 * (4 * D * D + 2 * D * 160), 2, T, D)
    cross_kv = 2 * (2 * D * D)  # cross-attention K and V project the 32 source positions
    dec_weights = 2 * 16 * (2 * (8 * D * D + 2 * D * 160) - cross_kv + D * V) + 2 * T * cross_kv
    dec_attention = 2 * (4 * 16 * 16 * D) + 2 * (4 * 16 * T * D)  # self + cross
    assert r.forward == enc + dec_weights + dec_attention


# --- meta device, tying, conventions ------------------------------------------------------


def test_meta_count_equals_real_weight_count(flops_path):
    real = count_flops(llama(), batch_size=2, seq_len=T, device="cpu")
    meta = count_flops(llama(device="meta"), batch_size=2, seq_len=T)
    default = count_flops(llama(), batch_size=2, seq_len=T)
    assert (real.method, meta.method, default.method) == ("real", flops_path, flops_path)
    assert real.forward == meta.forward == default.forward
    assert real.by_part == meta.by_part


def test_meta_module_cannot_run_on_cpu():
    r = count_flops(llama(device="meta"), seq_len=T, device="cpu")
    assert not r.available
    assert "meta" in r.reason


def test_tied_and_untied_have_identical_flops():
    tied, untied = gpt2(tied=True), gpt2(tied=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    a, b = count_flops(tied, seq_len=T), count_flops(untied, seq_len=T)
    assert a.forward == b.forward
    assert a.by_part == b.by_part
    assert "memory" in a.to_dict()["note_on_tying"]


def test_causal_half_halves_causal_attention_only():
    model = llama(device="meta")
    full = count_flops(model, seq_len=T)
    half = count_flops(model, seq_len=T, attention="causal-half")
    assert half.by_part["attention"] * 2 == full.by_part["attention"]
    assert {k: v for k, v in half.by_part.items() if k != "attention"} == {
        k: v for k, v in full.by_part.items() if k != "attention"}
    assert "FlashAttention" in half.convention
    assert "PaLM" in full.convention
    # BERT is bidirectional: nothing to halve
    encoder = bert(device="meta")
    assert count_flops(encoder, seq_len=T, attention="causal-half").forward == \
        count_flops(encoder, seq_len=T).forward
    # T5: only the decoder self-attention (2 of 6 attention calls) halves
    enc_dec = t5(device="meta")
    f5 = count_flops(enc_dec, seq_len=T)
    h5 = count_flops(enc_dec, seq_len=T, attention="causal-half")
    assert f5.attention_calls == {"calls": 6, "causal": 2}
    assert f5.by_part["attention"] - h5.by_part["attention"] == 2 * (4 * T * T * D) // 2


def test_unknown_attention_convention_raises():
    with pytest.raises(ValueError, match="attention must be one of"):
        count_flops(gpt2(device="meta"), attention="half")


# --- small hand-written modules: handles, fallbacks, op accounting -------------------------


class Attention(nn.Module):
    """Multi-head attention with a selectable implementation of the score products."""

    def __init__(self, d: int, heads: int, kv_heads: int, impl: str) -> None:
        super().__init__()
        self.h, self.kv, self.dh, self.impl = heads, kv_heads, d // heads, impl
        self.q = nn.Linear(d, d, bias=False)
        self.kv_proj = nn.Linear(d, 2 * kv_heads * self.dh, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.h, self.dh).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, L, 2, self.kv, self.dh).permute(2, 0, 3, 1, 4).unbind(0)
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv < self.h)
        elif self.impl == "cpu-kernel":
            y = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0]
        else:
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
            if self.impl == "einsum":
                a = torch.einsum("...qd,...kd->...qk", q, k).softmax(-1)
                y = torch.einsum("bhqk,bhkd->bhqd", a, v)
            elif self.impl == "baddbmm":
                s = torch.baddbmm(torch.zeros(B * self.h, L, L, device=x.device),
                                  q.reshape(B * self.h, L, self.dh),
                                  k.reshape(B * self.h, L, self.dh).transpose(1, 2))
                y = torch.bmm(s.softmax(-1), v.reshape(B * self.h, L, self.dh)).view(B, self.h, L, self.dh)
            else:  # matmul
                y = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, impl: str) -> None:
        super().__init__()
        self.attn = Attention(d, heads, kv_heads, impl)
        self.mlp = nn.Sequential(nn.Linear(d, 3 * d), nn.GELU(), nn.Linear(3 * d, d))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class TinyLM(nn.Module):
    def __init__(self, impl: str = "sdpa", vocab: int = 500, d: int = 64, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, block_size: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(Block(d, heads, kv_heads, impl) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def tiny_lm_flops(batch: int, seq: int, vocab: int = 500, d: int = 64, layers: int = 2,
                  kv_heads: int = 2, heads: int = 4) -> int:
    dh = d // heads
    n = layers * (2 * d * d + 2 * kv_heads * dh * d + 6 * d * d) + d * vocab
    return analytic_flops(n, layers, seq, d, batch_size=batch)


@pytest.mark.parametrize("impl", ["sdpa", "cpu-kernel", "matmul", "einsum", "baddbmm"])
def test_attention_handles_on_a_gqa_model(impl):
    model = TinyLM(impl)
    r = count_flops(model, batch_size=2, seq_len=16)
    assert r.available, r.reason
    assert r.uncounted_ops == {}
    assert r.forward == tiny_lm_flops(2, 16)
    assert r.by_part["attention"] == analytic_flops(0, 2, 16, 64, batch_size=2)
    assert r.by_part["output_projection"] == 2 * 2 * 16 * 64 * 500
    assert r.by_part["other"] == 0
    reference = torch_flops(model, synthesize_inputs(model, 2, 16))
    assert close(r.forward, reference), (r.forward, reference)


def test_an_mlp_as_wide_as_the_vocabulary_is_still_mlp():
    r = count_flops(TinyLM(vocab=3 * 64), seq_len=16)  # the MLP's hidden width is 3 * d
    assert r.by_part["mlp"] == 2 * (2 * 16 * 6 * 64 * 64)
    assert r.by_part["output_projection"] == 2 * 16 * 64 * 192


def test_sdpa_causal_flag_is_read_from_the_call():
    full = count_flops(TinyLM("sdpa"), seq_len=16)
    half = count_flops(TinyLM("sdpa"), seq_len=16, attention="causal-half")
    assert full.attention_calls == {"calls": 2, "causal": 2}
    assert half.by_part["attention"] * 2 == full.by_part["attention"]


class UsesItem(TinyLM):
    def forward(self, idx):
        scale = float(self.tok.weight.abs().max().item() >= 0)  # data-dependent: no meta kernel
        return super().forward(idx) * scale


def test_forward_calling_item_falls_back_or_reports(flops_path):
    real = count_flops(UsesItem(), batch_size=3, seq_len=16)
    assert real.available
    assert real.forward == tiny_lm_flops(3, 16)
    assert real.batch_size == 3
    if flops_path == "meta":
        assert real.method == "real-batch-1"
        assert any("item()" in n for n in real.notes)
    else:
        assert real.method == "cpu-zeros"

    with torch.device("meta"):
        meta_model = UsesItem()
    if flops_path == "cpu-zeros":  # zero-filled weights have values to read: a small model is counted
        zeros = count_flops(meta_model, batch_size=3, seq_len=16)
        assert (zeros.available, zeros.method, zeros.forward) == (True, "cpu-zeros", tiny_lm_flops(3, 16))
    else:
        meta = count_flops(meta_model, seq_len=16)
        assert not meta.available
        assert "item()" in meta.reason
        d = meta.to_dict()
        json.dumps(d)
        assert d["forward"] is None
        assert d["by_part"] is None

    assert not count_flops(meta_model, seq_len=16, device="meta").available


class _OpaqueMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad):
        return None, None


class OpaqueHead(TinyLM):
    def forward(self, idx):
        x = self.tok(idx)
        return _OpaqueMatmul.apply(x, self.head.weight) + torch.kron(x[..., :2], x[..., :2]).sum()


def test_ops_without_a_handle_are_listed_not_dropped():
    r = count_flops(OpaqueHead(), seq_len=16)
    assert r.available
    assert r.uncounted_ops == {"prim::PythonOp._OpaqueMatmul": 1, "aten::kron": 1}
    assert r.ignored_ops["aten::embedding"] == 1
    assert "aten::view" not in r.ignored_ops  # no arithmetic: not listed at all


def test_elementwise_ops_are_ignored_and_listed():
    r = count_flops(gpt2(device="meta"), seq_len=T)
    for op in ("aten::layer_norm", "aten::add", "aten::tanh", "aten::embedding"):
        assert r.ignored_ops.get(op, 0) > 0, op
    assert r.uncounted_ops == {}


# --- inputs ---------------------------------------------------------------------------------


def test_synthesized_inputs_by_family():
    g = synthesize_inputs(gpt2(), 2, T)
    ids = g.kwargs["input_ids"]
    assert ids.shape == (2, T)
    assert ids.dtype == torch.long
    assert int(ids.min()) >= 0
    assert int(ids.max()) < V
    assert g.kwargs["use_cache"] is False
    assert g.family == "decoder"

    e = synthesize_inputs(t5(device="meta"), 2, T, tgt_seq_len=8)
    assert e.family == "encoder-decoder"
    assert e.kwargs["input_ids"].is_meta
    assert e.kwargs["decoder_input_ids"].shape == (2, 8)

    assert synthesize_inputs(bert(device="meta"), 1, T).family == "encoder"

    tiny = synthesize_inputs(TinyLM(), 1, 16)
    assert tiny.args[0].shape == (1, 16)
    assert int(tiny.args[0].max()) < 500


def test_seq_len_is_capped_by_max_positions_and_reported():
    r = count_flops(gpt2(device="meta"), seq_len=1000)
    assert r.seq_len == 128
    assert r.requested_seq_len == 1000
    assert any("max_position_embeddings=128" in n for n in r.notes)
    capped = count_flops(TinyLM(block_size=64), seq_len=100)
    assert capped.seq_len == 64
    assert any("pos.num_embeddings" in n for n in capped.notes)


class EncDec(nn.Module):
    """forward(src, tgt): a generic encoder-decoder is recognised by its two arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 32)
        self.enc = nn.Linear(32, 32)
        self.dec = nn.Linear(32, 32)
        self.out = nn.Linear(32, 300)

    def forward(self, src, tgt):
        memory = self.enc(self.emb(src)).mean(1, keepdim=True)
        return self.out(self.dec(self.emb(tgt)) + memory)


def test_generic_encoder_decoder_gets_source_and_target():
    r = count_flops(EncDec(), seq_len=10, tgt_seq_len=6)
    assert r.family == "encoder-decoder"
    assert (r.seq_len, r.tgt_seq_len) == (10, 6)
    assert r.forward == 2 * (10 * 32 * 32 + 6 * 32 * 32 + 6 * 32 * 300)


def test_user_supplied_inputs():
    model = gpt2()
    base = count_flops(model, batch_size=2, seq_len=T)
    ids = torch.randint(0, V, (2, T))
    as_dict = count_flops(model, inputs={"input_ids": ids, "use_cache": False})
    calls = []

    def make_inputs(module, batch_size, seq_len):
        calls.append((batch_size, seq_len))
        return (torch.randint(0, V, (batch_size, seq_len)),)

    as_callable = count_flops(model, inputs=make_inputs, batch_size=2, seq_len=T)
    assert calls == [(2, T)]
    assert as_dict.forward == as_callable.forward == base.forward
    assert as_dict.by_part == as_callable.by_part == base.by_part
    assert (as_dict.batch_size, as_dict.seq_len) == (2, T)
    tiny = TinyLM()
    assert count_flops(tiny, inputs=torch.zeros(2, 16, dtype=torch.long)).forward == tiny_lm_flops(2, 16)
    with pytest.raises(TypeError):
        count_flops(model, inputs=42)


def test_failing_make_inputs_is_reported():
    def broken(module, batch_size, seq_len):
        raise RuntimeError("no tokenizer here")

    r = count_flops(gpt2(device="meta"), inputs=broken)
    assert not r.available
    assert "no tokenizer here" in r.reason


def test_module_without_vocabulary_is_unavailable():
    r = count_flops(nn.Linear(4, 4))
    assert not r.available
    assert "inputs=" in r.reason


# --- the result ------------------------------------------------------------------------------


def test_result_dict_schema_is_json_serialisable():
    r = count_flops(t5(device="meta"), batch_size=2, seq_len=T)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    for key in ("available", "reason", "unit", "convention", "batch_size", "seq_len", "tgt_seq_len",
                "forward", "per_token", "train_step_estimate", "by_part", "output_projection_share",
                "uncounted_ops", "ignored_ops", "note_on_tying"):
        assert key in d, key
    assert d["unit"] == "FLOP"
    assert d["reason"] is None
    assert list(d["by_part"]) == list(PARTS)
    assert d["train_step_estimate"] == 3 * d["forward"]
    assert d["per_token"] == pytest.approx(d["forward"] / (2 * (T + T)))
    assert "2 FLOPs per multiply-add" in d["convention"]
    assert isinstance(r, FlopsResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.forward = 0
    assert "tgt_seq_len" not in count_flops(gpt2(device="meta"), seq_len=T).to_dict()


# --- the bundled reference models -------------------------------------------------------------



def linear_weights(model: nn.Module) -> int:
    """N_matmul for models built of nn.Linear: every Linear weight, a tied one once per use."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def bundled_attention_layers(model: nn.Module) -> int:
    c = model.config
    return c.n_layer if c.kind == "decoder" else c.n_encoder_layers + 2 * c.n_decoder_layers


@pytest.mark.parametrize("name", ["gpt-mini", "llama-mini", "transformer-mini"])
def test_bundled_models_agree_with_formula_and_flop_counter_mode(name, flops_path):
    model = models.build(name).eval()
    r = count_flops(model, batch_size=2, seq_len=64)
    assert r.available, r.reason
    assert r.family == model.config.kind
    assert r.method == flops_path
    assert r.uncounted_ops == {}
    expected = analytic_flops(linear_weights(model), bundled_attention_layers(model), 64,
                              model.config.d_model, batch_size=2)
    assert close(r.forward, expected), (r.forward, expected)
    reference = torch_flops(model, synthesize_inputs(model, 2, 64))
    assert close(r.forward, reference), (r.forward, reference)
    assert r.by_part["output_projection"] == 2 * 2 * 64 * model.config.d_model * model.config.vocab_size
    assert r.by_part["other"] == 0
    assert r.by_part["embedding"] == 0


@pytest.mark.parametrize("name", ["gpt-mini", "llama-mini", "transformer-mini"])
def test_bundled_tied_and_untied_have_identical_flops(name):
    tied, untied = models.build(name, tied=True), models.build(name, tied=False)
    assert sum(p.numel() for p in tied.parameters()) < sum(p.numel() for p in untied.parameters())
    a, b = count_flops(tied, seq_len=64), count_flops(untied, seq_len=64)
    assert a.forward == b.forward
    assert a.by_part == b.by_part


def test_bundled_meta_equals_real_and_gpt2_124m_matches_the_issue(flops_path):
    real = count_flops(models.build("llama-mini"), seq_len=64, device="cpu")
    meta = count_flops(models.build("llama-mini", device="meta"), seq_len=64)
    assert real.method == "real"
    assert meta.method == flops_path
    assert real.forward == meta.forward
    assert real.by_part == meta.by_part

    r = count_flops(models.build("gpt2-124m", device="meta"), seq_len=1024)
    assert round(r.forward / 1e9, 2) == 291.65
    assert round(r.by_part["attention"] / 1e9, 2) == 38.65


def test_bundled_encoder_decoder_halves_only_decoder_self_attention():
    model = models.build("transformer-mini", device="meta")
    c = model.config
    full = count_flops(model, seq_len=64)
    half = count_flops(model, seq_len=64, attention="causal-half")
    assert full.attention_calls == {"calls": c.n_encoder_layers + 2 * c.n_decoder_layers,
                                    "causal": c.n_decoder_layers}
    per_layer = 4 * 64 * 64 * c.d_model
    assert full.by_part["attention"] - half.by_part["attention"] == c.n_decoder_layers * per_layer // 2
    capped = count_flops(model, seq_len=10_000)
    assert capped.seq_len == c.max_positions
    assert capped.tgt_seq_len == c.max_positions


class _Outer(nn.Module):
    """One product fvcore has no handle for: ``torch.outer`` of an 8- and a 6-vector."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8))
        self.v = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return torch.outer(self.w * x.float().mean(), self.v)


def test_a_handle_is_one_line_of_the_table(monkeypatch):
    # Without a handle, the op is listed as uncounted and counts nothing.
    before = count_flops(_Outer(), inputs=torch.ones(1, 4, dtype=torch.long))
    assert (before.forward, before.uncounted_ops) == (0, {"aten::outer": 1})
    # One entry of the table, built from the same pieces as every product's, and it is counted.
    monkeypatch.setitem(handles.HANDLES, "aten::outer",
                        handles.product("outer", lambda inputs: inputs[:2], lambda shapes, _: shapes[0][0] * shapes[1][0]))
    after = count_flops(_Outer(), inputs=torch.ones(1, 4, dtype=torch.long))
    assert (after.forward, after.uncounted_ops) == (2 * 8 * 6, {})
    assert after.by_operator == {"outer": 2 * 8 * 6}

