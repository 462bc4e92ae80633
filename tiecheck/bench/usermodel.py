"""``tiecheck bench --model`` on the user's own model: a Hugging Face folder or config, or a factory.

Two ways to name a model, one contract for every mode (``train``, ``infer``, ``converge``, and
``--nproc-per-node``):

- **A Hugging Face folder or config** (``./my-model/`` holding ``config.json``, or the
  ``config.json`` itself): the causal LM transformers builds from it
  (``AutoModelForCausalLM.from_config``), with random weights drawn after ``torch.manual_seed(seed)``
  -- no weights are read -- and dropout off (every ``*dropout*`` / ``*pdrop*`` probability of the
  config set to 0, as the bundled models have it: with dropout the two variants would draw
  different masks, and the same-first-loss check would compare noise). The tied variant is built with ``tie_word_embeddings=True``; the
  untied one is that same build with the output layer given its own copy of the embedding, so
  both start from identical values and differ in the tie alone. Only transformers' own
  architectures are built (a folder's custom code is not run).
- **A factory** ``path/to/file.py:factory`` (or ``package.module:factory``):
  ``factory(tied: bool, vocab_size: int = ..., seed: int = ...)`` returns an ``nn.Module`` whose
  ``forward(idx)`` takes token ids ``(batch, seq)`` and returns the logits
  ``(batch, seq, vocab)`` (or a tuple, or an object with ``.logits``, holding them first).
  ``tied`` is required; ``vocab_size`` and ``seed`` are passed when the factory names them (or
  takes ``**kwargs``), and torch's global RNG is seeded with ``seed`` before every call, so a
  factory that draws its own weights from it is reproducible too. With ``tied=True`` the
  embedding and the output layer hold one Parameter; with ``tied=False`` and the same seed, the
  same starting values with the output layer a separate copy.

The bench computes the loss itself (next-token cross-entropy, :func:`tiecheck.models.common.lm_loss`)
from the logits, the same way for every model.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tiecheck import models
from tiecheck.bench.protocol import tie_groups
from tiecheck.errors import TiecheckError
from tiecheck.loaders.formats.spec import call_spec, looks_like_spec, resolve_spec
from tiecheck.models.common import ModelOutput, lm_loss

CONFIG = "config.json"
CONTRACT = "factory(tied: bool, vocab_size: int = ..., seed: int = ...)"


@dataclass(frozen=True)
class UserModel:
    """A model named by the user: what it is, and what the bench needs to know before building it."""

    target: str  # as given on the command line
    source: str  # "hf" | "spec"
    description: str
    vocab_size: int | None  # the model's own vocabulary (rows of its tied matrix)
    max_positions: int | None  # None: the model does not say
    config: Any = None  # the transformers config ("hf")

    @property
    def hf(self) -> bool:
        return self.source == "hf"


def is_user_model(name: str | None) -> bool:
    """Whether ``--model`` names the user's model (a path or a spec) rather than a bundled preset."""
    if not name:
        return False
    if os.path.exists(name):
        return True  # a path that exists wins over a bundled name, as for every command
    return name not in models.PRESETS and (looks_like_spec(name) or name.endswith(".json"))


# ------------------------------------------------------------------------------------------
# Resolving (before anything is built on the device)
# ------------------------------------------------------------------------------------------

def resolve_user_model(target: str, seed: int = 0, probe: bool = True) -> UserModel:
    """Read what the bench needs from the user's model; bad input is one line.

    Args:
        target: a Hugging Face folder, a ``config.json``, or a ``file.py:factory`` spec.
        seed: the seed a factory is called with when it must be built to be measured.
        probe: build a factory's tied variant to read its vocabulary (``--mode converge`` gives
            the vocabulary instead, and skips it).

    Returns:
        The UserModel.
    """
    path = Path(target)
    if path.exists() and not looks_like_spec(target):
        return _resolve_hf(target, path)
    if target.endswith(".json") and not path.exists():
        raise TiecheckError(f"--model {target}: no such file")
    if not probe:
        resolve_spec(target)  # an import error or a missing name fails here, before the corpus is read
        return UserModel(target=target, source="spec", description=f"the user's model ({CONTRACT})",
                         vocab_size=None, max_positions=None)
    return _resolve_spec(target, seed)


def _hf_config(target: str, path: Path) -> tuple[Any, Any]:
    """(transformers, the config it reads from the folder or file)."""
    try:
        import transformers  # noqa: PLC0415 - the `hf` extra, only for a Hugging Face model
    except ImportError:
        raise TiecheckError(f"--model {target}: a Hugging Face model needs transformers "
                            "(pip install 'tiecheck[hf]')") from None
    file = path / CONFIG if path.is_dir() else path
    if not file.is_file():
        raise TiecheckError(f"--model {target}: a folder without {CONFIG}; give a Hugging Face model folder, its "
                            f"{CONFIG}, a bundled name (tiecheck models) or path/to/file.py:factory")
    try:
        with _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(str(file), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds on a bad config
        raise TiecheckError(f"--model {target}: transformers cannot read {file.name}: "
                            f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None
    return transformers, config


def _resolve_hf(target: str, path: Path) -> UserModel:
    transformers, config = _hf_config(target, path)
    if getattr(config, "auto_map", None):
        raise TiecheckError(f"--model {target}: the architecture is custom code shipped in the folder (auto_map); "
                            "the bench builds transformers' own classes only (wrap yours in a file.py:factory)")
    mapping = transformers.AutoModelForCausalLM._model_mapping
    if type(config) not in mapping:
        raise TiecheckError(f"--model {target}: transformers {transformers.__version__} has no causal language "
                            f"model for model_type {getattr(config, 'model_type', None)!r}; the bench trains "
                            "decoders (wrap yours in a file.py:factory)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        raise TiecheckError(f"--model {target}: its config has no vocab_size")
    positions = getattr(text, "max_position_embeddings", None)
    name = mapping[type(config)].__name__
    return UserModel(target=target, source="hf", description=f"{name} built from {target} (random weights, "
                     "transformers' initialisation, dropout off)", vocab_size=vocab,
                     max_positions=positions if isinstance(positions, int) and positions > 0 else None,
                     config=config)


def _resolve_spec(target: str, seed: int) -> UserModel:
    # Built once to read its vocabulary: on the meta device where the factory allows (nothing is
    # allocated), else where it puts itself.
    try:
        with torch.device("meta"):
            probe = call_factory(target, tied=True, seed=seed)
    except TiecheckError:
        probe = call_factory(target, tied=True, seed=seed)
    groups = tie_groups(probe)
    if not groups:
        raise TiecheckError(f"--model {target}: the tied build (tied=True) shares no Parameter between two names; "
                            "the factory must tie the embedding and the output layer when tied=True")
    rows = probe.get_parameter(groups[0][0]).shape[0]
    cfg = getattr(probe, "config", None)
    positions = next((getattr(cfg, k) for k in ("max_position_embeddings", "block_size", "n_positions")
                      if isinstance(getattr(cfg, k, None), int)), None)
    return UserModel(target=target, source="spec", description=f"the user's model ({CONTRACT})", vocab_size=rows,
                     max_positions=positions)


# ------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------

def call_factory(spec: str, tied: bool, *, vocab_size: int | None = None, seed: int = 0) -> nn.Module:
    """Call the user's factory with the arguments it names; torch's global RNG seeded with ``seed`` first.

    Args:
        spec: ``file.py:factory`` or ``package.module:factory``.
        tied: the variant.
        vocab_size: passed when the factory takes it (``None``: never passed).
        seed: passed when the factory takes it; the global RNG is seeded with it either way.

    Returns:
        The module the factory returned.
    """
    fn = resolve_spec(spec)
    if not callable(fn):
        raise TiecheckError(f"--model {spec}: names a {type(fn).__name__}; give a function {CONTRACT}")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "tied" not in params and not open_kwargs:
        raise TiecheckError(f"--model {spec}: the factory takes ({', '.join(params)}); it must take tied: bool -- "
                            f"{CONTRACT}")
    kwargs: dict[str, Any] = {"tied": tied}
    for key, value in (("vocab_size", vocab_size), ("seed", seed)):
        if value is not None and (key in params or open_kwargs):
            kwargs[key] = value
        elif key in params and params[key].default is inspect.Parameter.empty:
            raise TiecheckError(f"--model {spec}: the factory requires {key}; give it a default (the model's own "
                                f"{key.replace('_', ' ')}) so the bench can build it outside --mode converge")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = call_spec(spec, **kwargs)
    if not isinstance(module, nn.Module):
        raise TiecheckError(f"--model {spec}: returned {type(module).__name__}, not a torch.nn.Module")
    return module


def untie(model: nn.Module) -> nn.Module:
    """Give every name of every tie group but the first its own copy of the shared values (in place)."""
    for names in tie_groups(model):
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            setattr(module, attr, nn.Parameter(model.get_parameter(name).detach().clone()))
    return model


def build(user: UserModel, tied: bool, dev: torch.device, seed: int, vocab_size: int | None = None) -> nn.Module:
    """One variant of the user's model on ``dev``.

    Args:
        user: what :func:`resolve_user_model` read.
        tied: the variant.
        dev: where the weights are created.
        seed: the seed of the weights; the same for both variants.
        vocab_size: a vocabulary other than the model's own (a padded one, or the tokenizer's).

    Returns:
        The model; the untied one starts from the tied one's values, its output layer a copy.
    """
    if not user.hf:
        model = call_factory(user.target, tied=tied, vocab_size=vocab_size, seed=seed).to(dev)
        if tied and not tie_groups(model):
            raise TiecheckError(f"--model {user.target}: the tied build shares no Parameter between two names")
        return model
    import transformers  # noqa: PLC0415 - the `hf` extra; resolve_user_model checked it is there

    config = copy.deepcopy(user.config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if vocab_size is not None:
        text.vocab_size = vocab_size
    for c in {id(config): config, id(text): text}.values():
        c.tie_word_embeddings = True
        for key, value in c.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(c, key, 0.0)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.device(dev), _quiet(transformers):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.float()
    model.config.use_cache = False  # the bench never decodes with it: no key/value cache kept per step
    if not tie_groups(model):
        raise TiecheckError(f"--model {user.target}: {type(model).__name__} did not tie its embedding and output "
                            "layer with tie_word_embeddings=True, so there is no tie to measure")
    if not tied:
        for c in {id(model.config): model.config, id(text): text}.values():
            c.tie_word_embeddings = False  # what the model says of itself; it must not tie again
        untie(model)
    return model


def _quiet(transformers: Any):
    """transformers' own warnings (a config's token ids outside a small test vocabulary) kept off the output."""
    stack = contextlib.ExitStack()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    stack.callback(transformers.logging.set_verbosity, verbosity)
    return stack


# ------------------------------------------------------------------------------------------
# Calling: the bench's forward contract
# ------------------------------------------------------------------------------------------

def logits_of(out: Any) -> torch.Tensor:
    """The logits in what a model's forward returned: a tensor, a tuple starting with them, or ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TiecheckError(f"the model's forward returned {type(out).__name__}; the bench needs the logits "
                        "(a tensor, a tuple starting with them, or an object with .logits)")


class LMCall:
    """``fn`` (the model, compiled or wrapped) called the way the bundled models are: ``(idx, targets=None)``.

    Returns a ModelOutput whose loss is the bench's own next-token cross-entropy of the logits.
    """

    def __init__(self, fn: Callable, hf: bool) -> None:
        self.fn, self.hf = fn, hf

    def __call__(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        out = self.fn(input_ids=idx, use_cache=False) if self.hf else self.fn(idx)
        logits = logits_of(out)
        return ModelOutput(logits, lm_loss(logits, targets))
