"""Progress within the long phases: per shard while a weights index is read, per tensor sampled in
the content pass, throttled to about one call per 1%; and nothing on stderr off a terminal."""

from __future__ import annotations

import io
import json

import pytest
import torch
from click.testing import CliRunner

import tiecheck
from tiecheck.analyses.duplicates import find_untied_duplicates
from tiecheck.api import Phase
from tiecheck.cli import progress as progress_mod
from tiecheck.cli.main import main
from tiecheck.cli.progress import Progress
from tiecheck.facts import TensorFact
from tiecheck.loaders.detect import read_weights_index
from tiecheck.loaders.formats.sharded import load_sharded

from support.checkpoints import llama_config, llama_tensors, write_sharded

SHARDS, TENSORS = 250, 500


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """250 shards of 2 tensors each, all of one shape and distinct: one bucket of 500 to sample."""
    tensors = {f"layers.{i}.w": torch.full((4,), float(i)) for i in range(TENSORS)}
    return write_sharded(tmp_path_factory.mktemp("within"), tensors, shards=SHARDS)


def test_sharded_index_reports_each_percent_of_its_shards(index):
    calls = []
    sub = load_sharded(index, read_weights_index(index), progress=lambda done, total: calls.append((done, total)))
    assert len(sub.tensors) == TENSORS
    # 250 shards: a call every 2 shards, the last at 250/250
    assert calls == [(i, SHARDS) for i in range(2, SHARDS + 1, 2)]


def test_small_index_reports_every_shard(tmp_path):
    index = write_sharded(tmp_path, {f"w{i}": torch.full((2,), float(i)) for i in range(6)}, shards=3)
    calls = []
    load_sharded(index, read_weights_index(index), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


class DistinctReader:
    """A content reader whose every tensor samples differently (nothing to compare in full)."""

    bytes_read = 0

    def sample(self, name: str) -> bytes:
        return name.encode()


def _fact(i: int, shape: tuple[int, ...], stride: tuple[int, ...] = (1,)) -> TensorFact:
    return TensorFact(name=f"t{i:04d}", shape=shape, stride=stride, dtype="float32", itemsize=4, device="cpu",
                      storage=("cpu", 1), byte_start=16 * i, byte_end=16 * i + 16)


def test_content_pass_reports_sampled_tensors_up_to_the_total():
    # 300 of one shape, 50 of another, one alone (not sampled: nothing to compare it with)
    facts = [_fact(i, (4,)) for i in range(300)] + [_fact(300 + i, (2, 2), (2, 1)) for i in range(50)] + \
        [_fact(999, (1, 4), (4, 1))]
    calls = []
    groups, stats = find_untied_duplicates(facts, DistinctReader(), progress=lambda d, t: calls.append((d, t)))
    assert groups == []
    assert stats.sampled == 350
    assert calls == [(i, 350) for i in range(3, 349, 3)] + [(350, 350)]


@pytest.mark.parametrize(("shapes", "every"), [
    # 2 + 5 to sample: below a hundred every tensor is a call, and a bucket of two counts in the total
    ([(4,)] * 2 + [(2, 2)] * 5 + [(1, 4)], 1),
    # 400 to sample: a call every 4 (1% of them), the last one included once
    ([(4,)] * 400, 4),
], ids=["seven", "four-hundred"])
def test_content_pass_calls_per_percent_or_per_tensor(shapes, every):
    facts = [_fact(i, s, (1,) if len(s) == 1 else (s[1], 1)) for i, s in enumerate(shapes)]
    total = sum(1 for s in shapes if shapes.count(s) > 1)
    calls = []
    find_untied_duplicates(facts, DistinctReader(), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, total) for i in range(every, total + 1, every)]


def test_content_pass_without_a_callback_is_unchanged():
    facts = [_fact(i, (4,)) for i in range(10)]
    groups, stats = find_untied_duplicates(facts, DistinctReader())
    assert groups == []
    assert stats.sampled == 10


def test_analyze_reports_within_reading_and_the_content_pass(index):
    calls = []
    report = tiecheck.analyze(str(index), progress=lambda n, label: calls.append((n, label)))
    assert report.content.stats.sampled == TENSORS
    labels = [label for _, label in calls]
    assert labels[0] == "reading the target"
    assert labels[1:126] == [f"reading the target: {i:,}/{SHARDS} shards" for i in range(2, SHARDS + 1, 2)]
    assert labels[126] == f"analysing {TENSORS} tensors"
    assert labels[127] == f"content pass over {TENSORS} tensors"
    assert labels[128:228] == [f"content pass over {TENSORS} tensors: {i}/{TENSORS} sampled"
                               for i in range(5, TENSORS + 1, 5)]
    assert labels[228:] == ["checking ties"]
    # every call moves the bar forward, and each phase is one unit in all
    assert all(n > 0 for n, _ in calls[1:126] + calls[128:228])
    assert sum(n for n, _ in calls[:127]) == pytest.approx(1.0)
    assert sum(n for n, _ in calls[127:]) == pytest.approx(1.0)


def test_a_hugging_face_folder_reports_its_shards(tmp_path):
    tensors = llama_tensors()
    write_sharded(tmp_path, tensors, shards=4)
    (tmp_path / "config.json").write_text(json.dumps(llama_config()))
    calls = []
    report = tiecheck.analyze(str(tmp_path), progress=lambda n, label: calls.append((n, label)))
    assert len(report.tensors) == len(tensors) + 1  # lm_head.weight, tied by the architecture
    assert [label for _, label in calls[:6]] == ["reading the target"] + [
        f"reading the target: {i}/4 shards" for i in range(1, 5)] + [f"analysing {len(tensors) + 1} tensors"]


def test_bar_moves_within_a_phase(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    err = FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    bar = Progress(2, width=8)
    phase = Phase(bar, "reading the target", "shards")
    phase(1, 4)
    phase(2, 4)
    phase.end("analysing 8 tensors")
    assert err.getvalue().split("\r")[1:] == [
        "[........]   0% reading the target",
        "[#.......]  12% reading the target: 1/4 shards",
        "[##......]  25% reading the target: 2/4 shards",
        "[####....]  50% analysing 8 tensors           ",
    ]


def test_nothing_on_stderr_off_a_terminal(index, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = CliRunner().invoke(main, ["inspect", str(index), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert len(json.loads(result.stdout)["tensors"]) == TENSORS


def test_nothing_on_stderr_under_ci_even_on_a_terminal(index, monkeypatch):
    err = FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setenv("CI", "true")
    bar = Progress(2)
    assert not bar.enabled
    tiecheck.analyze(str(index), progress=bar)
    bar.close()
    assert err.getvalue() == ""


def test_forced_bar_shows_shards_and_samples_on_stderr_only(index, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: True)
    monkeypatch.setattr(progress_mod, "SHOW_AFTER", 0.0)
    result = CliRunner().invoke(main, ["inspect", str(index), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert f"reading the target: {SHARDS}/{SHARDS} shards" in result.stderr
    assert f"content pass over {TENSORS} tensors: {TENSORS}/{TENSORS} sampled" in result.stderr
    assert "\r[" not in result.stdout
    assert len(json.loads(result.stdout)["tensors"]) == TENSORS
