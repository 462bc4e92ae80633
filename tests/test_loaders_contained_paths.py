"""A shard or DCP data file named with a folder, an absolute path or '..' is refused unread.

Each hostile name points at a real, valid file outside the checkpoint's folder: a loader that
followed it would succeed (so "exit 2" or "missing shard" cannot stand in for the refusal). The
targets are analysed in one child interpreter with an audit hook on ``open``, so the tests also
prove the outside file was never opened, not only that the right message came back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from support.checkpoints import llama_config, write_safetensors

ROOT = Path(__file__).resolve().parents[1]

# Analyse each target under an audit hook; report the error line and every file opened under the
# test's root but outside the target's own folder (the hook also sees lazy imports: not ours).
CHILD = r"""
import json, os, sys
import tiecheck
from tiecheck.errors import TiecheckError
root, cases = json.loads(sys.argv[1])
root = os.path.realpath(root) + os.sep
opened = []
sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) else None)
out = {}
for name, (target, folder) in cases.items():
    opened.clear()
    try:
        tiecheck.analyze(target)
        error = None
    except TiecheckError as e:
        error = str(e)
    folder = os.path.realpath(folder)
    real = {os.path.realpath(os.fsdecode(p)) for p in opened}
    outside = sorted(p for p in real if p.startswith(root) and not p.startswith(folder + os.sep))
    out[name] = {"error": error, "outside": outside}
print(json.dumps(out))
"""

TENSORS = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b.weight": torch.ones(3)}


def _index_case(root: Path, case: str, shard_of_b: str, *, hf: bool) -> tuple[Path, Path]:
    """A folder whose index puts b.weight in ``shard_of_b``; a valid shard holding it lies there."""
    folder = root / case / "ckpt"
    folder.mkdir(parents=True)
    write_safetensors(folder / "model-00001-of-00002.safetensors", {"a.weight": TENSORS["a.weight"]})
    # The file the hostile name resolves to exists and is valid: following it would succeed.
    resolved = Path(shard_of_b) if Path(shard_of_b).is_absolute() else folder / shard_of_b
    resolved.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(resolved, {"b.weight": TENSORS["b.weight"]})
    index_name = "model.safetensors.index.json"
    (folder / index_name).write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": shard_of_b}}))
    if hf:
        (folder / "config.json").write_text(json.dumps(llama_config()))
        return folder, folder
    return folder / index_name, folder


def _dcp_case(root: Path, case: str, rel_of: str) -> tuple[Path, Path]:
    """A DCP folder whose metadata names data file ``rel_of``; a copy of the real one lies there, so
    following the name would succeed (the original stays: a DCP folder is known by its .distcp)."""
    folder = root / case / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no process group is initialised
        dcp.save(dict(TENSORS), checkpoint_id=str(folder))
    (data,) = folder.glob("*.distcp")
    resolved = Path(rel_of) if Path(rel_of).is_absolute() else folder / rel_of
    resolved.parent.mkdir(parents=True, exist_ok=True)
    resolved.write_bytes(data.read_bytes())
    md = pickle.loads((folder / ".metadata").read_bytes())  # written just above by dcp.save: trusted
    md.storage_data = {k: dataclasses.replace(v, relative_path=rel_of) for k, v in md.storage_data.items()}
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    return folder, folder


def _cases(root: Path) -> dict[str, tuple[Path, Path, str]]:
    """case -> (target, its folder, the hostile name)."""
    outside = root / "elsewhere"
    cases = {}
    for kind in ("absolute", "subfolder", "dotdot", "dotdot-inside"):
        for hf in (False, True):
            case = f"{'hf-folder' if hf else 'index'}-{kind}"
            name = {"absolute": str(outside / f"{case}.safetensors"), "subfolder": "sub/b.safetensors",
                    "dotdot": "../b.safetensors", "dotdot-inside": "sub/../../b.safetensors"}[kind]
            cases[case] = (*_index_case(root, case, name, hf=hf), name)
    for kind in ("absolute", "subfolder", "dotdot"):
        name = {"absolute": str(outside / "dcp-absolute.distcp"), "subfolder": "sub/__0_0.distcp",
                "dotdot": "../__0_0.distcp"}[kind]
        cases[f"dcp-{kind}"] = (*_dcp_case(root, f"dcp-{kind}", name), name)
    # A plain name, with the folder handed to the child set elsewhere: proves the hook sees opens.
    folder = root / "followed"
    folder.mkdir()
    write_safetensors(folder / "x.safetensors", {"b.weight": TENSORS["b.weight"]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"b.weight": "x.safetensors"}}))
    cases["followed"] = (folder / "model.safetensors.index.json", root / "nowhere", "x.safetensors")
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("contained")
    cases = _cases(root)
    arg = json.dumps([str(root), {k: (str(t), str(f)) for k, (t, f, _) in cases.items()}])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("COVERAGE_PROCESS_START", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: (cases[k], out[k]) for k in cases}


INDEX_CASES = [f"{w}-{k}" for w in ("index", "hf-folder") for k in ("absolute", "subfolder", "dotdot", "dotdot-inside")]


@pytest.mark.parametrize("case", INDEX_CASES)
def test_shard_outside_the_folder_is_refused_unopened(results, case):
    (target, _folder, name), got = results[case]
    index = target if target.is_file() else target / "model.safetensors.index.json"
    assert got["error"] == (f"{index}: the index names shard {name!r}, which lies outside its folder; "
                            f"refusing to read it (shards must sit next to the index)")
    assert got["outside"] == []


@pytest.mark.parametrize("case", ["dcp-absolute", "dcp-subfolder", "dcp-dotdot"])
def test_dcp_data_file_outside_the_folder_is_refused_unopened(results, case):
    (target, _folder, name), got = results[case]
    assert got["error"] == f"{target / '.metadata'}: names data file {name!r}, which lies outside the checkpoint folder"
    assert got["outside"] == []


def test_the_hook_sees_a_followed_name(results):
    """The audit hook is live: a plain shard name, whose folder is reported as elsewhere, is seen opened."""
    (target, _folder, name), got = results["followed"]
    assert got["error"] is None
    assert os.path.realpath(target.parent / name) in got["outside"]
