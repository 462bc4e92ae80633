"""Tiny transformers models for the tests that need one (the `test` extra installs transformers).

``tiny_llama`` is the Llama the declared-layer, adapter and packed-head tests build: one layer,
a 64 x 16 embedding, tied or not. The ``quiet_transformers`` fixture (tests/conftest.py) keeps
transformers' logging and warnings out of the test output.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
V, D = 64, 16


def tiny_llama(tie: bool = True, seed: int = 0, dtype: torch.dtype | None = None) -> transformers.LlamaForCausalLM:
    """A one-layer Llama with a V x D embedding, its head tied to it when ``tie``."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie,
                                   **({"torch_dtype": str(dtype).removeprefix("torch.")} if dtype else {}))
    model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype) if dtype else model


def tiny_t5_folder(folder: Path, seed: int = 0, **config_json) -> Path:
    """A one-layer T5 (vocabulary 32, width 8) saved with ``save_pretrained``; each keyword rewrites a key of
    its config.json (None removes it), e.g. as flan-t5's reads: ``tie_word_embeddings=False,
    scale_decoder_outputs=None``."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(folder)
    written = json.loads((folder / "config.json").read_text())
    for k, v in config_json.items():
        written.pop(k, None) if v is None else written.__setitem__(k, v)
    (folder / "config.json").write_text(json.dumps(written, indent=2))
    return folder


# A model that ships its own code, as remote-code models on the Hub do: config.json names the two files in
# ``auto_map`` and transformers imports them only under ``trust_remote_code=True``.
CUSTOM_CONFIG = """
from transformers import PretrainedConfig

class TinyCustomConfig(PretrainedConfig):
    model_type = "tiecheck-tiny-custom"

    def __init__(self, vocab_size=32, hidden=8, tie_word_embeddings=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden = hidden
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
"""

CUSTOM_MODEL = """
from torch import nn
from transformers import PreTrainedModel
from .configuration_tiny import TinyCustomConfig

class TinyCustomForCausalLM(PreTrainedModel):
    config_class = TinyCustomConfig
    _tied_weights_keys = {"head.weight": "embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head
"""

CUSTOM_AUTO_MAP = {"AutoConfig": "configuration_tiny.TinyCustomConfig",
                   "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"}


def custom_code_folder(folder: Path, model_source: str = CUSTOM_MODEL, **config_json) -> tuple[Path, dict]:
    """A folder with its own model code (``modeling_tiny.py``), a config.json naming it in ``auto_map`` and the
    embedding's weights alone in ``model.safetensors`` (the head is tied to it). Each keyword rewrites a key of
    config.json (None removes it). Returns the folder and the config as written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_tiny.py").write_text(model_source)
    cfg = {"model_type": "tiecheck-tiny-custom", "architectures": ["TinyCustomForCausalLM"], "vocab_size": 32,
           "hidden": 8, "tie_word_embeddings": True, "auto_map": dict(CUSTOM_AUTO_MAP)}
    for k, v in config_json.items():
        cfg.pop(k, None) if v is None else cfg.__setitem__(k, v)
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    save_file({"embed.weight": torch.randn(32, 8)}, folder / "model.safetensors")
    return folder, cfg


class ReplaceHeadAt(transformers.TrainerCallback):
    """Replaces the head by a clone at the end of optimizer step ``step``, as code that swaps a module mid-run does."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            model.lm_head = copy.deepcopy(model.lm_head)
