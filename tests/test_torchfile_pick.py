"""Which mapping of a torch.save file is the model: a state dict, a training checkpoint's model
entry, ``--key``, and the notes and one-line errors that say what was chosen or why nothing was."""

from __future__ import annotations

import pytest
import torch

import tiecheck.loaders
from tiecheck.errors import TargetError


def _sd(n: int, prefix: str = "") -> dict:
    return {f"{prefix}layer{i}.weight": torch.full((2,), float(i)) for i in range(n)}


def _load(tmp_path, obj, key: str | None = None):
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    return tiecheck.loaders.load_path(path, key=key)


def _refused(tmp_path, obj, key: str | None = None) -> str:
    with pytest.raises(TargetError) as e:
        _load(tmp_path, obj, key)
    return str(e.value).removeprefix(f"{tmp_path / 'ckpt.pt'}: ")


def test_a_state_dict_with_a_few_other_entries_is_the_model(tmp_path):
    """Half of the entries tensors is enough; nested mappings are flattened under dotted names."""
    sub = _load(tmp_path, {"w": torch.ones(2), "step": 3})
    assert (list(sub.tensors), sub.source.key, sub.source.format) == (["w"], None, "torch.save state dict")
    assert sub.source.notes == ["skipped 1 non-tensor entry"]
    sub = _load(tmp_path, {"a": torch.ones(2), "b": torch.ones(2), "inner": {"c": torch.ones(2), "n": 1, "m": 2}})
    assert list(sub.tensors) == ["a", "b", "inner.c"]
    assert sub.source.notes == ["skipped 2 non-tensor entries"]


@pytest.mark.parametrize("obj", [{"w": torch.ones(2), "step": 3, "lr": 0.1}, {1: torch.ones(2)}, {}],
                         ids=["mostly numbers", "int key", "empty"])
def test_what_is_not_a_state_dict_and_holds_none_is_refused(tmp_path, obj):
    assert _refused(tmp_path, obj).startswith("found no model state dict (top-level keys: ")


def test_the_keys_listed_stop_at_twelve(tmp_path):
    obj = {f"k{i:02d}": i for i in range(13)}
    assert _refused(tmp_path, obj) == ("found no model state dict (top-level keys: k00, k01, k02, k03, k04, k05, "
                                       "k06, k07, k08, k09, k10, k11, ...); choose one with --key")
    del obj["k12"]
    assert _refused(tmp_path, obj) == ("found no model state dict (top-level keys: k00, k01, k02, k03, k04, k05, "
                                       "k06, k07, k08, k09, k10, k11); choose one with --key")


def test_a_training_checkpoint_s_model_key_wins_in_the_order_of_model_keys(tmp_path):
    sub = _load(tmp_path, {"ema": _sd(3), "model": _sd(2), "epoch": 3, "optimizer": {"state": {}, "param_groups": []}})
    assert (sub.source.key, sub.source.format) == ("model", "torch.save training checkpoint")
    assert sorted(sub.tensors) == ["layer0.weight", "layer1.weight"]
    assert sub.source.notes == ["ignored other entries: ema, optimizer"]


def test_a_model_key_holding_its_state_dict_one_level_down(tmp_path):
    sub = _load(tmp_path, {"model": {"state_dict": _sd(2), "config": {"d": 2}}, "epoch": 1})
    assert sub.source.key == "model.state_dict"
    assert sorted(sub.tensors) == ["layer0.weight", "layer1.weight"]


def test_without_a_model_key_the_largest_mapping_of_tensors_that_is_not_optimizer_state(tmp_path):
    obj = {"lr_scheduler": _sd(9), "student": _sd(2), "teacher": _sd(3), "small": _sd(1), "epoch": 4}
    sub = _load(tmp_path, obj)
    assert (sub.source.key, len(sub.tensors)) == ("teacher", 3)
    assert sub.source.notes == ["ignored other entries: lr_scheduler, student, small"]


def test_a_state_dict_under_digits_is_reached_by_key(tmp_path):
    sub = _load(tmp_path, {"towers": {0: _sd(1), 1: _sd(2)}}, key="towers.1")
    assert (sub.source.key, len(sub.tensors)) == ("towers.1", 2)


@pytest.mark.parametrize(("key", "said"), [
    ("nope", "no key 'nope' (available: model, epoch)"),
    ("epoch.x", "no key 'epoch.x' (available: int)"),
    ("epoch", "key 'epoch' holds a int, not a mapping of tensors"),
    ("model.mdel", "no key 'model.mdel' (available: w); did you mean 'w'?"),
])
def test_a_key_that_holds_no_mapping_is_refused_in_one_line(tmp_path, key, said):
    obj = {"model": {"w": torch.ones(2)}, "epoch": 3}
    if "did you mean" in said:
        obj["model"]["model"] = 1
        said = "no key 'model.mdel' (available: w, model); did you mean 'model'?"
    assert _refused(tmp_path, obj, key) == said


def test_a_key_holding_a_mapping_without_tensors(tmp_path):
    assert _refused(tmp_path, {"model": {"w": torch.ones(2)}, "meta": {"a": 1}}, "meta") == "key 'meta' holds no tensors"


def test_optimizer_state_alone_names_no_model_to_offer(tmp_path):
    """torch.optim's ``state`` part alone (parameter index -> its step and moments) under --key."""
    state = {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2)}, 1: {"step": torch.tensor(1.0)}}
    said = _refused(tmp_path, {"opt": state, "n": 1}, "opt")
    assert said == ("key 'opt' holds optimizer state (torch.optim state_dict: per-parameter step and moments), not "
                    "model weights; this file holds no model state dict at its top level")


def test_a_file_holding_a_list_is_refused(tmp_path):
    assert _refused(tmp_path, [torch.ones(2)]) == ("holds a list, not a state dict, a training checkpoint or an "
                                                   "nn.Module")


@pytest.mark.parametrize(("names", "stripped"), [
    (["module._orig_mod.a", "module._orig_mod.b"], "stripped prefix 'module.' + '_orig_mod.' (DDP / torch.compile wrapper)"),
    (["_orig_mod.a", "_orig_mod.b"], "stripped prefix '_orig_mod.' (DDP / torch.compile wrapper)"),
    (["module.a", "b"], None),
])
def test_wrapper_prefixes_are_stripped_when_every_name_carries_one(tmp_path, names, stripped):
    sub = _load(tmp_path, {n: torch.ones(2) for n in names})
    assert sorted(sub.tensors) == (["a", "b"] if stripped else sorted(names))
    assert sub.source.notes == ([stripped] if stripped else [])



def test_optimizer_state_under_key_lists_the_model_states_to_choose(tmp_path):
    """The model states listed are the top-level mappings that hold one, directly or one level down
    (``state_dict``, ``model``, ``module``); optimizer state and mappings without tensors are not."""
    opt = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2)}}, "param_groups": [{"params": [0]}]}
    obj = {"net": _sd(1), "wrapped": {"module": _sd(1), "epoch": 1}, "optimizer": opt, "meta": {"a": 1},
           "moments": {0: {"exp_avg_sq": torch.zeros(2)}}}
    said = _refused(tmp_path, obj, "optimizer")
    assert said == ("key 'optimizer' holds optimizer state (torch.optim state_dict: per-parameter step and moments), "
                    "not model weights; the model states in this file: net, wrapped (e.g. --key net)")
    assert _refused(tmp_path, obj, "moments").endswith("the model states in this file: net, wrapped (e.g. --key net)")


@pytest.mark.parametrize(("obj", "names"), [
    ({"state": _sd(1), "step": 3}, ["state.layer0.weight"]),
    ({"param_groups": _sd(1)}, ["param_groups.layer0.weight"]),
    ({0: {"w": torch.ones(2)}, 1: {"w": torch.ones(2)}}, ["0.w", "1.w"]),
    ({"0": {"step": torch.ones(1)}, "head": {"exp_avg": torch.ones(2)}}, ["0.step", "head.exp_avg"]),
], ids=["state alone", "param_groups alone", "numbered models", "a name among numbers"])
def test_a_key_that_only_looks_like_optimizer_state_is_read(tmp_path, obj, names):
    """torch.optim's state_dict holds both ``state`` and ``param_groups``, its ``state`` part only
    numbered entries of steps and moments: a mapping with one of them, or numbered models, is a model."""
    sub = _load(tmp_path, {"run": obj}, key="run")
    assert sorted(sub.tensors) == names


def test_the_other_entries_noted_stop_at_eight(tmp_path):
    obj = {"model": _sd(1), **{f"extra{i}": {"n": i} for i in range(9)}}
    sub = _load(tmp_path, obj)
    assert sub.source.notes == ["ignored other entries: " + ", ".join(f"extra{i}" for i in range(8))]
