"""TC004 on hand-made facts: a tie is flagged when the tensors of the modules using it live on other devices."""

from __future__ import annotations

from tiecheck.analyses.lint import device_findings
from tiecheck.analyses.ties import find_tie_groups
from tiecheck.facts import TensorFact


def _fact(name: str, storage: int, device: str = "cpu", obj: int | None = None) -> TensorFact:
    return TensorFact(name=name, shape=(4, 2), stride=(2, 1), dtype="float32", itemsize=4, device=device,
                      storage=(device, storage), byte_start=0, byte_end=32, obj_id=obj,
                      role="parameter" if obj else "tensor", owner=name.rsplit(".", 1)[0])


def test_no_ties_no_finding():
    assert device_findings([_fact("a.weight", 1), _fact("b.weight", 2, device="cuda:0")], []) == []


def test_a_tie_whose_user_keeps_a_tensor_on_another_device():
    facts = [_fact("emb.weight", 1, obj=1), _fact("head.weight", 1, obj=1),
             _fact("head.bias", 2, device="cuda:1", obj=2),
             _fact("other.weight", 3, device="cuda:7", obj=3)]  # not a user of the tie: its device is irrelevant
    groups = find_tie_groups(facts)
    (f,) = device_findings(facts, groups)
    assert f.code == "TC004"
    assert f.message == "the tie emb.weight, head.weight spans devices cpu, cuda:1"
    assert f.names == ("emb.weight", "head.weight")


def test_a_tie_whose_users_share_its_device_is_fine():
    facts = [_fact("emb.weight", 1, obj=1), _fact("head.weight", 1, obj=1), _fact("head.bias", 2, obj=2),
             _fact("other.weight", 3, device="cuda:0", obj=3)]
    assert device_findings(facts, find_tie_groups(facts)) == []


def test_each_tie_judged_on_its_own_users():
    # Two ties: only the second one's user is on another device.
    facts = [_fact("a.weight", 1, obj=1), _fact("b.weight", 1, obj=1),
             _fact("c.weight", 2, obj=2), _fact("d.weight", 2, obj=2), _fact("d.bias", 3, device="cuda:0", obj=3)]
    (f,) = device_findings(facts, find_tie_groups(facts))
    assert f.names == ("c.weight", "d.weight")
    assert f.message == "the tie c.weight, d.weight spans devices cpu, cuda:0"
