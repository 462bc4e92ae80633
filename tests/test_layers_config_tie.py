"""TC011: the config's ``tie_word_embeddings`` held against the architecture and the files.

Neither check here needs transformers: the architecture is described by hand (what
``build_architecture`` returns), and the files-only check runs as it does without the extra.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import tiecheck
from tiecheck.loaders.hf_architecture import Architecture
from tiecheck.loaders.hf_reconcile import config_vs_files, reconcile

from support.checkpoints import llama_config, llama_tensors, write_safetensors

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _arch(tied: bool) -> Architecture:
    keys = [*list(llama_tensors()), HEAD]
    return Architecture(name="LlamaForCausalLM", keys=keys, groups=[tuple(sorted((EMB, HEAD)))] if tied else [],
                        declared={HEAD: EMB} if tied else {}, prefix="model", tie_word_embeddings=None,
                        input_embedding=EMB, output_embedding=HEAD, version="hand-made")


def _tc011(findings) -> list[tuple[str, list[str]]]:
    return [(f.message, list(f.names)) for f in findings if f.code == "TC011"]


@pytest.mark.parametrize(("cfg_tie", "arch_tied", "says"), [
    (True, False, "does not tie"),
    (False, True, "ties"),
])
def test_config_disagreeing_with_the_architecture(cfg_tie, arch_tied, says):
    files = llama_tensors()
    files[HEAD] = files[EMB] if arch_tied else torch.randn(16, 8)
    findings = reconcile(files, _arch(arch_tied), cfg_tie)[1]
    assert _tc011(findings) == [(f"config.json says tie_word_embeddings={str(cfg_tie).lower()}, but LlamaForCausalLM "
                                 f"{says} {HEAD} to {EMB}", [HEAD, EMB])]


@pytest.mark.parametrize("tied", [True, False])
def test_config_agreeing_with_the_architecture_is_silent(tied):
    files = llama_tensors()
    files[HEAD] = files[EMB] if tied else torch.randn(16, 8)
    assert _tc011(reconcile(files, _arch(tied), tied)[1]) == []


def _different_head(files: dict) -> dict:
    head = files[EMB].clone()
    head[3, 5] += 1.0  # one element: same shape and dtype, different content
    return {**files, HEAD: head}


def test_config_tied_but_files_store_different_heads():
    files = _different_head(llama_tensors())
    assert _tc011(config_vs_files(files, {"tie_word_embeddings": True})) == [(
        f"config.json says tie_word_embeddings=true, but the files store {EMB} and {HEAD} with different content: "
        f"engines that trust the config serve the embedding as the output projection", [HEAD, EMB])]
    # Equal content (a tie saved twice) or an untied config: nothing to say.
    assert config_vs_files({**files, HEAD: files[EMB].clone()}, {"tie_word_embeddings": True}) == []
    assert config_vs_files(files, {"tie_word_embeddings": False}) == []


def test_hf_folder_without_transformers_flags_different_heads(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(llama_config()))  # tie_word_embeddings: true
    write_safetensors(folder / "model.safetensors", _different_head(llama_tensors()))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as without the hf extra
    r = tiecheck.analyze(str(folder))
    assert r.extra["hf"]["architecture"] is None
    # Without transformers the flat config is still held against the files: the declared layer says
    # it (declared tied, stored different: TC015), once; the loader's own TC011 would repeat it.
    assert [(f.code, sorted(f.names)) for f in r.findings if f.code in ("TC011", "TC015")] == \
        [("TC015", sorted([HEAD, EMB]))]
    assert r.exit_code("error") == 1
