"""The bundled reference models: exact counts, real ties, fair untied twins, and decoding."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import tiecheck.models as models
from tiecheck.models import (
    PRESETS,
    UnknownModelError,
    build,
    example_inputs,
    get_preset,
    list_presets,
    param_count,
    tie_savings,
)

SMALL = ["gpt-mini", "llama-mini", "transformer-mini"]

# The tied parameter names of each family, written out here rather than asked of the models.
TIED_NAMES = {
    "gpt": ["transformer.wte.weight", "lm_head.weight"],
    "llama": ["model.embed_tokens.weight", "lm_head.weight"],
    "transformer": ["src_embed.weight", "tgt_embed.weight", "lm_head.weight"],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tied_params(model: torch.nn.Module, family: str) -> list[torch.nn.Parameter]:
    return [model.get_parameter(name) for name in TIED_NAMES[family]]


def n_params(model: torch.nn.Module) -> int:
    # parameters() yields a shared Parameter once, so a tie counts once.
    return sum(p.numel() for p in model.parameters())


def inputs_and_targets(model: torch.nn.Module, seq_len: int = 12):
    inputs = example_inputs(model, batch_size=2, seq_len=seq_len)
    # Next-token targets, so the loss is the ordinary language-model loss.
    targets = torch.roll(inputs[-1], shifts=-1, dims=1)
    return inputs, targets


# --- registry, without torch -------------------------------------------------------------


def test_importing_the_registry_does_not_import_torch():
    code = (
        "import sys, tiecheck.models as m; m.param_count('big-vocab'); m.list_presets(); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_name_raises_key_error_listing_the_choices():
    with pytest.raises(KeyError) as caught:
        get_preset("gpt-9000")
    assert isinstance(caught.value, UnknownModelError)
    assert str(caught.value) == (
        "unknown model 'gpt-9000'; choose one of: " + ", ".join(p.name for p in list_presets())
    )
    for fn in (build, param_count, tie_savings):
        with pytest.raises(UnknownModelError):
            fn("gpt-9000")


def test_registry_lists_the_presets_the_tools_rely_on():
    expected = {"gpt-mini", "gpt2-124m", "gpt2-350m", "big-vocab", "llama-mini",
                "transformer-mini", "transformer-base"}
    assert expected <= set(PRESETS)
    assert [p.name for p in list_presets()] == list(PRESETS)
    for preset in list_presets():
        expected_kind = "encoder-decoder" if preset.family == "transformer" else "decoder"
        assert preset.kind == expected_kind
        assert "tie_weights" not in preset.config
        hash(preset)  # frozen presets can key dicts and sets


def test_counts_match_the_published_sizes():
    # Independent anchors: GPT-2 small and medium as released, and Llama 3.2 1B.
    assert param_count("gpt2-124m") == 124_439_808
    assert param_count("gpt2-350m") == 354_823_168
    assert param_count("big-vocab") == 1_235_814_400
    assert 0.20 < tie_savings("big-vocab") / param_count("big-vocab") < 0.22
    # Transformer base: the paper reports about 65M parameters.
    assert 60e6 < param_count("transformer-base") < 66e6


@pytest.mark.parametrize("name", list(PRESETS))
def test_tie_savings_is_one_matrix_per_extra_use(name):
    preset = get_preset(name)
    cfg = preset.config
    matrix = cfg["vocab_size"] * cfg["d_model"]
    uses = 3 if preset.kind == "encoder-decoder" else 2
    assert tie_savings(name) == (uses - 1) * matrix
    assert param_count(name, tied=False) == param_count(name) + tie_savings(name)


# --- built modules ------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_analytic_count_equals_the_built_module(name, tied):
    model = build(name, tied, device="meta")  # meta: the big presets allocate nothing
    assert n_params(model) == param_count(name, tied)
    tied_up = tied_params(model, get_preset(name).family)
    if tied:
        assert all(p is tied_up[0] for p in tied_up)
    else:
        assert len({id(p) for p in tied_up}) == len(tied_up)


def test_overrides_reach_the_config_and_the_count():
    model = build("gpt-mini", device="meta", n_layer=1, d_ff=64, bias=False)
    assert (model.config.n_layer, model.config.d_ff, model.config.bias) == (1, 64, False)
    assert n_params(model) == param_count("gpt-mini", n_layer=1, d_ff=64, bias=False)
    with pytest.raises(TypeError):
        build("gpt-mini", device="meta", tie_weights=False)


@pytest.mark.parametrize("name", SMALL)
def test_untied_twin_starts_equal_but_in_separate_memory(name):
    family = get_preset(name).family
    tied, untied = build(name, tied=True, seed=3), build(name, tied=False, seed=3)
    # Every weight, head included, starts equal: a benchmark compares only the tie.
    tied_state, untied_state = tied.state_dict(), untied.state_dict()
    assert tied_state.keys() == untied_state.keys()
    for key in tied_state:
        assert torch.equal(tied_state[key], untied_state[key]), key
    copies = tied_params(untied, family)
    pointers = {p.untyped_storage().data_ptr() for p in copies}
    assert len(pointers) == len(copies)


@pytest.mark.parametrize("name", SMALL)
def test_forward_shapes_and_finite_loss(name):
    model = build(name)
    inputs, targets = inputs_and_targets(model)
    out = model(*inputs, targets=targets)
    assert out.logits.shape == (2, 12, model.config.vocab_size)
    assert out.loss.ndim == 0
    assert torch.isfinite(out.loss)
    assert model(*inputs).loss is None


@pytest.mark.parametrize("name", SMALL)
def test_backward_keeps_the_tie_and_sums_the_gradients_of_every_use(name):
    family = get_preset(name).family
    tied, untied = build(name, tied=True), build(name, tied=False)
    inputs, targets = inputs_and_targets(tied)
    for model in (tied, untied):
        model(*inputs, targets=targets).loss.backward()

    shared = tied_params(tied, family)
    assert all(p is shared[0] for p in shared)
    # The untied twin computes the same function, so the shared matrix's gradient must be the
    # sum of the separate copies' gradients: proof that one tensor receives every use.
    separate_grads = sum(p.grad for p in tied_params(untied, family))
    torch.testing.assert_close(shared[0].grad, separate_grads, rtol=1e-4, atol=1e-6)

    torch.optim.AdamW(tied.parameters(), lr=1e-2).step()
    shared_after = tied_params(tied, family)
    assert all(p is shared[0] for p in shared_after)


@pytest.mark.parametrize("name", ["gpt-mini", "llama-mini"])
def test_greedy_generation_with_cache_equals_without(name):
    model = build(name).eval()
    prompt = example_inputs(model, batch_size=2, seq_len=6)[0]
    with_cache = model.generate(prompt, max_new_tokens=12)
    without_cache = model.generate(prompt, max_new_tokens=12, use_cache=False)
    assert with_cache.shape == (2, 18)
    assert torch.equal(with_cache[:, :6], prompt)
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("name", ["gpt-mini", "llama-mini"])
def test_a_chunk_after_the_cache_matches_one_full_pass(name):
    # Several new tokens after a cache need a bottom-right causal mask, not SDPA's is_causal.
    model = build(name).eval()
    (idx,) = example_inputs(model, batch_size=2, seq_len=10)
    with torch.no_grad():
        full = model(idx).logits
        head = model(idx[:, :4], use_cache=True)
        rest = model(idx[:, 4:], past_key_values=head.past_key_values)
    torch.testing.assert_close(torch.cat([head.logits, rest.logits], dim=1), full)


def test_generation_past_the_position_limit_is_refused():
    model = build("gpt-mini", block_size=8).eval()
    prompt = example_inputs(model, batch_size=1, seq_len=4)[0]
    assert model.generate(prompt, max_new_tokens=5).shape == (1, 9)  # feeds 8 positions
    with pytest.raises(ValueError, match="positions"):
        model.generate(prompt, max_new_tokens=6)


@pytest.mark.parametrize("name", SMALL)
def test_the_seed_alone_fixes_the_initial_weights(name):
    torch.manual_seed(123)  # the global RNG must not matter
    a = build(name, seed=1)
    torch.manual_seed(456)
    b = build(name, seed=1)
    c = build(name, seed=2)
    for (key, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), key
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_dtype_cast_keeps_the_three_way_tie():
    model = build("transformer-mini", dtype=torch.bfloat16)
    shared = tied_params(model, "transformer")
    assert all(p is shared[0] for p in shared)
    assert shared[0].dtype == torch.bfloat16
    assert torch.isfinite(model(*example_inputs(model, 1, 8)).logits).all()


def test_example_inputs_fit_the_model():
    src, tgt = example_inputs("transformer-mini", batch_size=3, seq_len=10_000)
    max_len = get_preset("transformer-mini").config["max_len"]
    assert src.shape == tgt.shape == (3, max_len)  # capped at the positions the model has
    assert src.dtype == torch.long
    (idx,) = example_inputs("gpt-mini", batch_size=2, seq_len=32)
    assert int(idx.min()) >= 0
    assert int(idx.max()) < get_preset("gpt-mini").config["vocab_size"]
    assert torch.equal(idx, example_inputs("gpt-mini", 2, 32)[0])  # same seed, same ids
    meta_model = build("gpt2-124m", device="meta")
    assert example_inputs(meta_model, 1, 16)[0].device.type == "meta"


def test_config_says_which_inputs_forward_takes():
    assert build("gpt-mini", device="meta").config.kind == "decoder"
    assert build("llama-mini", device="meta").config.kind == "decoder"
    assert build("transformer-mini", device="meta").config.kind == "encoder-decoder"
    assert models.get_config("big-vocab").head_dim == 64
