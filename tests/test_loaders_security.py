"""Hostile files: pickles that would run a command, import a module or write a file, in every place a
checkpoint can hide one. Without an opt-in flag none runs, the error names what was refused, and the
inputs (made read-only, as a downloaded cache would be) are left exactly as they were.

Every payload is checked to be live first: unpickled by plain ``pickle`` it does create its marker
file, so a test that sees no marker proves tiecheck refused it, not that the payload was inert.
"""

from __future__ import annotations

import builtins
import importlib
import json
import os
import pickle
import re
import subprocess
import sys
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner

from tiecheck.cli import main

from support.checkpoints import (
    llama_config,
    llama_tensors,
    rewrite_zip_entry,
    set_field,
    set_read_only,
    snapshot,
    tiny_state_dict,
    write_safetensors,
    write_sharded,
    zip_structure,
)

# -- payloads ------------------------------------------------------------------------------------

class Payload:
    """Unpickling calls ``func(*args)``, which creates ``marker``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Command:
    """Reduces to a string built at load time: the nested __reduce__ inside another one's arguments."""

    def __init__(self, text: str):
        self.text = text

    def __reduce__(self):
        return str, (self.text,)


MARKER_MODULE = "tiecheck_security_marker"


def payloads(marker: Path) -> dict[str, tuple[object, str]]:
    """name -> (an object whose unpickling creates ``marker``, the global the refusal must name)."""
    touch = f"touch {marker}"
    write = f"open({str(marker)!r}, 'w').close()"
    nested = {"layer": OrderedDict(scale=[0.5, 2.0], extra=[(1, Payload(os.system, (Command(touch),)))])}
    return {
        "os.system": (Payload(os.system, (touch,)), os.system.__module__ + ".system"),  # posix.system on Linux
        "subprocess.Popen": (Payload(subprocess.Popen, (["touch", str(marker)],)), "subprocess.Popen"),
        "subprocess.check_output": (Payload(subprocess.check_output, (["touch", str(marker)],)),
                                    "subprocess.check_output"),
        "builtins.exec": (Payload(builtins.exec, (write,)), "builtins.exec"),
        "builtins.eval": (Payload(builtins.eval, (write.replace("open(", "(open(") + ")",)), "builtins.eval"),
        "importlib.import_module": (Payload(importlib.import_module, (MARKER_MODULE,)), "importlib.import_module"),
        "nested __reduce__ in a container": (nested, os.system.__module__ + ".system"),
    }


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Folders: inputs (made read-only for the run), a writable marker folder, an empty working folder."""
    inputs, marks, cwd = tmp_path / "inputs", tmp_path / "marks", tmp_path / "cwd"
    for d in (inputs, marks, cwd):
        d.mkdir()
    # The module importlib.import_module would import: importing it writes the marker.
    (marks / f"{MARKER_MODULE}.py").write_text(f"open({str(marks / 'MARKER')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(marks))
    monkeypatch.chdir(cwd)
    yield inputs, marks / "MARKER", cwd
    set_read_only(inputs, False)  # pytest must be able to remove tmp_path
    sys.modules.pop(MARKER_MODULE, None)


def assert_live(obj, marker: Path) -> None:
    """The payload does what it says when unpickled without restrictions."""
    assert not marker.exists()
    result = pickle.loads(pickle.dumps(obj, protocol=2))
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert marker.exists(), "the payload itself is inert: the test would prove nothing"
    marker.unlink()
    sys.modules.pop(MARKER_MODULE, None)


def run_read_only(inputs: Path, target: Path, cwd: Path, *args: str):
    """tiecheck inspect on a read-only copy; asserts the inputs and the working folder are untouched."""
    before = snapshot(inputs)
    set_read_only(inputs, True)
    try:
        res = CliRunner().invoke(main, ["inspect", str(target), "--no-flops", *args])
    finally:
        set_read_only(inputs, False)
    assert snapshot(inputs) == before, "the input changed"
    assert list(cwd.iterdir()) == [], "files appeared in the working folder"
    return res


def assert_refused(res, marker: Path, names: str) -> None:
    assert not marker.exists(), "the payload ran"
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("tiecheck: error: "), res.stderr
    assert names in res.stderr, res.stderr
    assert "--trust-pickle" in res.stderr, res.stderr


# -- placements: where a checkpoint can hide a payload ------------------------------------------------

def as_state_dict_value(d: Path, evil) -> Path:
    torch.save({**tiny_state_dict(), "evil": evil}, d / "model.pt")
    return d / "model.pt"


def in_training_checkpoint(d: Path, evil) -> Path:
    torch.save({"model": tiny_state_dict(), "optimizer": {"state": {0: {"step": evil}}, "param_groups": []},
                "epoch": 3}, d / "ckpt.pt")
    return d / "ckpt.pt"


def legacy_file(d: Path, evil) -> Path:
    torch.save({**tiny_state_dict(), "evil": evil}, d / "old.pt", _use_new_zipfile_serialization=False)
    return d / "old.pt"


def hand_edited_data_pkl(d: Path, evil, protocol: int = 2) -> Path:
    """A valid torch.save zip whose data.pkl was replaced by a hand-written pickle."""
    good = d / "good.pt"
    torch.save(tiny_state_dict(), good)
    rewrite_zip_entry(good, d / "edited.pt", "data.pkl", pickle.dumps({"embed.weight": evil}, protocol=protocol))
    good.unlink()
    return d / "edited.pt"


def hf_folder_bin(d: Path, evil) -> Path:
    folder = d / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    "vocab_size": 8, "hidden_size": 4}))
    torch.save({**tiny_state_dict(), "evil": evil}, folder / "pytorch_model.bin")
    return folder


def folder_bin_without_config(d: Path, evil) -> Path:
    folder = d / "weights"
    folder.mkdir()
    torch.save({**tiny_state_dict(), "evil": evil}, folder / "pytorch_model.bin")
    return folder


def sharded_bin(d: Path, evil) -> Path:
    """pytorch_model.bin.index.json naming two shards; the second one is hostile."""
    folder = d / "sharded"
    folder.mkdir()
    sd = tiny_state_dict()
    torch.save({"embed.weight": sd["embed.weight"]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"block.weight": sd["block.weight"], "evil": evil}, folder / "pytorch_model-00002-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "embed.weight": "pytorch_model-00001-of-00002.bin", "block.weight": "pytorch_model-00002-of-00002.bin"}}))
    return folder


def dcp_metadata(d: Path, evil) -> Path:
    folder = d / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(evil, protocol=2))
    (folder / "__0_0.distcp").write_bytes(b"\0" * 64)
    return folder


PLACEMENTS = {
    "state-dict value": as_state_dict_value,
    "training checkpoint": in_training_checkpoint,
    "legacy torch.save": legacy_file,
    "hand-edited data.pkl": hand_edited_data_pkl,
    "hand-edited data.pkl, protocol 4": lambda d, evil: hand_edited_data_pkl(d, evil, protocol=4),
    "HF folder .bin": hf_folder_bin,
    "folder .bin without config.json": folder_bin_without_config,
    "sharded .bin": sharded_bin,
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("payload", list(payloads(Path("m"))))
def test_payload_never_runs_and_the_refusal_names_it(env, placement, payload):
    inputs, marker, cwd = env
    evil, refused = payloads(marker)[payload]
    if placement == "state-dict value":  # prove each payload live once; the others reuse it
        assert_live(evil, marker)
    target = PLACEMENTS[placement](inputs, evil)
    res = run_read_only(inputs, target, cwd)
    assert_refused(res, marker, f"'{refused}'")


@pytest.mark.parametrize("payload", list(payloads(Path("m"))))
def test_dcp_metadata_payload_is_refused(env, payload):
    inputs, marker, cwd = env
    evil, refused = payloads(marker)[payload]
    res = run_read_only(inputs, dcp_metadata(inputs, evil), cwd)
    assert not marker.exists()
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1, res.output
    # DCP metadata holds only metadata classes: the first global that is not one is named
    assert f"refused to unpickle '{refused}'" in res.stderr, res.stderr
    assert ".metadata" in res.stderr, res.stderr


def test_refusal_gives_the_byte_offset_in_data_pkl(env):
    inputs, marker, cwd = env
    evil, _ = payloads(marker)["os.system"]
    target = as_state_dict_value(inputs, evil)
    res = run_read_only(inputs, target, cwd)
    with zipfile.ZipFile(target) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
        pkl = z.read(info)
    where = int(res.stderr.split("data.pkl, byte ")[1].split(" ")[0].replace(",", ""))
    local = target.read_bytes()[info.header_offset:info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    # the offset points at the GLOBAL opcode naming the function, inside data.pkl
    assert pkl[where - start:where - start + 1] == b"c"
    assert b"system" in pkl[where - start:where - start + 40]


# -- archives that carry pickles besides the state: .pt2 and TorchScript ------------------------------

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.embed(x))


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    d = tmp_path_factory.mktemp("archives")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; its files are still downloaded
        torch.export.save(torch.export.export(_Tiny(), (torch.tensor([[1, 2]]),)), d / "tiny.pt2")
        torch.jit.save(torch.jit.script(_Tiny()), d / "scripted.pt")
    return d


def _pt2_with_pickled_weight(src: Path, dst: Path, evil) -> None:
    """The first weight becomes a pickled entry (as tensor subclasses are stored) holding the payload."""
    with zipfile.ZipFile(src) as z:
        cfg_name = next(n for n in z.namelist() if n.endswith("_weights_config.json"))
        cfg = json.loads(z.read(cfg_name))
    entry = next(iter(cfg["config"].values()))
    entry["use_pickle"] = True
    record = entry["path_name"]
    payload = dst.with_suffix(".payload")
    torch.save(evil, payload)
    tmp = dst.with_suffix(".tmp")
    rewrite_zip_entry(src, tmp, cfg_name, json.dumps(cfg).encode())
    rewrite_zip_entry(tmp, dst, f"/data/weights/{record}", payload.read_bytes())
    tmp.unlink()
    payload.unlink()


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "nested __reduce__ in a container"])
def test_pt2_pickled_weight_payload_is_refused(env, archives, payload):
    inputs, marker, cwd = env
    evil, refused = payloads(marker)[payload]
    target = inputs / "evil.pt2"
    _pt2_with_pickled_weight(archives / "tiny.pt2", target, evil)
    res = run_read_only(inputs, target, cwd)
    assert_refused(res, marker, f"'{refused}'")
    assert "record data/weights/" in res.stderr


def test_pt2_sample_inputs_and_custom_objects_are_never_unpickled(env, archives):
    inputs, marker, cwd = env
    evil, _ = payloads(marker)["os.system"]
    target = inputs / "evil.pt2"
    rewrite_zip_entry(archives / "tiny.pt2", target, "/data/sample_inputs/model.pt", pickle.dumps(evil))
    res = run_read_only(inputs, target, cwd)
    assert res.exit_code == 0, res.output
    assert not marker.exists(), res.output


@pytest.mark.parametrize("record", ["data.pkl", "constants.pkl"])
def test_torchscript_archive_with_payload_is_refused_whole(env, archives, record):
    inputs, marker, cwd = env
    evil, _ = payloads(marker)["os.system"]
    target = inputs / "scripted.pt"
    rewrite_zip_entry(archives / "scripted.pt", target, f"/{record}", pickle.dumps(evil, protocol=2))
    res = run_read_only(inputs, target, cwd)
    assert not marker.exists()
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1, res.output
    assert "TorchScript archive" in res.stderr
    assert "--trust-pickle" in res.stderr


# -- what the opt-ins do -------------------------------------------------------------------------------

def test_trust_pickle_is_what_lets_the_payload_run(env):
    """The control: with the opt-in, the same file does run its code (and tiecheck warned first)."""
    inputs, marker, _cwd = env
    evil, _ = payloads(marker)["os.system"]
    target = as_state_dict_value(inputs, evil)
    res = CliRunner().invoke(main, ["inspect", str(target), "--no-flops", "--trust-pickle"])
    assert marker.exists()
    assert "tiecheck: warning: --trust-pickle lets the file's pickled objects run code" in res.stderr


def test_legacy_files_load_safely_without_mmap(env):
    inputs, _marker, cwd = env
    path = inputs / "old.pt"
    torch.save(tiny_state_dict(), path, _use_new_zipfile_serialization=False)
    res = run_read_only(inputs, path, cwd, "--format", "json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert "legacy (non-zip) torch.save format: loaded without memory mapping" in report["source"]["notes"]
    assert [g["names"] for g in report["tie_groups"]] == [["embed.weight", "head.weight"]]


@pytest.fixture
def plain_targets(tmp_path):
    a = write_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    b = write_safetensors(tmp_path / "b.safetensors", {"w": torch.ones(2)})
    return a, b


@pytest.mark.parametrize(("flag", "warning"), [
    ("--trust-pickle", "--trust-pickle lets the file's pickled objects run code"),
    ("--trust-remote-code", "--trust-remote-code runs the model folder's Python code"),
])
def test_each_opt_in_warns_in_inspect_and_diff(plain_targets, flag, warning):
    a, b = plain_targets
    for args in (["inspect", str(a), "--no-flops", flag], ["diff", str(a), str(b), flag]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        assert f"tiecheck: warning: {warning}" in res.stderr, (args, res.stderr)
        assert "warning" not in CliRunner().invoke(main, [a for a in args if a != flag]).stderr


@pytest.mark.parametrize(("flag", "key", "warning"), [
    ("--trust-pickle", "trust-pickle", "trust-pickle lets the file's pickled objects run code"),
    ("--trust-remote-code", "trust-remote-code", "trust-remote-code runs the model folder's Python code"),
])
def test_each_opt_in_warns_in_check_from_the_command_line_and_the_policy(tmp_path, plain_targets, monkeypatch,
                                                                         flag, key, warning):
    a, _ = plain_targets
    res = CliRunner().invoke(main, ["check", str(a), "--no-config", flag])
    assert res.exit_code == 0, res.output
    assert f"tiecheck: warning: {warning}" in res.stderr, res.output
    (tmp_path / "pyproject.toml").write_text(f'[tool.tiecheck]\n[[tool.tiecheck.targets]]\ntarget = "{a.name}"\n'
                                             f"{key} = true\n")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["check"])
    assert res.exit_code == 0, res.output
    assert f"tiecheck: warning: {warning}" in res.stderr, res.output


# -- broken files inside large folders: the error says which file and where ----------------------------

def _many_safetensors_shards(d: Path) -> tuple[Path, str]:
    sd = {f"layers.{i}.weight": torch.full((4,), float(i)) for i in range(16)}
    index = write_sharded(d / "ckpt", sd, shards=8)
    shard = d / "ckpt" / "model-00005-of-00008.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[9] = ord("!")  # the first name's opening quote, in the JSON header
    shard.write_bytes(bytes(blob))
    return index.parent, r"model-00005-of-00008\.safetensors: not a valid safetensors file: .* near byte 9 of the file"


def _many_bin_shards(d: Path) -> tuple[Path, str]:
    folder = d / "bins"
    folder.mkdir()
    weight_map = {}
    for i in range(6):
        name = f"pytorch_model-{i + 1:05d}-of-00006.bin"
        torch.save({f"layers.{i}.weight": torch.ones(4)}, folder / name)
        weight_map[f"layers.{i}.weight"] = name
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shard = folder / "pytorch_model-00004-of-00006.bin"
    with zipfile.ZipFile(shard) as z:
        i, info = next((i, info) for i, info in enumerate(z.infolist()) if info.filename.endswith("data/0"))
    method = next(f for f in zip_structure(shard.read_bytes()).fields if f.where == f"central[{i}].method")
    shard.write_bytes(set_field(shard.read_bytes(), method, 99))  # what the directory says the record uses
    return folder, (rf"pytorch_model-00004-of-00006\.bin: record '.*/data/0' \(local header at byte "
                    rf"{info.header_offset:,}\) uses compression method 99")


def _dcp_chunk_past_the_end(d: Path) -> tuple[Path, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({f"layers.{i}.weight": torch.ones(4) for i in range(12)}, checkpoint_id=str(d / "dcp"))
    data = next((d / "dcp").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-100])
    return d / "dcp", rf"{data.name}: .metadata places a chunk at bytes [\d,]+-[\d,]+ but the file holds"


@pytest.mark.parametrize("make", [_many_safetensors_shards, _many_bin_shards, _dcp_chunk_past_the_end])
def test_a_failure_inside_a_large_folder_names_the_file_and_where(tmp_path, make):
    target, pattern = make(tmp_path)
    res = CliRunner().invoke(main, ["inspect", str(target), "--no-flops"])
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1, res.output
    assert re.search(pattern, res.stderr), res.stderr


def test_names_from_a_file_cannot_break_lines_or_reach_the_terminal(tmp_path):
    """A tensor name holding a newline and an ANSI escape: the table escapes it, JSON keeps it exact."""

    name = "emb\x1b]0;owned\x07\x1b[31m\nhead"
    w = torch.arange(4.0)
    path = write_safetensors(tmp_path / "m.safetensors", {name: w, "copy": w.clone()})
    for fmt in ("table", "markdown"):
        out = CliRunner().invoke(main, ["inspect", str(path), "--no-flops", "--format", fmt]).stdout
        assert "\x1b" not in out
        assert "\x07" not in out
        shown = r"emb\x1b]0;owned\x07\x1b[31m\x0ahead"
        # Markdown escapes the backslashes and brackets of the escaped name once more
        assert (shown.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]") if fmt == "markdown"
                else shown) in out
    report = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--no-flops", "--format", "json"]).stdout)
    assert report["untied_duplicates"][0]["names"] == sorted(["copy", name])


def test_a_config_claiming_a_million_layers_is_not_built(tmp_path):
    """Building it on the meta device would take minutes and gigabytes; the files hold 11 tensors."""
    pytest.importorskip("transformers")

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**llama_config(), "num_hidden_layers": 10 ** 6}))
    write_safetensors(folder / "model.safetensors", llama_tensors())
    res = CliRunner().invoke(main, ["inspect", str(folder), "--no-flops", "--format", "json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["hf"]["architecture"] is None
    assert any("config.json does not describe these files" in n and "the files hold 11 tensors" in n
               for n in report["source"]["notes"])


# -- state and trust: what a file may make tiecheck build ------------------------------------------

_DCP_META = "torch.distributed.checkpoint.metadata"
# Ends with BUILD on DCP's Metadata class itself, with a slot state: unpickled, it sets
# Metadata.__setstate__ (to another metadata class), so every later DCP read in the process fails.
POISONED_METADATA = (b"\x80\x02" + f"c{_DCP_META}\nMetadata\n".encode() + b"N}(X\x0c\x00\x00\x00__setstate__"
                     + f"c{_DCP_META}\nChunkStorageMetadata\n".encode() + b"u\x86b.")


def test_a_poisoned_dcp_metadata_cannot_change_a_later_clean_read(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader  # noqa: PLC0415 - only this test needs DCP's reader
    from torch.distributed.checkpoint.metadata import Metadata  # noqa: PLC0415 - idem

    import tiecheck  # noqa: PLC0415 - the API, as the pytest plugin and check over several targets use it

    clean, poisoned = tmp_path / "clean", tmp_path / "poisoned"
    for d in (clean, poisoned):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"w": torch.ones(4)}, checkpoint_id=str(d))
    (poisoned / ".metadata").write_bytes(POISONED_METADATA)
    # Live: plain pickle poisons the class, and DCP's own reader then fails on the clean folder.
    before = dict(vars(Metadata))
    try:
        pickle.loads(POISONED_METADATA)
        assert "__setstate__" in vars(Metadata)
        with pytest.raises(TypeError):
            FileSystemReader(str(clean)).read_metadata()
    finally:
        if "__setstate__" not in before:
            del Metadata.__setstate__
    assert dict(vars(Metadata)) == before
    # Through tiecheck: refused in one line, the class untouched, the clean folder read as before.
    res = CliRunner().invoke(main, ["check", str(poisoned), str(clean), "--no-config"])
    assert "sets the state of 'torch.distributed.checkpoint.metadata.Metadata'" in res.stderr, res.output
    assert dict(vars(Metadata)) == before
    assert f"{clean}: ok" in res.stdout, res.output
    assert tiecheck.analyze(str(clean)).source.format.startswith("torch.distributed.checkpoint")


def test_config_architectures_name_only_model_classes(tmp_path, monkeypatch):
    """"architectures": ["Trainer"] made tiecheck call transformers.Trainer(config)."""
    transformers = pytest.importorskip("transformers")
    called = []
    monkeypatch.setattr(transformers.Trainer, "__init__", lambda self, *a, **k: called.append(a))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**llama_config(), "architectures": ["Trainer", "os.system"]}))
    write_safetensors(folder / "model.safetensors", llama_tensors())
    res = CliRunner().invoke(main, ["inspect", str(folder), "--no-flops", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert not called
    # The architecture comes from the config's model_type instead, as transformers' Auto classes pick it.
    assert json.loads(res.stdout)["hf"]["architecture"]["class"] == "LlamaForCausalLM"
