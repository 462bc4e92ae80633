"""A report's rows read from its facts as they are asked for (``TensorRows.of``) are, access for access,
the rows a list of them would be: iterated, indexed, sliced, named, as dicts, as JSON, compared."""

from __future__ import annotations

from tiecheck.analyses.ties import find_tie_groups, group_by_identity
from tiecheck.facts import TensorFact
from tiecheck.report.rows import Row, TensorRows


def _facts() -> list[TensorFact]:
    shared = ("cpu", 1000)
    out = [TensorFact(f"layers.{i}.w", (4, 2), (2, 1), "float32", 4, "cpu", ("cpu", i), 0, 32) for i in range(5)]
    out += [TensorFact("emb.weight", (8, 4), (4, 1), "bfloat16", 2, "cpu", shared, 0, 64),
            TensorFact("head.weight", (8, 4), (4, 1), "bfloat16", 2, "cpu", shared, 0, 64),
            TensorFact("buf", (3,), (1,), "int64", 8, "meta", role="buffer")]
    return out


def test_rows_of_facts_read_as_a_list_of_rows():
    facts = _facts()
    groups = find_tie_groups(facts, group_by_identity(facts))
    lazy = TensorRows.of(facts, groups)
    index = {n: i for i, g in enumerate(groups) for n in g.names}
    listed = TensorRows([Row(f.name, f.shape, f.dtype, f.numel, f.numel * f.itemsize, f.role, f.device,
                             index.get(f.name)) for f in facts], [(g.kind, g.names) for g in groups])
    assert len(lazy) == len(listed) == len(facts)
    assert list(lazy) == list(listed)
    assert lazy == listed
    assert [lazy[i] for i in range(-len(facts), len(facts))] == [listed[i] for i in range(-len(facts), len(facts))]
    assert lazy[2:6] == listed[2:6]
    assert lazy.names() == listed.names() == [f.name for f in facts]
    assert list(lazy.dicts()) == list(listed.dicts())
    assert list(lazy.json_lines()) == list(listed.json_lines())
    assert lazy[5].tied_with == ("head.weight",)


def test_rows_keep_the_facts_they_were_made_of():
    facts = _facts()
    rows = TensorRows.of(facts, [])
    facts.append(TensorFact("late", (1,), (1,), "float32", 4, "cpu"))
    facts[0] = facts[-1]
    assert rows.names() == [f.name for f in _facts()]
