"""Building the architecture of a folder as transformers' loader does: code the folder ships, a config no
model class serves, a build that fails, and the tie mapping of a model made of sub-models.

Each test asks transformers first (``from_pretrained``, the Auto classes) and then holds
``build_architecture`` to the same answer. Code shipped in a folder is run only where the test passes
``trust_remote_code=True``; transformers copies it into its modules cache (the ``remote_code_modules``
fixture's folder).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
import transformers.utils.hub as thub

from tiecheck.loaders.hf_architecture import build_architecture

from support.hf import CUSTOM_MODEL, custom_code_folder

pytestmark = pytest.mark.usefixtures("quiet_transformers")

AUTOS = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM", "AutoModel")


@pytest.fixture
def hub_calls(monkeypatch):
    """Every file transformers asks huggingface_hub for, with its ``local_files_only``; none is served."""
    calls = []

    def refuse(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("local_files_only")))
        raise OSError(f"{repo_id}/{filename} is not on this machine")

    monkeypatch.setattr(thub, "hf_hub_download", refuse)
    return calls


def only_note(got) -> str:
    arch, notes = got
    assert arch is None
    assert len(notes) == 1
    return notes[0]


# -- code the folder ships -----------------------------------------------------------------------

@pytest.mark.parametrize("auto", AUTOS)
def test_trusted_code_named_by_the_auto_map_alone_is_built(tmp_path, remote_code_modules, auto):
    # No `architectures`: the class is the one `auto_map` names, under whichever Auto class it is filed.
    folder, cfg = custom_code_folder(tmp_path / f"only_{auto.lower()}", architectures=None,
                                     auto_map={"AutoConfig": "configuration_tiny.TinyCustomConfig",
                                               auto: "modeling_tiny.TinyCustomForCausalLM"})
    model = getattr(transformers, auto).from_pretrained(str(folder), trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM"
    assert model.head.weight is model.embed.weight

    arch, notes = build_architecture(folder, cfg, trust_remote_code=True, stored=1)
    assert notes == []
    assert arch.name == "TinyCustomForCausalLM"
    assert arch.groups == [("embed.weight", "head.weight")]
    assert arch.declared == {"head.weight": "embed.weight"}
    assert (arch.input_embedding, arch.output_embedding) == ("embed.weight", "head.weight")


def test_an_auto_map_entry_that_is_a_list_is_not_a_class_transformers_loads(tmp_path, remote_code_modules):
    # Tokenizers are filed as [slow, fast] pairs; a model entry is one "module.Class" string, and transformers
    # cannot load a list there. Neither does tiecheck pick one of its items: the build fails as the loader does.
    folder, cfg = custom_code_folder(tmp_path / "listed", architectures=None,
                                     auto_map={"AutoConfig": "configuration_tiny.TinyCustomConfig",
                                               "AutoModelForCausalLM": ["modeling_tiny.TinyCustomForCausalLM", None]})
    with pytest.raises((AttributeError, TypeError)):
        transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)

    note = only_note(build_architecture(folder, cfg, trust_remote_code=True, stored=1))
    assert note.startswith("could not build the architecture from config.json")
    assert note.endswith("; analysed the files alone")


@pytest.mark.parametrize("entry", ["AutoConfig", "AutoModelForCausalLM"])
def test_trusted_code_is_read_from_the_folder_never_fetched_from_a_repo_it_names(tmp_path, remote_code_modules,
                                                                                 hub_calls, entry):
    # "org/repo--module.Class" asks transformers for another repository's code. --trust-remote-code trusts the
    # folder's own files: transformers may look in its local cache, never fetch.
    auto_map = {"AutoConfig": "configuration_tiny.TinyCustomConfig",
                "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"}
    auto_map[entry] = "someone/elsewhere--" + auto_map[entry]
    folder, cfg = custom_code_folder(tmp_path / f"elsewhere_{entry.lower()}", architectures=None, auto_map=auto_map)

    note = only_note(build_architecture(folder, cfg, trust_remote_code=True, stored=1))
    assert note.startswith("could not build the architecture from config.json")
    assert hub_calls, "transformers was expected to ask for someone/elsewhere's module"
    assert {repo for repo, _, _ in hub_calls} == {"someone/elsewhere"}
    assert all(local is True for _, _, local in hub_calls), hub_calls


# -- what transformers' loader does after building -------------------------------------------------

def test_a_model_that_never_calls_post_init_fails_as_transformers_loader_fails(tmp_path, remote_code_modules):
    # transformers 5 ties through the mapping post_init() computes; a class that skips it cannot be loaded,
    # so its head is not reported as tied to its embedding.
    source = CUSTOM_MODEL.replace("        self.post_init()\n", "")
    folder, cfg = custom_code_folder(tmp_path / "no_post_init", model_source=source)
    with pytest.raises(AttributeError, match="all_tied_weights_keys"):
        transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)

    note = only_note(build_architecture(folder, cfg, trust_remote_code=True, stored=1))
    assert "(AttributeError: " in note
    assert "all_tied_weights_keys" in note


@pytest.mark.parametrize(("message", "shown"), [
    ("", "(ValueError)"),
    ("first line\nsecond line", "(ValueError: first line)"),
    ("x" * 250 + "\nsecond line", f"(ValueError: {'x' * 200})"),
])
def test_a_build_error_is_said_by_its_first_line_cut_at_200_characters(tmp_path, remote_code_modules, message, shown):
    source = CUSTOM_MODEL.replace("        super().__init__(config)\n",
                                  f"        super().__init__(config)\n        raise ValueError({message!r})\n")
    folder, cfg = custom_code_folder(tmp_path / f"raises_{len(message)}", model_source=source)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)

    note = only_note(build_architecture(folder, cfg, trust_remote_code=True, stored=1))
    assert shown in note
    assert "second line" not in note
    assert "x" * 201 not in note


# -- a config no model class serves ------------------------------------------------------------------

def test_a_config_no_auto_class_serves_is_said_so(tmp_path):
    # BLIP's text model has a config class AutoConfig knows, and no model class of the four Auto classes.
    config = transformers.BlipTextConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16)
    for auto in AUTOS:
        with pytest.raises(ValueError, match="Unrecognized configuration class"):
            getattr(transformers, auto).from_config(config)
    folder = tmp_path / "blip_text"
    folder.mkdir()
    cfg = config.to_dict()
    (folder / "config.json").write_text(json.dumps(cfg))

    note = only_note(build_architecture(folder, cfg, stored=1))
    assert note == (f"transformers {transformers.__version__} has no model class for this config "
                    "(model_type 'blip_text_model'); analysed the files alone")


# -- a model made of sub-models ----------------------------------------------------------------------

def test_the_tie_mapping_includes_the_sub_models_ties(tmp_path):
    # A vision encoder-decoder's GPT-2 decoder ties its own head: the mapping of the whole model names it only
    # when transformers is asked for every sub-model's ties, as its loader ties them.
    encoder = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, image_size=8, patch_size=4)
    decoder = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, add_cross_attention=True,
                                      is_decoder=True, bos_token_id=0, eos_token_id=0)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    torch.manual_seed(0)
    transformers.VisionEncoderDecoderModel(config).save_pretrained(tmp_path / "ved")
    loaded = transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "ved")
    assert loaded.decoder.lm_head.weight is loaded.decoder.transformer.wte.weight
    assert dict(loaded.get_expanded_tied_weights_keys(all_submodels=False)) == {}

    cfg = json.loads((tmp_path / "ved" / "config.json").read_text())
    arch, notes = build_architecture(tmp_path / "ved", cfg, stored=len(loaded.state_dict()))
    assert notes == []
    assert arch.declared == {"decoder.lm_head.weight": "decoder.transformer.wte.weight"}
    assert ("decoder.lm_head.weight", "decoder.transformer.wte.weight") in arch.groups


BARE_HEAD_MODEL = """
import torch
from torch import nn
from transformers import PreTrainedModel
from .configuration_tiny import TinyCustomConfig

class HeadView(nn.Module):
    '''The head, a module of the model holding no Parameter of its own: its weight is the model's bare one.'''

    def __init__(self, weight_of):
        super().__init__()
        self._weight_of = weight_of  # the model's attribute, read when asked (loading replaces the Parameter)

    @property
    def weight(self):
        return self._weight_of()

class TinyBareHeadForCausalLM(PreTrainedModel):
    config_class = TinyCustomConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.lm_head_weight = nn.Parameter(torch.zeros(config.vocab_size, config.hidden))
        self.head = HeadView(lambda: self.lm_head_weight)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head
"""


def test_a_head_that_is_a_bare_parameter_is_named_by_its_state_dict_key(tmp_path, remote_code_modules):
    # No transformers class does this (each getter returns a module whose weight is its own), but code shipped in
    # a folder may: "head.weight" is no key of the state dict, and the head is found by its Parameter's key.
    folder, cfg = custom_code_folder(tmp_path / "bare_head", model_source=BARE_HEAD_MODEL, tie_word_embeddings=False,
                                     architectures=None,
                                     auto_map={"AutoConfig": "configuration_tiny.TinyCustomConfig",
                                               "AutoModelForCausalLM": "modeling_tiny.TinyBareHeadForCausalLM"})
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
    assert model.get_output_embeddings().weight is model.lm_head_weight
    assert "head.weight" not in model.state_dict()

    arch, notes = build_architecture(folder, cfg, trust_remote_code=True, stored=1)
    assert notes == []
    assert (arch.input_embedding, arch.output_embedding) == ("embed.weight", "lm_head_weight")
    assert arch.groups == []


def test_a_class_that_is_no_pretrained_model_fails_as_transformers_fails(tmp_path, remote_code_modules):
    source = "from torch import nn\n\nclass TinyPlain(nn.Module):\n    def __init__(self, config):\n" \
             "        super().__init__()\n        self.embed = nn.Embedding(config.vocab_size, config.hidden)\n"
    folder, cfg = custom_code_folder(tmp_path / "plain", model_source=source, architectures=None,
                                     auto_map={"AutoConfig": "configuration_tiny.TinyCustomConfig",
                                               "AutoModelForCausalLM": "modeling_tiny.TinyPlain"})
    config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    with pytest.raises(AttributeError, match="type object 'TinyPlain' has no attribute"):
        transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)

    note = only_note(build_architecture(folder, cfg, trust_remote_code=True, stored=1))
    assert "(AttributeError: type object 'TinyPlain' has no attribute '_from_config')" in note
