"""A Hugging Face folder's tensors under the architecture's names (loaders/hf.py RenamedTensors).

The folder's tensors are renamed to the architecture's keys (a base-model prefix added or dropped,
tied names the files drop pointing at the stored one) without making a tensor per name: the facts
come from the files' own mapping. They must be exactly what ``fact_of`` says of each renamed tensor,
for every kind of weights file a folder holds, and no tensor may be made to describe them.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tiecheck.loaders import load_target
from tiecheck.loaders.hf_reconcile import RenamedTensors
from tiecheck.loaders.tensor_facts import fact_of

from support.hf import EMB, HEAD, tiny_llama

pytestmark = pytest.mark.usefixtures("quiet_transformers")


def _folder(tmp_path, *, tie: bool, fmt: str, prefix_dropped: bool = False):
    model = tiny_llama(tie=tie)
    model.save_pretrained(tmp_path, safe_serialization=fmt == "safetensors")
    if prefix_dropped:  # keys saved without the base model's "model." prefix, as some exporters write
        sd = {k.removeprefix("model."): v.clone() for k, v in model.state_dict().items() if k != HEAD or not tie}
        for f in tmp_path.glob("model*.safetensors"):
            f.unlink()
        save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


@pytest.mark.parametrize("fmt", ["safetensors", "torch.save"])
@pytest.mark.parametrize("tie", [True, False])
def test_renamed_facts_equal_fact_of(tmp_path, fmt, tie):
    subject = load_target(str(_folder(tmp_path, tie=tie, fmt=fmt)))
    assert isinstance(subject.tensors, RenamedTensors)
    facts = subject.tensors.facts()
    assert [f.name for f in facts] == list(subject.tensors)
    assert facts == [fact_of(n, t) for n, t in subject.tensors.items()]
    by = {f.name: f for f in facts}
    # The tied head the files drop is the stored embedding: one memory.
    assert (by[HEAD].identity == by[EMB].identity) is tie


def test_prefix_dropped_on_save_is_renamed(tmp_path):
    subject = load_target(str(_folder(tmp_path, tie=True, fmt="safetensors", prefix_dropped=True)))
    facts = subject.tensors.facts()
    assert EMB in subject.tensors
    assert HEAD in subject.tensors
    assert facts == [fact_of(n, t) for n, t in subject.tensors.items()]
    assert {f.name: f.owner for f in facts}[EMB] == "model.embed_tokens"


def test_no_tensor_is_made_to_describe_the_folder(tmp_path, monkeypatch):
    folder = _folder(tmp_path, tie=True, fmt="safetensors")
    made = []
    original = torch.Tensor.set_
    monkeypatch.setattr(torch.Tensor, "set_", lambda self, *a, **k: made.append(1) or original(self, *a, **k))
    subject = load_target(str(folder))
    before = len(made)
    subject.tensors.facts()
    assert len(made) == before  # facts from the header, renamed
    assert before <= 2  # at most the tied pair, compared once while the folder is read


def test_layout_for_pread_matches_the_file(tmp_path):
    folder = _folder(tmp_path, tie=False, fmt="safetensors")
    subject = load_target(str(folder))
    header_len = int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((folder / "model.safetensors").read_bytes()[8:8 + header_len])
    offset, nbytes, itemsize = subject.tensors.file_layout(HEAD)
    begin, end = header[HEAD]["data_offsets"]
    assert (offset, nbytes, itemsize) == (8 + header_len + begin, end - begin, 4)
