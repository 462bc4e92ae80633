"""The layouts ``tiecheck fix`` writes, and which one a target is (before anything is read)."""

from __future__ import annotations

from pathlib import Path

from tiecheck.errors import TiecheckError
from tiecheck.loaders import detect
from tiecheck.loaders.formats.hf import find_weights

# The layouts a corrected copy can be written in.
SAFETENSORS, SHARDED, HF_FOLDER, TORCH = "safetensors", "sharded safetensors", "Hugging Face folder", "torch.save"


def layout_of(path: Path) -> tuple[str, Path]:
    """(layout, the weights file) of a target path the writers handle."""

    if path.is_dir():
        if detect.is_hf_folder(path):
            kind, weights, _ = find_weights(path)
            if kind == detect.WEIGHTS_INDEX and not weights.name.endswith(".safetensors.index.json"):
                kind = "torch index"
            if kind not in (detect.SAFETENSORS, detect.WEIGHTS_INDEX):
                raise TiecheckError(f"{path}: its weights ({weights.name}) are not safetensors; fix writes Hugging "
                                    f"Face folders of safetensors weights (convert with save_pretrained first)")
            return HF_FOLDER, weights
        raise TiecheckError(f"{path}: a folder without config.json; give fix the weight file or its *.index.json")
    kind = detect.sniff_file(path)
    if kind == detect.SAFETENSORS:
        return SAFETENSORS, path
    if kind == detect.WEIGHTS_INDEX:
        index = detect.read_weights_index(path) or {}
        shards = set((index.get("weight_map") or {}).values())
        if not shards or not all(isinstance(s, str) and s.endswith(".safetensors") for s in shards):
            raise TiecheckError(f"{path}: fix rewrites indexes of safetensors shards only")
        return SHARDED, path
    if kind == detect.TORCH_SAVE:
        return TORCH, path
    raise TiecheckError(f"{path}: a {kind or 'unrecognised'} file; fix writes safetensors files, sharded "
                        f"safetensors, torch.save (zip) files and Hugging Face folders")
