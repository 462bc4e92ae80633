"""Snapshot files read, compared and written directly (``tiecheck.check.snapshot``): what each bad
file is told, what an update changes and says, and the bytes written."""

from __future__ import annotations

import json

import pytest

from tiecheck import __version__
from tiecheck.analyses.expect import ExpectedGroup
from tiecheck.check import snapshot as snap
from tiecheck.check.snapshot import Change, Snapshot, SnapshotError

HELP = "; write a snapshot with `tiecheck check TARGET --expect s.json --update` or `tiecheck inspect TARGET " \
       "--format json -o s.json`"


def _snapshot(*groups: tuple[tuple[str, ...], str | None]) -> Snapshot:
    return Snapshot(tuple(ExpectedGroup(names, kind) for names, kind in groups))


TIED = _snapshot((("emb.weight", "head.weight"), "same_parameter"))


@pytest.mark.parametrize(("data", "why"), [
    ([], "expected a JSON object with a 'tie_groups' list, found a list"),
    ("tie_groups", "expected a JSON object with a 'tie_groups' list, found a str"),
    ({}, "not a tiecheck snapshot: no 'tie_groups' list"),
    ({"tie_groups": {}}, "not a tiecheck snapshot: no 'tie_groups' list"),
    ({"tie_groups": ["a"]}, "tie_groups[0] needs 'names': a list of two or more tensor names"),
    ({"tie_groups": [{"names": "ab"}]}, "tie_groups[0] needs 'names': a list of two or more tensor names"),
    ({"tie_groups": [{"names": ["a"]}]}, "tie_groups[0] needs 'names': a list of two or more tensor names"),
    ({"tie_groups": [{"names": ["a", ""]}]}, "tie_groups[0] needs 'names': a list of two or more tensor names"),
    ({"tie_groups": [{"names": ["a", 1]}]}, "tie_groups[0] needs 'names': a list of two or more tensor names"),
    ({"tie_groups": [{"names": ["a", "b"]}, {"names": ["c"]}]},
     "tie_groups[1] needs 'names': a list of two or more tensor names"),
    ({"tie_groups": [{"names": ["a", "b"], "kind": "glued"}]},
     "tie_groups[0] has unknown kind 'glued' (known: same_parameter, shared_storage, distinct_parameters, "
     "transposed_alias, restrided_alias)"),
    ({"tie_groups": [{"names": ["a", "b"]}, {"names": ["c", "b"]}]},
     "b is listed in tie_groups[0] and tie_groups[1]; a name has one tie group"),
    ({"tie_groups": [{"names": ["a", "b"]}, {"names": ["c", "d", "c"]}]},
     "c is listed twice in tie_groups[1]; list each name once"),
    ({"tie_groups": [{"names": ["a", "a"]}]}, "a is listed twice in tie_groups[0]; list each name once"),
])
def test_each_bad_snapshot_is_told_what_is_wrong_and_how_to_write_one(data, why):
    with pytest.raises(SnapshotError) as e:
        snap.parse(data, "s.json")
    assert str(e.value) == f"s.json: {why}{HELP}"


@pytest.mark.parametrize(("key", "value", "reads"), [
    ("tiecheck_snapshot", 2, "1"), ("tiecheck_snapshot", "1", "1"),
    ("schema_version", 3, "1 or 2"), ("schema_version", 0, "1 or 2"),
])
def test_a_version_this_tiecheck_does_not_read_is_refused(key, value, reads):
    with pytest.raises(SnapshotError) as e:
        snap.parse({key: value, "tie_groups": []}, "s.json")
    assert str(e.value) == (f"s.json: {key} {value!r} is not supported (this tiecheck reads {reads}); "
                            f"re-create it with this version")


@pytest.mark.parametrize(("key", "value"), [("tiecheck_snapshot", 1), ("schema_version", 1), ("schema_version", 2)])
def test_each_supported_version_is_read(key, value):
    got = snap.parse({key: value, "tie_groups": [{"names": ["b", "a"]}]}, "s.json")
    assert got == _snapshot((("a", "b"), None))


def test_groups_are_read_sorted_and_a_kind_kept():
    got = snap.parse({"tie_groups": [{"names": ["z", "y"], "kind": "shared_storage"},
                                     {"names": ["head.weight", "emb.weight"]}]}, "s.json")
    assert got == _snapshot((("emb.weight", "head.weight"), None), (("y", "z"), "shared_storage"))


def test_written_json_has_one_group_per_line_and_reads_back(tmp_path):
    s = _snapshot((("a", "b"), None), (("emb.weight", "head.weight"), "same_parameter"))
    path = tmp_path / "deep" / "s.json"
    snap.write(path, s)
    assert path.read_text() == (
        "{\n"
        '  "tiecheck_snapshot": 1,\n'
        f'  "tiecheck_version": "{__version__}",\n'
        '  "tie_groups": [\n'
        '    {"names": ["a", "b"]},\n'
        '    {"names": ["emb.weight", "head.weight"], "kind": "same_parameter"}\n'
        "  ]\n"
        "}\n")
    assert snap.read(path) == s
    assert json.loads(_snapshot().to_json())["tie_groups"] == []
    assert _snapshot().to_json().endswith('"tie_groups": []\n}\n')


def test_a_file_that_cannot_be_read_is_one_line(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(SnapshotError, match=r"none\.json: no such snapshot file; write it with `tiecheck check "
                                            r"TARGET --expect .*none\.json --update`$"):
        snap.read(missing)
    (tmp_path / "bad.json").write_text('{"tie_groups": [}')
    with pytest.raises(SnapshotError, match=r"bad\.json: not valid JSON \(line 1, column 17: "):
        snap.read(tmp_path / "bad.json")
    (tmp_path / "latin1.json").write_bytes(b'{"tie_groups": ["\xe9"]}')
    with pytest.raises(SnapshotError, match=r"latin1\.json: cannot read the snapshot \("):
        snap.read(tmp_path / "latin1.json")
    with pytest.raises(SnapshotError, match=r"cannot read the snapshot \(Is a directory\)"):
        snap.read(tmp_path)


def test_refresh_says_created_unchanged_updated(tmp_path):
    path = tmp_path / "s.json"
    assert snap.refresh(path, TIED) == "created"
    before = path.read_bytes()
    # A file's shared_storage and a module's same_parameter are the same tie: no change, no write.
    assert snap.refresh(path, _snapshot((("emb.weight", "head.weight"), "shared_storage"))) == "unchanged"
    assert path.read_bytes() == before
    assert snap.refresh(path, _snapshot((("emb.weight", "head.weight"), "distinct_parameters"))) == "updated"
    assert snap.read(path) == _snapshot((("emb.weight", "head.weight"), "distinct_parameters"))


def test_an_update_says_each_change_as_a_diff_would(tmp_path):
    path = tmp_path / "s.json"
    snap.write(path, _snapshot((("a", "b"), "same_parameter"), (("c", "d"), "same_parameter"),
                               (("e", "f"), None)))
    after = _snapshot((("a", "b"), "distinct_parameters"), (("e", "f"), "shared_storage"), (("g", "h"), None))
    status, changes = snap.update(path, after)
    assert status == "updated"
    assert changes == [Change("removes", ("c", "d"), "same_parameter"),
                       Change("changes", ("a", "b"), "distinct_parameters", was="same_parameter"),
                       Change("adds", ("g", "h"), None)]
    assert [c.text() for c in changes] == ["removes tie group c = d (same_parameter)",
                                           "changes tie group a = b: kind same_parameter -> distinct_parameters",
                                           "adds tie group g = h"]
    assert [c.to_dict() for c in changes] == [
        {"change": "removes", "names": ["c", "d"], "kind": "same_parameter"},
        {"change": "changes", "names": ["a", "b"], "kind": "distinct_parameters", "was": "same_parameter"},
        {"change": "adds", "names": ["g", "h"], "kind": None}]
    assert snap.read(path) == after


def test_an_update_over_an_unreadable_file_replaces_it(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"tiecheck_snapshot": 9, "tie_groups": []}')
    status, (change,) = snap.update(path, TIED)
    assert status == "updated"
    assert change == Change("replaces", was="tiecheck_snapshot 9 is not supported (this tiecheck reads 1)")
    assert change.text() == "replaces a snapshot it could not read (tiecheck_snapshot 9 is not supported (this " \
                            "tiecheck reads 1))"
    assert change.to_dict() == {"change": "replaces", "names": [], "kind": None,
                                "error": "tiecheck_snapshot 9 is not supported (this tiecheck reads 1)"}
    assert snap.read(path) == TIED


def test_matching_takes_compatible_kinds_either_way_and_the_same_groups_only():
    assert TIED.matches(_snapshot((("emb.weight", "head.weight"), None)))
    assert _snapshot((("emb.weight", "head.weight"), None)).matches(TIED)
    assert not TIED.matches(_snapshot((("emb.weight", "head.weight"), "distinct_parameters")))
    assert not TIED.matches(_snapshot((("emb.weight", "head.weight", "x"), "same_parameter")))
    assert not TIED.matches(_snapshot())
    assert snap.changes(TIED, _snapshot((("emb.weight", "head.weight"), None))) == []


def test_a_snapshot_is_never_written_over_an_input(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"weights")
    with pytest.raises(SnapshotError):
        snap.write(target, TIED, protect=(str(target),))
    assert target.read_bytes() == b"weights"


def test_names_are_written_as_they_read(tmp_path):
    # A reviewer reads the diff: non-ASCII names are written as themselves, not as \\u escapes.
    s = _snapshot((("décodeur.weight", "tête.weight"), None))
    path = tmp_path / "s.json"
    snap.write(path, s)
    assert '{"names": ["décodeur.weight", "tête.weight"]}' in path.read_text(encoding="utf-8")
    assert snap.read(path) == s
