"""Token ids laid out as the model reads them: one row per codebook, one column per channel, image placeholders.

Each model is a tiny real one built from transformers' own config class; the count on synthesized inputs
must equal torch's FlopCounterMode on the inputs the model's processor would make (eager attention, so
every product is a matmul both count), and the note must say which layout was used.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tiecheck.flops import count_flops

pytestmark = pytest.mark.usefixtures("flops_path")  # both ways of tracing a small model (conftest.py)

transformers = pytest.importorskip("transformers")

SEQ = 8
IDS = (torch.arange(SEQ) % 63 + 1).unsqueeze(0)  # the ids synthesize_inputs makes for a vocabulary of 64


def torch_flops(model, **inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, use_cache=False)
    return counter.get_total_flops()


def eager(config):
    for c in (config, *(getattr(config, n) for n in ("vision_config", "qformer_config", "text_config",
                                                    "encoder_config", "decoder_config") if hasattr(config, n))):
        c._attn_implementation = "eager"
    return config


def test_musicgen_reads_one_row_per_codebook():
    cfg = eager(transformers.MusicgenDecoderConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, ffn_dim=64, num_codebooks=4,
                                                   max_position_embeddings=64))
    model = transformers.MusicgenForCausalLM(cfg).eval()
    with pytest.raises(RuntimeError, match="invalid for input"):  # plain ids are not what it reads
        model(input_ids=IDS, use_cache=False)
    got = count_flops(model, seq_len=SEQ)
    assert got.available, got.reason
    assert got.forward == torch_flops(model, input_ids=IDS.repeat_interleave(4, dim=0))
    assert "input_ids laid out as 4 rows: one per codebook (num_codebooks=4)" in got.notes


def test_dia_reads_one_column_per_channel():
    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64, head_dim=16)
    cfg = eager(transformers.DiaConfig(
        encoder_config=small, delay_pattern=[0, 1, 2],
        decoder_config={**small, "cross_num_attention_heads": 2, "cross_num_key_value_heads": 2,
                        "cross_head_dim": 16, "cross_hidden_size": 32, "num_channels": 3}))
    model = transformers.DiaForConditionalGeneration(cfg).eval()
    got = count_flops(model, seq_len=SEQ)
    assert got.available, got.reason
    channels = IDS.unsqueeze(-1).expand(1, SEQ, 3).contiguous()
    assert got.forward == torch_flops(model, input_ids=IDS, decoder_input_ids=channels)
    assert any("decoder_input_ids laid out as [1, 8, 3]: one column per channel" in n for n in got.notes)


def test_blip2_language_model_reads_the_query_placeholders_before_the_text():
    cfg = eager(transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        qformer_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, encoder_hidden_size=32),
        text_config=dict(model_type="opt", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         ffn_dim=64, word_embed_proj_dim=32),
        num_query_tokens=4, image_token_index=63))
    # No grad on the weights: FlopCounterMode's module hooks refuse the query tokens, a leaf that wants one.
    model = transformers.Blip2ForConditionalGeneration(cfg).eval().requires_grad_(False)
    got = count_flops(model, seq_len=SEQ)
    assert got.available, got.reason
    placeholders = torch.cat([torch.full((1, 4), 63), IDS], dim=1)
    # With images but no placeholders the forward also runs, on the text alone: the count must not be that one.
    assert got.forward == torch_flops(model, input_ids=placeholders, pixel_values=torch.zeros(1, 3, 32, 32))
    assert got.forward != torch_flops(model, input_ids=IDS, pixel_values=torch.zeros(1, 3, 32, 32))
    assert got.seq_len == SEQ + 4
    assert any("4 image placeholder ids (image_token_index=63) before the 8 text ids" in n for n in got.notes)


def test_kosmos2_reads_its_image_positions_marked_before_the_text():
    cfg = eager(transformers.Kosmos2Config(
        text_config=dict(vocab_size=64, embed_dim=32, layers=1, attention_heads=2, ffn_dim=64,
                         max_position_embeddings=128),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        latent_query_num=4))
    model = transformers.Kosmos2ForConditionalGeneration(cfg).eval().requires_grad_(False)
    got = count_flops(model, seq_len=SEQ)
    assert got.available, got.reason
    laid = torch.cat([IDS[:, :1].expand(1, 4), IDS], dim=1)
    mask = torch.zeros_like(laid, dtype=torch.bool)
    mask[:, :4] = True
    assert got.forward == torch_flops(model, input_ids=laid, image_embeds_position_mask=mask,
                                      pixel_values=torch.zeros(1, 3, 32, 32))
    assert got.seq_len == SEQ + 4
    assert any("marked by image_embeds_position_mask (latent_query_num=4)" in n for n in got.notes)


def test_a_model_that_reads_plain_ids_gets_no_layout():
    cfg = eager(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    cfg.num_codebooks = 4  # a stray field: plain ids work, so no other layout is tried
    got = count_flops(transformers.GPT2LMHeadModel(cfg).eval(), seq_len=SEQ)
    assert got.available
    assert got.seq_len == SEQ
    assert not any("laid out" in n for n in got.notes)
