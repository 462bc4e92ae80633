"""Reference Transformers with the weight tie on or off, and a registry of sized presets.

    from tiecheck.models import build, param_count, example_inputs

    model = build("gpt-mini")               # tied: lm_head.weight is transformer.wte.weight
    untied = build("gpt-mini", tied=False)  # same starting values, separate head
    logits, loss, _ = model(*example_inputs(model, batch_size=2, seq_len=64))
    param_count("gpt2-124m"), param_count("gpt2-124m", tied=False)   # no torch needed

Three families, one file each: ``gpt`` (GPT-2-style decoder, gpt.py), ``llama`` (Llama-like
decoder, llama.py) and ``transformer`` (the 2017 encoder-decoder with its three-way tie,
transformer.py). Every model's ``forward`` returns a ``ModelOutput(logits, loss,
past_key_values)`` (see common.py) and carries its config dataclass as ``.config``; the config's
``kind`` ("decoder" or "encoder-decoder") says which inputs ``forward`` takes.

Importing this package does not import torch (``tiecheck models`` lists presets and counts
their parameters without it); ``build`` and ``example_inputs`` import it when called.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .configs import GPTConfig, LlamaConfig, TransformerConfig

if TYPE_CHECKING:
    import torch

__all__ = [
    "PRESETS",
    "GPTConfig",
    "LlamaConfig",
    "Preset",
    "TransformerConfig",
    "UnknownModelError",
    "build",
    "example_inputs",
    "get_config",
    "get_preset",
    "list_presets",
    "param_count",
    "tie_savings",
]

ModelConfig = GPTConfig | LlamaConfig | TransformerConfig

_CONFIG_CLASSES: dict[str, type[ModelConfig]] = {
    "gpt": GPTConfig,
    "llama": LlamaConfig,
    "transformer": TransformerConfig,
}


@dataclass(frozen=True)
class Preset:
    """A named model size. ``config`` holds the keyword arguments of the family's config
    dataclass, without ``tie_weights`` (chosen when building); treat it as read-only."""

    name: str
    family: str  # "gpt" | "llama" | "transformer"
    kind: str  # "decoder" | "encoder-decoder"
    config: dict[str, Any] = field(hash=False)
    description: str


def _preset(name: str, family: str, description: str, **config: Any) -> Preset:
    return Preset(name, family, _CONFIG_CLASSES[family].kind, config, description)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _preset(
            "gpt-mini", "gpt",
            "Tiny GPT for CPU runs and tests; the tied embedding is over half its parameters.",
            vocab_size=8192, block_size=256, n_layer=4, n_head=4, d_model=128,
        ),
        _preset(
            "gpt2-124m", "gpt",
            "GPT-2 small (Radford et al. 2019): 12 layers, d=768, 50257-token vocabulary.",
            vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768,
        ),
        _preset(
            "gpt2-350m", "gpt",
            "GPT-2 medium: 24 layers, d=1024, 50257-token vocabulary.",
            vocab_size=50257, block_size=1024, n_layer=24, n_head=16, d_model=1024,
        ),
        _preset(
            "llama-mini", "llama",
            "Tiny Llama-like decoder (RMSNorm, SwiGLU, RoPE, 2 KV heads) for CPU runs and tests.",
            vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2, d_model=128,
            d_ff=384,
        ),
        _preset(
            "big-vocab", "llama",
            "Llama-3.2-1B-like: 128256-token vocabulary, d=2048, 16 layers, 32/8 heads; "
            "the tie is about a fifth of the model.",
            vocab_size=128256, block_size=2048, n_layer=16, n_head=32, n_kv_head=8,
            d_model=2048, d_ff=8192, rope_theta=500000.0,
        ),
        _preset(
            "transformer-mini", "transformer",
            "Tiny encoder-decoder (2+2 layers, d=128) for CPU runs and tests; three-way tie.",
            vocab_size=8192, max_len=256, d_model=128, n_head=4, d_ff=512,
            n_encoder_layers=2, n_decoder_layers=2,
        ),
        _preset(
            "transformer-base", "transformer",
            "Transformer base (Vaswani et al. 2017): 6+6 layers, d=512, shared 37000-token "
            "vocabulary, three-way tie.",
            vocab_size=37000, max_len=512, d_model=512, n_head=8, d_ff=2048,
            n_encoder_layers=6, n_decoder_layers=6,
        ),
    ]
}


class UnknownModelError(KeyError):
    """A model name that is not in PRESETS. A KeyError, so ``except KeyError`` catches it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name
        self.message = f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}"

    def __str__(self) -> str:
        # KeyError's own __str__ shows the repr of its argument; show the sentence instead.
        return self.message


def list_presets() -> list[Preset]:
    """Every preset, in registry order (small to large within each family)."""
    return list(PRESETS.values())


def get_preset(name: str) -> Preset:
    """The preset called ``name``; UnknownModelError (a KeyError) naming the valid ones if none."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownModelError(name) from None


def _as_preset(name_or_preset: str | Preset) -> Preset:
    return name_or_preset if isinstance(name_or_preset, Preset) else get_preset(name_or_preset)


def get_config(name_or_preset: str | Preset, tied: bool = True, **overrides: Any) -> ModelConfig:
    """The config dataclass for a preset, with ``overrides`` (e.g. ``n_layer=2``) applied."""
    if "tie_weights" in overrides:
        raise TypeError("pass tied=True/False rather than tie_weights")
    preset = _as_preset(name_or_preset)
    kwargs = {**preset.config, **overrides, "tie_weights": tied}
    return _CONFIG_CLASSES[preset.family](**kwargs)


def param_count(name_or_preset: str | Preset, tied: bool = True, **overrides: Any) -> int:
    """Exact number of parameters, computed without torch; a tied matrix counts once."""
    return get_config(name_or_preset, tied, **overrides).param_count()


def tie_savings(name_or_preset: str | Preset, **overrides: Any) -> int:
    """Parameters the tie saves: vocab_size * d_model for a decoder, twice that for the
    encoder-decoder's three-way tie."""
    return param_count(name_or_preset, False, **overrides) - param_count(
        name_or_preset, True, **overrides
    )


def build(
    name: str | Preset,
    tied: bool = True,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    **overrides: Any,
) -> torch.nn.Module:
    """Build a preset, with ``overrides`` applied to its config.

    The weights are created directly on ``device`` (``"meta"`` allocates nothing, for counting
    and shape work on the big presets) and depend only on ``seed`` and the device type: they
    are drawn from a generator of their own, so the global RNG neither affects them nor is
    reseeded (PyTorch's default layer init still draws from it, but every value it draws is
    overwritten). With the same seed, the tied and untied builds start from identical values.
    ``dtype`` casts after initialising in float32, which keeps the ties.
    """
    import torch  # noqa: PLC0415 - the registry lists and counts presets without torch

    config = get_config(name, tied, **overrides)
    model_class = _model_class(config.family)
    place = torch.device(device) if device is not None else contextlib.nullcontext()
    with place:
        # Inside the context so a default device set with torch.set_default_device counts too.
        target = torch.empty(0).device
        if target.type == "meta":
            # Meta tensors hold no values: skip the initialisers, which cost seconds there.
            from tiecheck.loaders.metainit import skip_init_on_meta  # noqa: PLC0415 - imported with torch, only when building on meta

            with skip_init_on_meta():
                model = model_class(config, generator=None)
        else:
            model = model_class(config, generator=torch.Generator(target).manual_seed(seed))
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


def _model_class(family: str) -> type[torch.nn.Module]:
    # Imported here, not at the top: each model file imports torch.
    if family == "gpt":
        from .gpt import GPT  # noqa: PLC0415 - each model file imports torch

        return GPT
    if family == "llama":
        from .llama import Llama  # noqa: PLC0415 - each model file imports torch

        return Llama
    from .transformer import Transformer  # noqa: PLC0415 - each model file imports torch

    return Transformer


def example_inputs(
    name_or_module: str | Preset | torch.nn.Module,
    batch_size: int,
    seq_len: int,
    device: str | torch.device | None = None,
    *,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random token ids, shaped (batch_size, seq_len), that the model's ``forward`` takes:
    ``(idx,)`` for a decoder, ``(src, tgt)`` for the encoder-decoder.

    ``seq_len`` is capped at the model's maximum positions. The ids depend only on ``seed``.
    Given a module and no ``device``, the inputs go on the module's device (meta included).
    """
    import torch  # noqa: PLC0415 - the registry lists and counts presets without torch

    config: ModelConfig
    if isinstance(name_or_module, torch.nn.Module):
        config = name_or_module.config  # type: ignore[assignment]
        if device is None:
            device = next(name_or_module.parameters()).device
    else:
        config = get_config(name_or_module)
    seq_len = min(seq_len, config.max_positions)
    generator = torch.Generator().manual_seed(seed)
    n_inputs = 2 if config.kind == "encoder-decoder" else 1
    return tuple(
        torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
        for _ in range(n_inputs)
    )
