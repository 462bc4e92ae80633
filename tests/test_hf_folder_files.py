"""A Hugging Face folder's own files before any architecture is built: ``config.json`` read within its
limit, and the weights file chosen as transformers chooses it (safetensors before ``pytorch_model.bin``,
an index before a single file), or refused in one line. Weights are written by safetensors and torch."""

from __future__ import annotations

import datetime
import json

import pytest
import torch

from tiecheck.errors import TargetError, UntrustedPickleError
from tiecheck.loaders.detect import SAFETENSORS, TORCH_SAVE, WEIGHTS_INDEX
from tiecheck.loaders.formats.hf import CONFIG_LIMIT, find_weights, load_hf_folder, read_config

from support.checkpoints import llama_config, llama_tensors, write_sharded
from support.cli import inspect_error

safetensors_torch = pytest.importorskip("safetensors.torch")

LIMIT = 16 << 20  # written as the number: a test reading the module's constant moves with it


def folder(tmp_path, *, config: bytes | None = b'{"model_type": "llama"}', **files: str):
    """A folder with ``config.json`` and weights files named by keyword (value: "safetensors", "torch",
    "index" or raw text)."""
    d = tmp_path / "m"
    d.mkdir(parents=True)
    if config is not None:
        (d / "config.json").write_bytes(config)
    for name, kind in files.items():
        p = d / name.replace("__", ".")
        if kind == "safetensors":
            safetensors_torch.save_file({"w": torch.ones(2)}, str(p))
        elif kind == "torch":
            torch.save({"w": torch.ones(2)}, p)
        elif kind == "index":
            p.write_text(json.dumps({"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}))
        else:
            p.write_text(kind)
    return d


# -- config.json ------------------------------------------------------------------------------------

def test_a_config_of_exactly_the_limit_is_read_one_byte_more_refused(tmp_path):
    assert CONFIG_LIMIT == LIMIT
    body = b'{"model_type": "llama", "pad": "'
    config = body + b"x" * (LIMIT - len(body) - 2) + b'"}'
    assert len(config) == LIMIT
    d = folder(tmp_path, config=config)
    assert read_config(d)["model_type"] == "llama"
    (d / "config.json").write_bytes(config[:-2] + b'x"}')
    with pytest.raises(TargetError, match=r"config\.json: larger than 16,777,216 bytes; a model config is a few "
                                          r"kilobytes, so this is not one"):
        read_config(d)


@pytest.mark.parametrize(("config", "message"), [
    (b'{"model_type": ', r"config\.json: not valid JSON \(.+\); fix or replace the config"),
    (b'["llama"]', r"config\.json: holds a JSON list, not an object"),
    (b'"llama"', r"config\.json: holds a JSON str, not an object")])
def test_a_config_that_is_not_a_json_object(tmp_path, config, message):
    d = folder(tmp_path, config=config, model__safetensors="safetensors")
    with pytest.raises(TargetError, match=message):
        read_config(d)


def test_a_config_that_cannot_be_read(tmp_path):
    d = folder(tmp_path, config=None, model__safetensors="safetensors")
    (d / "config.json").mkdir()
    with pytest.raises(TargetError, match=r"config\.json: cannot read \(Is a directory\)"):
        read_config(d)


# -- which weights file ---------------------------------------------------------------------------

def test_safetensors_are_read_before_pytorch_model_bin(tmp_path):
    d = folder(tmp_path, pytorch_model__bin="torch", model__safetensors="safetensors")
    assert find_weights(d) == (SAFETENSORS, d / "model.safetensors",
                               ["also holds pytorch_model.bin; read model.safetensors, as transformers does"])


def test_an_index_is_read_before_a_single_file_and_only_the_other_format_is_noted(tmp_path):
    d = folder(tmp_path, model__safetensors__index__json="index", model__safetensors="safetensors",
               pytorch_model__bin="torch")
    assert find_weights(d) == (WEIGHTS_INDEX, d / "model.safetensors.index.json",
                               ["also holds pytorch_model.bin; read model.safetensors.index.json, as transformers "
                                "does"])
    d = folder(tmp_path / "b", pytorch_model__bin="torch")
    assert find_weights(d) == (TORCH_SAVE, d / "pytorch_model.bin", [])


def test_weights_under_another_name_are_found_by_their_content(tmp_path):
    d = folder(tmp_path, weights__bin="torch", empty__safetensors="", notes__txt="hello")
    assert find_weights(d) == (TORCH_SAVE, d / "weights.bin", [])
    d = folder(tmp_path / "b", a__index__json="index", b__index__json="index", w__safetensors="safetensors")
    assert find_weights(d) == (SAFETENSORS, d / "w.safetensors", [])  # two indexes: neither, the file


def test_several_weights_files_without_an_index(tmp_path):
    d = folder(tmp_path / "two", a__safetensors="safetensors", b__safetensors="safetensors")
    with pytest.raises(TargetError, match=r"several safetensors files without an index \(a\.safetensors, b\.safetensors\)"):
        find_weights(d)
    d = folder(tmp_path, **{f"{c}__safetensors": "safetensors" for c in "abcde"})
    with pytest.raises(TargetError, match=r"holds config\.json and several safetensors files without an index "
                                          r"\(a\.safetensors, b\.safetensors, c\.safetensors, d\.safetensors\); "
                                          r"name one of them"):
        find_weights(d)
    assert "name one of them" in inspect_error(d)


def test_no_weights(tmp_path):
    d = folder(tmp_path, notes__txt="hello")
    with pytest.raises(TargetError, match=r"holds config\.json but no weights .*is the download complete"):
        find_weights(d)
    assert "but no weights" in inspect_error(d)


def test_a_preferred_name_holding_something_else(tmp_path):
    d = folder(tmp_path, model__safetensors="not weights")
    with pytest.raises(TargetError, match=r"model\.safetensors: not a recognised weights file"):
        find_weights(d)
    assert "not a recognised weights file" in inspect_error(d)


def test_a_tensor_name_too_long_for_key_renaming_is_refused_before_it(tmp_path):
    """transformers' key renaming runs regular expressions over every name: a name past 4,096
    characters is refused first, whichever weights file holds it."""
    d = folder(tmp_path)
    safetensors_torch.save_file({"model." + "x" * 4091: torch.ones(2)}, str(d / "model.safetensors"))
    with pytest.raises(TargetError, match=r"model\.safetensors: a tensor name is 4,097 characters long"):
        load_hf_folder(d)
    assert "a tensor name is 4,097 characters long" in inspect_error(d)


# -- each kind of weights, loaded -----------------------------------------------------------------

def _loaded(d):
    """The folder loaded with a config transformers has no class for (the files alone, quickly)."""
    s = load_hf_folder(d)
    assert any("could not build the architecture" in n for n in s.source.notes)
    return s


def test_each_kind_of_weights_is_loaded_by_its_loader(tmp_path):
    sd = {"a.weight": torch.arange(4.0), "b.weight": torch.arange(6.0).reshape(2, 3), "c.bias": torch.ones(1)}
    cfg = b'{"model_type": "no-such-model"}'
    d = folder(tmp_path / "sharded", config=cfg)
    write_sharded(d, sd)
    s = _loaded(d)
    assert s.source.format == "Hugging Face folder (sharded safetensors)"
    assert {n: s.tensors[n].tolist() for n in sd} == {n: t.tolist() for n, t in sd.items()}
    d = folder(tmp_path / "bin", config=cfg)
    torch.save(sd, d / "pytorch_model.bin")
    s = _loaded(d)
    assert s.source.format == "Hugging Face folder (torch.save state dict)"
    assert s.source.notes[0] == "weights: pytorch_model.bin (torch.save state dict)"
    assert {n: s.tensors[n].tolist() for n in sd} == {n: t.tolist() for n, t in sd.items()}


# -- declarations without an architecture ---------------------------------------------------------

def test_the_configs_tie_is_held_against_the_files_alone(tmp_path):
    """No class to build: the embedding found by name, the head a causal LM's config implies
    (transformers' LM heads load from lm_head.weight), the flag's value, and a value that is not one."""
    cfg = {"model_type": "no-such-model", "architectures": ["NoSuchForCausalLM"], "tie_word_embeddings": True,
           "text_config": {"tie_word_embeddings": "yes"}}
    d = folder(tmp_path, config=json.dumps(cfg).encode())
    safetensors_torch.save_file({"model.embed_tokens.weight": torch.randn(16, 8), "model.norm.weight": torch.ones(8)},
                                str(d / "model.safetensors"))
    s = _loaded(d)
    assert s.extra["hf"]["config_tie_word_embeddings"] is True
    assert s.extra["hf"]["architecture"] is None
    assert [(p["names"], p["declared"], p["by"]) for p in s.declared_pairs] == \
        [(["lm_head.weight", "model.embed_tokens.weight"], True, ["config.json tie_word_embeddings"])]
    assert [(x["kind"], x["value"]) for x in s.declarations] == [("tie_word_embeddings", True)]
    assert "config.json: text_config.tie_word_embeddings is 'yes', not true or false; ignored as a declaration" \
        in s.source.notes
    cfg["architectures"] = ["NoSuchModel"]  # not a causal LM: no head is implied
    (d / "config.json").write_text(json.dumps(cfg))
    assert _loaded(d).declared_pairs == []


# -- what is trusted by default -------------------------------------------------------------------

def test_nothing_is_trusted_unless_asked(tmp_path):
    """load_hf_folder unpickles no global and runs no code of the folder unless its caller says so."""
    d = folder(tmp_path, config=b'{"model_type": "no-such-model"}')
    torch.save({"w": torch.ones(2), "when": datetime.date(2020, 1, 1)}, d / "pytorch_model.bin")
    with pytest.raises(UntrustedPickleError, match=r"refused to unpickle the global 'datetime\.date'"):
        load_hf_folder(d)
    assert list(load_hf_folder(d, trust_pickle=True).tensors) == ["w"]

    cfg = {**llama_config(), "architectures": ["MyModel"], "auto_map": {"AutoModelForCausalLM": "m.MyModel"}}
    d = folder(tmp_path / "custom", config=json.dumps(cfg).encode(), model__safetensors="safetensors")
    notes = load_hf_folder(d).source.notes
    assert any("is custom code shipped in the folder; it was not run" in n for n in notes)


def test_a_built_architecture_is_said_and_described(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = folder(tmp_path, config=json.dumps(llama_config()).encode(), pytorch_model__bin="torch")
    safetensors_torch.save_file(llama_tensors(), str(d / "model.safetensors"))
    s = load_hf_folder(d)
    assert s.source.notes[0] == "weights: model.safetensors (safetensors)"
    assert s.source.notes[2] == "also holds pytorch_model.bin; read model.safetensors, as transformers does"
    assert s.source.notes[1].startswith(f"architecture LlamaForCausalLM built from config.json on the meta device "
                                        f"with transformers {transformers.__version__}: ")
    a = s.extra["hf"]["architecture"]
    assert (a["class"], a["transformers"], a["ties"], a["tie_word_embeddings"]) == \
        ("LlamaForCausalLM", transformers.__version__, [["lm_head.weight", "model.embed_tokens.weight"]], True)
    assert (a["input_embedding"], a["output_embedding"]) == ("model.embed_tokens.weight", "lm_head.weight")
    assert "config_tie_word_embeddings" not in s.extra["hf"]  # the architecture's own flag is reported instead
    assert isinstance(s.architecture, transformers.LlamaForCausalLM)


def test_files_saved_without_the_base_models_prefix_are_named_as_the_architecture_names_them(tmp_path):
    """A Llama saved from its base model (embed_tokens.weight, not model.embed_tokens.weight): what
    transformers loads into model.embed_tokens.weight is reported under that name."""
    pytest.importorskip("transformers")
    d = folder(tmp_path, config=json.dumps(llama_config()).encode())
    stored = {k.removeprefix("model."): v for k, v in llama_tensors().items()}
    safetensors_torch.save_file(stored, str(d / "model.safetensors"))
    s = load_hf_folder(d)
    arch_names = {"model." + k for k in stored}
    assert set(s.stored_copies) == arch_names
    assert set(s.tensors) == arch_names | {"lm_head.weight"}  # the head re-tied to the embedding


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(4, 2)
        self.head = torch.nn.Linear(2, 4, bias=False)
        self.head.weight = self.embed.weight


@pytest.mark.parametrize("sharded", [False, True])
def test_aliases_safetensors_recorded_are_left_to_the_architecture(tmp_path, sharded):
    """safetensors.torch.save_model drops a tied name and records it in __metadata__; in a folder the
    architecture re-ties (none is built here), so the name is not restored from the file."""
    d = folder(tmp_path, config=b'{"model_type": "no-such-model"}')
    name = "model-00001-of-00001.safetensors" if sharded else "model.safetensors"
    safetensors_torch.save_model(_Tied(), str(d / name))
    with safetensors_torch.safe_open(str(d / name), "pt") as f:
        stored, metadata = set(f.keys()), f.metadata()
    assert stored == {"embed.weight"}
    assert metadata == {"head.weight": "embed.weight"}  # the dropped name, as an alias of the stored one
    if sharded:
        weight_map = {n: name for n in stored}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert set(_loaded(d).tensors) == stored
