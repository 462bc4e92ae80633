"""The architecture a folder's config.json builds, with what a hostile config may make it do bounded:
only a transformers ``PreTrainedModel`` named by a plain identifier is built, the build stops once it
registers far more tensors or modules than the files hold, custom code is not run unless asked, and
every failure to build is a note, never an error. Configs are transformers' own ``LlamaConfig``."""

from __future__ import annotations

import json
import sys
import threading
import warnings

import pytest
import torch

from support.checkpoints import llama_config

transformers = pytest.importorskip("transformers")

from tiecheck.loaders.hf_architecture import (  # noqa: E402 - after the importorskip
    ArchitectureTooLarge,
    architecture_class,
    build_architecture,
    quiet_transformers,
    registration_budget,
    tensor_budget,
)

LLAMA_TENSORS = 12  # a one-layer Llama's state_dict with its tied head


def config_folder(tmp_path, **changes):
    d = tmp_path / "m"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**llama_config(), **changes}))
    return d, {**llama_config(), **changes}


# -- which class a name may build -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Trainer", "LlamaConfig", "AutoModel", "NoSuchModel", "Llama ForCausalLM",
                                  "transformers.LlamaForCausalLM", "L" * 201, 7, None])
def test_only_a_pretrained_model_named_by_a_plain_identifier(name):
    assert architecture_class(transformers, name) is None


def test_a_model_class_is_taken():
    assert architecture_class(transformers, "LlamaForCausalLM") is transformers.LlamaForCausalLM
    assert architecture_class(transformers, "LlamaModel") is transformers.LlamaModel


def test_a_config_naming_a_trainer_builds_its_model_types_class(tmp_path):
    d, cfg = config_folder(tmp_path, architectures=["Trainer", "LlamaModel"])
    arch, notes = build_architecture(d, cfg)
    assert (arch.name, notes) == ("LlamaModel", [])  # the first name that is a model
    d, cfg = config_folder(tmp_path / "b", architectures=["Trainer"])
    arch, _ = build_architecture(d, cfg)
    # AutoModelForCausalLM's class for model_type llama; Trainer is never called
    assert arch.name == transformers.AutoModelForCausalLM._model_mapping[transformers.LlamaConfig].__name__
    assert isinstance(arch.module, transformers.LlamaForCausalLM)


# -- the registration budget ------------------------------------------------------------------------

def test_the_budget_is_eight_tensors_a_stored_one_and_4096():
    assert [tensor_budget(n) for n in (0, 1, 1000)] == [4096, 4104, 12096]


def test_registrations_past_the_limit_abort_the_build():
    with registration_budget(3, 1):
        m = torch.nn.Module()
        for i in range(3):
            m.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(1)))
        with pytest.raises(ArchitectureTooLarge, match=r"config\.json describes more than 3 tensors, the files "
                                                       r"hold 1 tensors"):
            m.register_buffer("b", torch.zeros(1))
    with registration_budget(2, 5):
        m = torch.nn.Module()
        m.add_module("m0", torch.nn.Module())
        m.add_module("m1", torch.nn.Module())
        with pytest.raises(ArchitectureTooLarge, match="more than 2 modules, the files hold 5"):
            m.add_module("m2", torch.nn.Module())


def test_the_hooks_are_removed_and_other_threads_do_not_count():
    done = []

    def other():
        m = torch.nn.Module()
        for i in range(5):
            m.register_buffer(f"b{i}", torch.zeros(1))
        done.append(len(list(m.buffers())))

    with registration_budget(1, 1):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert done == [5]
    m = torch.nn.Module()  # after the block: no limit
    for i in range(5):
        m.register_buffer(f"b{i}", torch.zeros(1))


def test_a_config_describing_far_more_layers_than_the_files_hold(tmp_path):
    d, cfg = config_folder(tmp_path, num_hidden_layers=100_000)
    arch, notes = build_architecture(d, cfg, stored=LLAMA_TENSORS)
    assert arch is None
    assert notes == [f"the architecture was not built: config.json describes more than "
                     f"{8 * LLAMA_TENSORS + 4096:,} modules, the files hold {LLAMA_TENSORS:,} tensors, so "
                     f"config.json does not describe these files; analysed the files alone"]
    arch, notes = build_architecture(*config_folder(tmp_path / "b"), stored=LLAMA_TENSORS)
    assert (arch.name, notes) == ("LlamaForCausalLM", [])


# -- what is not built --------------------------------------------------------------------------

def test_custom_code_is_not_run_unless_asked(tmp_path):
    d, cfg = config_folder(tmp_path, architectures=["MyModel"], auto_map={"AutoModelForCausalLM": "m.MyModel"})
    arch, notes = build_architecture(d, cfg)
    assert arch is None
    assert notes == ["the architecture (MyModel) is custom code shipped in the folder; it was not run. Rerun with "
                     "--trust-remote-code to build it and check its ties (that runs the folder's Python files); "
                     "analysed the files alone"]
    d, cfg = config_folder(tmp_path / "b", auto_map={"AutoModelForCausalLM": "m.MyModel"})
    arch, notes = build_architecture(d, cfg)  # a transformers class is named: auto_map is not needed
    assert (arch.name, notes) == ("LlamaForCausalLM", [])


def test_a_config_transformers_cannot_build_is_a_note(tmp_path):
    d, cfg = config_folder(tmp_path, hidden_size=7)  # not divisible by its 2 heads
    arch, notes = build_architecture(d, cfg)
    assert arch is None
    (note,) = notes
    assert note.startswith(f"could not build the architecture from config.json with transformers "
                           f"{transformers.__version__} (")
    assert note.endswith("; analysed the files alone")
    assert "--trust-remote-code" not in note


def test_the_tie_of_the_built_model(tmp_path):
    arch, _ = build_architecture(*config_folder(tmp_path))
    assert arch.groups == [("lm_head.weight", "model.embed_tokens.weight")]
    assert (arch.input_embedding, arch.output_embedding) == ("model.embed_tokens.weight", "lm_head.weight")
    assert arch.tie_word_embeddings is True
    assert arch.declared == {"lm_head.weight": "model.embed_tokens.weight"}
    assert arch.mapping_known is True
    assert (arch.prefix, arch.version) == ("model", transformers.__version__)
    assert arch.group_of("lm_head.weight") == ("lm_head.weight", "model.embed_tokens.weight")
    assert arch.group_of("model.norm.weight") is None
    untied, _ = build_architecture(*config_folder(tmp_path / "b", tie_word_embeddings=False))
    assert untied.groups == []
    assert untied.tie_word_embeddings is False


# -- without transformers, and its logging --------------------------------------------------------

def test_without_transformers_the_files_are_analysed_alone(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when absent
    assert build_architecture(*config_folder(tmp_path)) == (
        None, ["architecture ties need transformers: pip install tiecheck[hf]; analysed the files alone (ties the "
               "architecture re-creates on load are not shown)"])


def test_transformers_logging_and_warnings_are_quiet_while_building_and_restored_after():
    tlog = transformers.utils.logging
    before = tlog.get_verbosity()
    tlog.set_verbosity_info()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with quiet_transformers():
                assert tlog.get_verbosity() == tlog.ERROR
                warnings.warn("noise", UserWarning, stacklevel=1)
            assert tlog.get_verbosity() == tlog.INFO
        assert seen == []
    finally:
        tlog.set_verbosity(before)
