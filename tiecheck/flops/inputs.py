"""Inputs for the traced forward: token ids synthesized from what the module says of itself.

Which family a model is (decoder, encoder, encoder-decoder), its vocabulary and its maximum
positions are read from the module and its config; a caller may pass inputs instead.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelInputs:
    """Inputs for one forward pass: call ``module(*args, **kwargs)``.

    ``family`` is "decoder", "encoder", "encoder-decoder" or "unknown"; ``seq_len`` (and
    ``tgt_seq_len`` for an encoder-decoder) are the lengths actually used, after any cap by
    the model's maximum positions (see ``notes``).
    """

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    family: str = "unknown"
    batch_size: int = 1
    seq_len: int | None = None
    tgt_seq_len: int | None = None
    requested_seq_len: int | None = None
    vocab_size: int | None = None
    notes: tuple[str, ...] = ()

    def __call__(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)


_MAX_POSITION_ATTRS = ("max_positions", "max_position_embeddings", "n_positions", "max_seq_len", "block_size",
                       "max_len", "context_length", "n_ctx", "max_seq_length")


def module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


def _hf_pretrained(module: nn.Module) -> bool:
    tf = sys.modules.get("transformers")  # loaded already if the module is a HF model
    base = getattr(tf, "PreTrainedModel", None) if tf is not None else None
    return base is not None and isinstance(module, base)


def _is_reference_model(module: nn.Module) -> bool:
    return type(module).__module__.startswith("tiecheck.models.")


def _first_embedding(module: nn.Module) -> nn.Embedding | None:
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            return m
    return None


def _config_int(config: Any, names: Sequence[str]) -> tuple[str, int] | None:
    if config is None:
        return None
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return n, v
    return None


def _vocab_size(module: nn.Module) -> tuple[int | None, str | None]:
    """The vocabulary size from ``.config``, else the first ``nn.Embedding`` (and a note)."""
    found = _config_int(getattr(module, "config", None), ("vocab_size", "n_vocab"))
    if found:
        return found[1], None
    emb = _first_embedding(module)
    if emb is not None:
        return emb.num_embeddings, f"vocab_size {emb.num_embeddings} taken from the first nn.Embedding"
    return None, None


def _required_positional(module: nn.Module) -> int | None:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            n += 1
    return n


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _token_ids(batch: int, seq: int, vocab: int | None, device: torch.device) -> torch.Tensor:
    """Deterministic ids in [0, vocab), avoiding id 0 (often padding) when the vocab allows."""
    v = max(int(vocab or 2), 1)
    row = torch.arange(seq, device=device, dtype=torch.long)
    row = row % (v - 1) + 1 if v > 1 else row * 0
    return row.unsqueeze(0).repeat(batch, 1)


def _any_causal_attr(module: nn.Module) -> bool:
    return any(getattr(m, "is_causal", None) is True for m in module.modules())


def synthesize_inputs(
    module: nn.Module,
    batch_size: int = 1,
    seq_len: int = 128,
    *,
    tgt_seq_len: int | None = None,
    device: torch.device | str | None = None,
) -> ModelInputs:
    """Token-id inputs of shape (batch_size, seq_len) that ``module`` accepts.

    The family is read from the module:

    * a Hugging Face ``PreTrainedModel``: ``config.vocab_size``; ``input_ids``, plus
      ``decoder_input_ids`` when ``config.is_encoder_decoder``; ``use_cache=False`` and
      ``return_dict=False`` where the forward takes them. Decoder-only when an attention
      module has ``is_causal=True``, else encoder.
    * a bundled reference model (``tiecheck.models``): ``.config.vocab_size`` and
      ``.config.kind``; ``(idx,)`` for decoders, ``(src, tgt)`` for the encoder-decoder.
    * anything else: the vocabulary from ``.config.vocab_size`` or the first
      ``nn.Embedding``; ``module(ids)``, or ``module(src, tgt)`` when the forward takes two
      required positional arguments.

    ``seq_len`` (and ``tgt_seq_len``, default ``seq_len``) are capped by the model's maximum
    positions (``max_positions``, ``max_position_embeddings``, ``n_positions``,
    ``block_size``, ..., or a position embedding's size); the cap is
    reported in ``notes``. Tensors are created on ``device``, default the module's device
    (meta for a module built under ``torch.device("meta")``).

    Raises ``ValueError`` when no vocabulary size or calling convention can be found.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    dev = torch.device(device) if device is not None else module_device(module)
    config = getattr(module, "config", None)
    notes: list[str] = []

    vocab_size, vocab_note = _vocab_size(module)
    if vocab_note:
        notes.append(vocab_note)
    if vocab_size is None:
        raise ValueError(
            f"cannot synthesize token ids for {type(module).__name__}: no config.vocab_size and "
            "no nn.Embedding; pass inputs= (a tuple or dict of tensors, or a callable)"
        )

    hf = _hf_pretrained(module)
    kind = getattr(config, "kind", None) if _is_reference_model(module) else None
    enc_dec = bool(getattr(config, "is_encoder_decoder", False)) if hf else kind == "encoder-decoder"
    if not hf and kind is None:
        nreq = _required_positional(module)
        if nreq == 2:
            enc_dec = True
        elif nreq not in (0, 1):
            raise ValueError(
                f"cannot synthesize inputs for {type(module).__name__}: its forward takes "
                f"{nreq} required arguments; pass inputs= (a tuple or dict of tensors, or a callable)"
            )

    cap = _config_int(config, _MAX_POSITION_ATTRS)
    if cap is None and not hf:
        pos = None
        for name, m in module.named_modules():
            if isinstance(m, nn.Embedding) and re.search(r"pos", name.rsplit(".", 1)[-1], re.IGNORECASE):
                pos = (f"{name}.num_embeddings", m.num_embeddings)
                break
        cap = pos

    def capped(n: int, what: str) -> int:
        if cap is not None and n > cap[1]:
            notes.append(f"{what} capped from {n} to {cap[1]} by {cap[0]}={cap[1]}")
            return cap[1]
        return n

    src = capped(seq_len, "seq_len")
    tgt = capped(tgt_seq_len if tgt_seq_len is not None else seq_len, "tgt_seq_len") if enc_dec else None

    ids = _token_ids(batch_size, src, vocab_size, dev)
    if hf:
        kwargs: dict[str, Any] = {"input_ids": ids}
        if enc_dec:
            kwargs["decoder_input_ids"] = _token_ids(batch_size, tgt, vocab_size, dev)
        if _accepts(module, "use_cache"):
            kwargs["use_cache"] = False
        if _accepts(module, "return_dict"):
            kwargs["return_dict"] = False
        family = "encoder-decoder" if enc_dec else ("decoder" if _any_causal_attr(module) else "encoder")
        return ModelInputs((), kwargs, family, batch_size, src, tgt, seq_len, vocab_size, tuple(notes))

    if enc_dec:
        args: tuple = (ids, _token_ids(batch_size, tgt, vocab_size, dev))
        family = "encoder-decoder"
    else:
        args = (ids,)
        family = kind or ("decoder" if _any_causal_attr(module) else "unknown")
    return ModelInputs(args, {}, family, batch_size, src, tgt, seq_len, vocab_size, tuple(notes))


def coerce_inputs(
    module: nn.Module,
    inputs: Any,
    batch_size: int,
    seq_len: int,
    device: torch.device,
) -> ModelInputs:
    """User inputs -> ModelInputs on ``device`` (tensors are moved, other values kept)."""
    if callable(inputs) and not isinstance(inputs, (torch.Tensor, ModelInputs)):
        inputs = inputs(module, batch_size, seq_len)
    if isinstance(inputs, ModelInputs):
        mi = inputs
    elif isinstance(inputs, torch.Tensor):
        mi = ModelInputs(args=(inputs,))
    elif isinstance(inputs, Mapping):
        mi = ModelInputs(kwargs=dict(inputs))
    elif isinstance(inputs, (tuple, list)):
        mi = ModelInputs(args=tuple(inputs))
    else:
        raise TypeError(
            "inputs must be a tensor, a tuple/list or dict of tensors, a ModelInputs, or a callable "
            f"make_inputs(module, batch_size, seq_len) returning one; got {type(inputs).__name__}"
        )

    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, torch.Tensor) else v

    args = tuple(move(a) for a in mi.args)
    kwargs = {k: move(v) for k, v in mi.kwargs.items()}
    first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
    if first is None:
        raise ValueError("inputs contain no tensor")
    bs, sl, tsl = mi.batch_size, mi.seq_len, mi.tgt_seq_len
    family = mi.family
    notes = list(mi.notes)
    if not isinstance(inputs, ModelInputs):
        # read the sizes off the tensors the user gave
        bs = int(first.shape[0]) if first.dim() >= 1 else 1
        sl = int(first.shape[1]) if first.dim() >= 2 else None
        tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        second = tensors[1] if len(tensors) > 1 else None
        if _hf_pretrained(module) and getattr(getattr(module, "config", None), "is_encoder_decoder", False):
            family = "encoder-decoder"
            dec = kwargs.get("decoder_input_ids")
            tsl = int(dec.shape[1]) if isinstance(dec, torch.Tensor) and dec.dim() >= 2 else None
        elif (not _hf_pretrained(module) and _required_positional(module) == 2 and second is not None
              and second.dim() >= 2):
            family = "encoder-decoder"
            tsl = int(second.shape[1])
        else:
            kind = getattr(getattr(module, "config", None), "kind", None) if _is_reference_model(module) else None
            family = kind or ("decoder" if _any_causal_attr(module) else "unknown")
        notes.append("inputs supplied by the caller; sizes read from the first tensor")
    vocab_size = mi.vocab_size if mi.vocab_size is not None else _vocab_size(module)[0]
    return ModelInputs(args, kwargs, family, bs, sl, tsl, mi.requested_seq_len or sl, vocab_size, tuple(notes))


# -- inputs that are not token ids: images and audio, for a forward that needs them ---------------

# Raw audio a speech model reads when its config says nothing of the length: one second at 16 kHz.
AUDIO_SAMPLES = 16000
# Feature frames when the config has no max_source_positions (30 s at a 10 ms hop, Whisper's window).
AUDIO_FRAMES = 3000
_FEATURE_SIZE = ("num_mel_bins", "input_feat_per_channel", "feature_projection_input_dim", "feature_size")
# Image patches of a flattened-patch model (Pix2Struct), as many as its processor makes by default.
FLAT_PATCHES = 2048


def _configs(config: Any, depth: int = 0) -> list[Any]:
    """``config`` and the configs nested in it (vision_config, audio_config, encoder, ...), outermost first."""
    out = [config]
    if depth < 3:
        for v in vars(config).values():
            if hasattr(v, "to_dict") and not isinstance(v, type) and v is not config:
                out += _configs(v, depth + 1)
    return out


def _config_int_any(config: Any, names: Sequence[str]) -> int | None:
    """The first of ``names`` a config or one nested in it sets to a positive int."""
    for c in _configs(config):
        found = _config_int(c, names)
        if found:
            return found[1]
    return None


def _image_shape(config: Any) -> tuple[int, int, int] | None:
    for c in _configs(config):
        size = getattr(c, "image_size", None)
        if isinstance(size, int) and size > 0:
            h = w = size
        elif isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(x, int) and x > 0 for x in size):
            h, w = size
        else:
            continue
        channels = getattr(c, "num_channels", 3)
        return (channels if isinstance(channels, int) and channels > 0 else 3), h, w
    return None


def _feature_shape(config: Any) -> tuple[int, int] | None:
    for c in _configs(config):
        found = _config_int(c, _FEATURE_SIZE)
        if found:
            positions = _config_int(c, ("max_source_positions",))
            # Whisper's encoder takes exactly 2 x max_source_positions frames (its second conv halves them),
            # its window of 30 s; no model is held to more than that window here.
            return found[1], min(2 * positions[1], AUDIO_FRAMES) if positions else AUDIO_FRAMES
    return None


def media_inputs(module: nn.Module, mi: ModelInputs, wanted: Sequence[str]) -> list[ModelInputs]:
    """``mi`` with the non-token inputs in ``wanted`` added, one candidate per way to shape them.

    Images are ``(batch, channels, height, width)`` from the config's ``image_size`` and
    ``num_channels``; audio features ``(batch, features, frames)`` then ``(batch, frames,
    features)`` from ``num_mel_bins`` (or ``input_feat_per_channel``) and ``max_source_positions``;
    raw audio one second at 16 kHz. The values are zeros: FLOPs do not depend on them. Token ids
    the forward reads besides ``input_ids`` (``qformer_input_ids``) are the same ids. Inputs
    nothing in the config describes are left out, so the list may be empty.
    """
    config = getattr(module, "config", None)
    ids = mi.kwargs.get("input_ids")
    if config is None or not isinstance(ids, torch.Tensor):
        return []
    batch, dev = ids.shape[0], ids.device
    base = dict(mi.kwargs)
    if not _accepts(module, "input_ids"):
        base.pop("input_ids")
    extras: list[tuple[dict[str, Any], str]] = []
    for name in wanted:
        if name == "pixel_values" and _image_shape(config):
            c, h, w = _image_shape(config)
            extras.append(({name: torch.zeros(batch, c, h, w, device=dev)}, f"{name} [{batch}, {c}, {h}, {w}]"))
            # One image per example as a stack of images (IDEFICS' layout).
            extras.append(({name: torch.zeros(batch, 1, c, h, w, device=dev)}, f"{name} [{batch}, 1, {c}, {h}, {w}]"))
        elif name == "flattened_patches" and _config_int_any(config, ("patch_embed_hidden_size",)):
            # Pix2Struct: per patch its row and column, then its pixels.
            d = _config_int_any(config, ("patch_embed_hidden_size",)) + 2
            extras.append(({name: torch.zeros(batch, FLAT_PATCHES, d, device=dev)}, f"{name} [{batch}, {FLAT_PATCHES}, {d}]"))
        elif name == "bbox":  # integer boxes (LayoutLM) or normalised ones (UDOP)
            for dtype in (torch.long, torch.float32):
                extras.append(({name: torch.zeros(batch, ids.shape[1], 4, dtype=dtype, device=dev)},
                               f"{name} [{batch}, {ids.shape[1]}, 4] {str(dtype).removeprefix('torch.')}"))
        elif name == "lang_ids":  # X-MOD's per-example language adapter: the first language
            extras.append(({name: torch.zeros(batch, dtype=torch.long, device=dev)}, f"{name} [{batch}]"))
        elif name == "input_features" and _feature_shape(config):
            f, t = _feature_shape(config)
            extras.append(({name: torch.zeros(batch, f, t, device=dev)}, f"{name} [{batch}, {f}, {t}]"))
            extras.append(({name: torch.zeros(batch, t, f, device=dev)}, f"{name} [{batch}, {t}, {f}]"))
        elif name == "input_values":
            extras.append(({name: torch.zeros(batch, AUDIO_SAMPLES, device=dev)}, f"{name} [{batch}, {AUDIO_SAMPLES}]"))
        elif name.endswith("input_ids") and _accepts(module, name):
            base[name] = ids
    out = []
    for kw, shown in extras:
        if _accepts(module, next(iter(kw))):
            out.append(replace(mi, kwargs={**base, **kw},
                               notes=(*mi.notes, f"synthesized {shown} of zeros: the forward needs it")))
    return out


# -- token ids laid out as the model reads them: codebooks, channels, image placeholders ----------

def _decoder_config(config: Any) -> Any:
    """The decoder's own config of a model that nests one (Dia's ``decoder_config``, MusicGen's ``decoder``)."""
    for name in ("decoder_config", "decoder"):
        sub = getattr(config, name, None)
        if hasattr(sub, "to_dict"):
            return sub
    return config


def _image_token(config: Any) -> tuple[str, int] | None:
    # InstructBLIP-Video names its placeholder for the frames it reads
    return _config_int(config, ("image_token_index", "image_token_id", "video_token_index"))


def token_layouts(module: nn.Module, mi: ModelInputs) -> list[ModelInputs]:
    """``mi`` with its token ids laid out another way, one candidate per layout the config describes.

    Tried only after the plain ids failed, so a model that reads plain ids never sees them:

    * one row per codebook (MusicGen: ``input_ids`` of ``[batch x num_codebooks, seq]``, or the decoder's
      ids of an encoder-decoder), from ``num_codebooks``;
    * one column per audio channel (Dia: the decoder's ids of ``[batch, seq, num_channels]``), from the
      decoder config's ``num_channels``;
    * the image placeholders a Q-Former model replaces with its queries (BLIP-2, InstructBLIP and its video
      model: ``num_query_tokens`` ids equal to ``image_token_index`` (``video_token_index``) before the text,
      for one image or frame), as their processors write them;
    * the image positions Kosmos-2 marks with ``image_embeds_position_mask``: ``latent_query_num`` of them
      before the text.

    Returns:
        The candidates, each with a note saying what it changed; empty when the config describes none.
    """
    config = getattr(module, "config", None)
    ids = mi.kwargs.get("input_ids")
    if config is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return []
    target = "decoder_input_ids" if isinstance(mi.kwargs.get("decoder_input_ids"), torch.Tensor) else "input_ids"
    tokens = mi.kwargs[target]
    out: list[ModelInputs] = []

    def candidate(name: str, value: torch.Tensor, note: str) -> None:
        out.append(replace(mi, kwargs={**mi.kwargs, name: value}, notes=(*mi.notes, note)))

    decoder = _decoder_config(config)
    codebooks = _config_int(decoder, ("num_codebooks",))
    if codebooks and codebooks[1] > 1:
        n = codebooks[1]
        candidate(target, tokens.repeat_interleave(n, dim=0),
                  f"{target} laid out as {tokens.shape[0] * n} rows: one per codebook (num_codebooks={n})")
    channels = _config_int(decoder, ("num_channels",)) if decoder is not config else None
    if channels and channels[1] > 1:
        n = channels[1]
        candidate(target, tokens.unsqueeze(-1).expand(*tokens.shape, n).contiguous(),
                  f"{target} laid out as [{tokens.shape[0]}, {tokens.shape[1]}, {n}]: one column per channel "
                  f"(num_channels={n})")
    image, queries = _image_token(config), _config_int(config, ("num_query_tokens",))
    if image is not None and queries:
        n = queries[1]
        placeholders = torch.full((ids.shape[0], n), image[1], dtype=ids.dtype, device=ids.device)
        out.append(replace(mi, kwargs={**mi.kwargs, "input_ids": torch.cat([placeholders, ids], dim=1)},
                           seq_len=(mi.seq_len or 0) + n,
                           notes=(*mi.notes, f"{n} image placeholder ids ({image[0]}={image[1]}) before the "
                                             f"{ids.shape[1]} text ids, one per query (num_query_tokens={n})")))
    latent = _config_int(config, ("latent_query_num",))
    if latent and _accepts(module, "image_embeds_position_mask"):
        n = latent[1]
        laid = torch.cat([ids[:, :1].expand(ids.shape[0], n), ids], dim=1)  # their values give way to the image's
        mask = torch.zeros_like(laid, dtype=torch.bool)
        mask[:, :n] = True
        out.append(replace(mi, kwargs={**mi.kwargs, "input_ids": laid, "image_embeds_position_mask": mask},
                           seq_len=(mi.seq_len or 0) + n,
                           notes=(*mi.notes, f"{n} image positions before the {ids.shape[1]} text ids, marked by "
                                             f"image_embeds_position_mask (latent_query_num={n})")))
    return out
