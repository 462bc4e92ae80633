"""A weights file inside a Hugging Face folder: say the folder's config declares ties, point at the folder."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from tiecheck.cli import main

from support.checkpoints import write_safetensors, write_sharded

TENSORS = {"transformer.wte.weight": torch.randn(11, 4), "transformer.ln_f.weight": torch.randn(4)}


def _folder(tmp_path, config: dict):
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("sharded", [False, True])
def test_a_weights_file_of_a_tied_folder_points_at_the_folder(tmp_path, sharded):
    folder = _folder(tmp_path, {"model_type": "gpt2", "tie_word_embeddings": True})
    if sharded:
        write_sharded(folder, TENSORS)
        target = folder / "model.safetensors.index.json"
    else:
        target = write_safetensors(folder / "model.safetensors", TENSORS)
    res = CliRunner().invoke(main, ["inspect", str(target), "--no-flops"])
    assert res.exit_code == 0, res.output
    assert "Tie groups (0)" in res.output
    assert (f"  {target.name} is part of the Hugging Face folder {folder}, whose config.json declares "
            f"tie_word_embeddings=true: ties the architecture makes on load are not in this file; inspect the "
            f"folder to check them: tiecheck inspect {folder}") in res.output


def test_a_folder_whose_config_says_untied_gets_a_milder_note(tmp_path):
    folder = _folder(tmp_path, {"model_type": "llama", "tie_word_embeddings": False})
    target = write_safetensors(folder / "model.safetensors", TENSORS)
    res = CliRunner().invoke(main, ["inspect", str(target), "--no-flops", "--format", "json"])
    notes = json.loads(res.output)["source"]["notes"]
    assert notes[0] == (f"model.safetensors is part of the Hugging Face folder {folder}, whose config.json describes "
                     f"the architecture (model_type llama); inspect the folder to check it against the files: "
                     f"tiecheck inspect {folder}")


def test_a_file_outside_any_folder_with_a_config_has_no_note(tmp_path):
    target = write_safetensors(tmp_path / "model.safetensors", TENSORS)
    res = CliRunner().invoke(main, ["inspect", str(target), "--no-flops", "--format", "json"])
    notes = json.loads(res.output)["source"]["notes"]
    assert len(notes) == 1
    assert "Hugging Face folder" not in notes[0]
