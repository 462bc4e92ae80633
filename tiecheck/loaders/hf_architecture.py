"""The architecture a Hugging Face folder's config builds, on the meta device and within budgets, and its ties.

With transformers installed, the config's architecture class is built on the meta device (no weights
allocated, nothing downloaded, no ``trust_remote_code`` unless asked) and its ties are read from the
built module itself: Parameter identity in ``state_dict(keep_vars=True)``. The budgets bound what a
hostile config can make the build allocate. Read by ``loaders/formats/hf.py``.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules import module as torch_module

from tiecheck.loaders.declared import (
    governing_config,
    head_source,
)
from tiecheck.loaders.detect import HF_CONFIG
from tiecheck.loaders.metainit import skip_init_on_meta

# -- what the folder's files may name -------------------------------------------------------------

def architecture_class(transformers, name: object) -> type | None:
    """The transformers model class that ``config.json``'s ``architectures`` entry ``name`` names, or None.

    Only a ``PreTrainedModel`` subclass is a model: ``"architectures": ["Trainer"]`` would otherwise
    make tiecheck call ``transformers.Trainer(config)``. The name must be a plain identifier.
    """
    if not isinstance(name, str) or not re.fullmatch(r"\w{1,200}", name):
        return None
    cls = getattr(transformers, name, None)
    base = getattr(transformers, "PreTrainedModel", None)
    if isinstance(cls, type) and base is not None and issubclass(cls, base):
        return cls
    return None


NEEDS_EXTRA = ("architecture ties need transformers: pip install tiecheck[hf]; analysed the files alone "
               "(ties the architecture re-creates on load are not shown)")


# -- the architecture -----------------------------------------------------------------------

@dataclass
class Architecture:
    name: str
    keys: list[str]  # state_dict order
    groups: list[tuple[str, ...]]  # names sharing one Parameter / buffer, each sorted
    declared: dict[str, str]  # transformers' expanded tie mapping, target -> source
    prefix: str
    tie_word_embeddings: bool | None
    input_embedding: str | None
    output_embedding: str | None
    version: str
    notes: list[str] = field(default_factory=list)
    module: Any = None  # the meta-device module itself (for FLOPs)
    # ``declared`` is transformers' own expansion (5.x); False where it could not be had (4.x)
    mapping_known: bool = False

    def group_of(self, name: str) -> tuple[str, ...] | None:
        for g in self.groups:
            if name in g:
                return g
        return None


@contextlib.contextmanager
def quiet_transformers():
    """transformers logs config and generation warnings that are noise for an inspection."""

    from transformers.utils import logging as tlog  # noqa: PLC0415 - transformers is the `hf` extra

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(level)


def _model_class(transformers, folder: Path, config, cfg: dict, trust_remote_code: bool):
    for name in cfg.get("architectures") or []:
        cls = architecture_class(transformers, name)
        if cls is not None:
            return cls
    auto_map = cfg.get("auto_map") if isinstance(cfg.get("auto_map"), dict) else {}
    for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM", "AutoModel"):
        if auto in auto_map and trust_remote_code:
            from transformers.dynamic_module_utils import get_class_from_dynamic_module  # noqa: PLC0415 - transformers is the `hf` extra

            # One "module.Class" string, as transformers reads it (a list, as tokenizers are filed, fails there
            # and here). local_files_only: an "org/repo--module.Class" reference is not fetched.
            return get_class_from_dynamic_module(auto_map[auto], str(folder), local_files_only=True)
    for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM", "AutoModel"):
        mapping = getattr(getattr(transformers, auto, None), "_model_mapping", None)
        try:
            if mapping is not None and type(config) in mapping:
                return mapping[type(config)]
        except (KeyError, ValueError):
            continue
    return None


class ArchitectureTooLarge(Exception):
    """The config describes far more modules or tensors than the folder's files hold."""


def tensor_budget(stored: int) -> int:
    """How many tensors (and modules) an architecture may register while it is built for files
    holding ``stored`` tensors: a generous multiple (non-persistent buffers, tied names dropped
    from the files, modules without weights), never less than a small model needs."""
    return 8 * stored + 4096


@contextlib.contextmanager
def registration_budget(limit: int, stored: int):
    """Abort building a module once it registers more than ``limit`` parameters, buffers or submodules.

    The config is read from an untrusted folder: ``num_hidden_layers: 1000000`` would build a
    million layers (minutes and gigabytes, even on the meta device). Real architectures register
    about as many tensors as their files hold, so the build stops far above that instead.
    """


    counts = {"tensors": 0, "modules": 0}
    builder = threading.get_ident()  # the hooks are global: modules built by other threads do not count

    def count(kind: str):
        def hook(*_args):
            if threading.get_ident() != builder:
                return
            counts[kind] += 1
            if counts[kind] > limit:
                raise ArchitectureTooLarge(f"config.json describes more than {limit:,} {kind}, the files hold "
                                           f"{stored:,} tensors")
        return hook

    handles = [torch_module.register_module_parameter_registration_hook(count("tensors")),
               torch_module.register_module_buffer_registration_hook(count("tensors")),
               torch_module.register_module_module_registration_hook(count("modules"))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def build_architecture(folder: Path, cfg: dict, *, trust_remote_code: bool = False,
                       stored: int | None = None) -> tuple[Any, list[str]]:
    """(Architecture or None, notes). Never raises for an architecture it cannot build: it says why.

    ``stored`` is the number of tensors the folder's files hold; the build is aborted when the
    config describes many times more (see ``registration_budget``).
    """
    try:
        import transformers  # noqa: PLC0415 - transformers is the `hf` extra
    except ImportError:
        return None, [NEEDS_EXTRA]

    archs = [str(a) for a in cfg.get("architectures") or []]
    custom = bool(cfg.get("auto_map")) and not any(architecture_class(transformers, a) is not None for a in archs)
    if custom and not trust_remote_code:
        return None, [f"the architecture ({', '.join(archs or ['auto_map'])}) is custom "
                      f"code shipped in the folder; it was not run. Rerun with --trust-remote-code to build it and "
                      f"check its ties (that runs the folder's Python files); analysed the files alone"]
    try:
        with quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                                             local_files_only=True)
            cls = _model_class(transformers, folder, config, cfg, trust_remote_code)
            if cls is None:
                return None, [f"transformers {transformers.__version__} has no model class for this config "
                              f"(model_type {cfg.get('model_type')!r}); analysed the files alone"]

            # Initialisers on meta tensors cost seconds (they import torch._dynamo) and do nothing.
            budget = contextlib.nullcontext() if stored is None else registration_budget(tensor_budget(stored), stored)
            # As transformers' Auto classes build one: a class shipped in the folder that is no PreTrainedModel
            # (no _from_config, no tie_weights) fails there, and here.
            with torch.device("meta"), skip_init_on_meta(), budget:
                model = cls._from_config(config)
            _tie_as_the_loader_does(transformers, model)
    except ArchitectureTooLarge as e:
        return None, [f"the architecture was not built: {e}, so config.json does not describe these files; "
                      f"analysed the files alone"]
    except Exception as e:  # noqa: BLE001 - any failure to build leaves the file analysis intact
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        hint = " (rerun with --trust-remote-code if you trust the folder's code)" if "trust_remote_code" in msg else ""
        said = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
        return None, [f"could not build the architecture from {HF_CONFIG} with transformers "
                      f"{transformers.__version__} ({said}){hint}; analysed the files alone"]
    return _describe(model, type(model).__name__, transformers.__version__), []


def _tie_as_the_loader_does(transformers, model) -> None:
    """Tie the built model as ``from_pretrained`` does once the weights are loaded.

    transformers 5 ties from the mapping ``post_init()`` computed (``recompute_mapping=False``): a class
    whose ``__init__`` never calls ``post_init()`` has none and fails to load, and fails here the same
    way instead of being reported tied. transformers 4's ``tie_weights()`` takes no arguments and
    works the mapping out afresh.
    """
    if "recompute_mapping" in inspect.signature(transformers.PreTrainedModel.tie_weights).parameters:
        model.tie_weights(recompute_mapping=False)
    else:
        model.tie_weights()


def _describe(model, name: str, version: str) -> Architecture:
    sd = model.state_dict(keep_vars=True)
    by_id: dict[int, list[str]] = {}
    for k, v in sd.items():
        by_id.setdefault(id(v), []).append(k)
    groups = [tuple(sorted(v)) for v in by_id.values() if len(v) > 1]
    declared, mapping_known = {}, False
    if hasattr(model, "get_expanded_tied_weights_keys"):
        with contextlib.suppress(Exception):
            declared = dict(model.get_expanded_tied_weights_keys(all_submodels=True))
            mapping_known = True
    name_of = {id(v): k for k, v in reversed(list(sd.items()))}
    # The module's own name first: a tied head's weight is also the embedding's, whose name comes first.
    module_name: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        module_name.setdefault(id(m), n)  # a shared module (transformers 4's T5 embedding) by its first path

    def weight_name(getter: str) -> str | None:
        try:
            mod = getattr(model, getter)()
        except Exception:  # noqa: BLE001 - many models raise NotImplementedError here
            return None
        w = getattr(mod, "weight", None)
        own = f"{module_name[id(mod)]}.weight" if id(mod) in module_name else None
        if own is not None and own in sd:
            return own
        return name_of.get(id(w)) if w is not None else None

    head = weight_name("get_output_embeddings")
    # The flag of the sub-model the head belongs to (an encoder-decoder's decoder), as transformers reads it.
    config, _ = governing_config(model, head)
    tie = getattr(config, "tie_word_embeddings", None)
    return Architecture(name=name, keys=list(sd), groups=sorted(groups), declared=declared, module=model,
                        mapping_known=mapping_known,
                        prefix=getattr(model, "base_model_prefix", "") or "",
                        tie_word_embeddings=tie if isinstance(tie, bool) else None,
                        # The embedding the head ties to, where the model's tie mapping names it (Marian with
                        # separate vocabularies: the decoder's, not get_input_embeddings(), the encoder's).
                        input_embedding=head_source(model, head) or weight_name("get_input_embeddings"),
                        output_embedding=head, version=version)
