"""The content reader's batched samples (``samples``) are, name for name, what ``sample`` and
``sample_transposed`` read one at a time: small tensors side by side in a file are read in one
``pread`` per run of them, and a run of small matrices is transposed by one gather."""

from __future__ import annotations

import pytest
import torch

from tiecheck.loaders import load_target, sample_runs
from tiecheck.loaders.content import WHOLE_BYTES, TorchContentReader

from support.checkpoints import write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"sq.{i:03d}": torch.randn(8, 8, generator=g) for i in range(40)}  # a run of one shape
    out.update({f"v.{i:03d}": torch.randn(i + 1, generator=g) for i in range(30)})  # sizes that differ
    out["big"] = torch.randn(64, 64, generator=g)  # over WHOLE_BYTES: sampled by runs, on its own
    out["half"] = torch.randn(8, 8, generator=g).to(torch.float16)  # one shape, another element size
    out["wide"] = torch.randn(4, 16, generator=g)  # 4 x 16 and 16 x 4: swapped shapes of one size
    out["tall"] = torch.randn(16, 4, generator=g)
    out["e1"] = torch.zeros(0, 8)  # empty: no bytes, no span
    out["e2"] = torch.zeros(0, 8)
    return out


@pytest.fixture
def subject(tmp_path):
    return load_target(str(write_safetensors(tmp_path / "m.safetensors", _tensors())))


def test_batched_samples_equal_one_at_a_time(subject):
    names = [*sorted(subject.tensors)[::-1], "sq.003", "sq.003"]  # out of file order, one name twice
    with TorchContentReader(subject.tensors, subject.file_spans) as one, \
            TorchContentReader(subject.tensors, subject.file_spans) as many:
        want = [one.sample(n) for n in names]
        got = many.samples(names)
        assert got == want
        assert many.bytes_read == one.bytes_read
    small = [n for n in names if subject.tensors[n].nbytes <= WHOLE_BYTES]
    assert all(len(s) == subject.tensors[n].nbytes for n, s in zip(names, got, strict=True) if n in small)


@pytest.mark.parametrize(("names", "shape"), [
    ([f"sq.{i:03d}" for i in range(40)] + ["half"], (8, 8)),  # a run of one element size, then another
    (["sq.007", "sq.005", "sq.006"], (8, 8)),  # out of file order: sorted into one run
    (["tall"], (16, 4)),
])
def test_batched_transposed_samples_equal_one_at_a_time(subject, names, shape):
    with TorchContentReader(subject.tensors, subject.file_spans) as one, \
            TorchContentReader(subject.tensors, subject.file_spans) as many:
        want = [one.sample_transposed(n) for n in names]
        assert many.samples(names, shape) == want
    for n, s in zip(names, want, strict=True):
        t = subject.tensors[n]
        assert s == t.t().contiguous().view(torch.uint8).numpy().tobytes()  # whole, through the transpose


def test_runs_of_neighbours_are_one_read_each(subject, monkeypatch):
    reads = []
    with TorchContentReader(subject.tensors, subject.file_spans) as reader:
        real = reader._pread
        monkeypatch.setattr(reader, "_pread", lambda fd, n, off: reads.append(n) or real(fd, n, off))
        names = [f"sq.{i:03d}" for i in range(40)]
        reader.samples(names[:1])  # opens the file: the one-name path
        reads.clear()
        reader.samples(names)
    assert reads == [40 * 8 * 8 * 4]


@pytest.mark.parametrize("names", [
    [f"sq.{i:03d}" for i in range(40)],
    [f"sq.{i:03d}" for i in range(39, -1, -1)],  # reversed: cut in file order, handed back in theirs
    [f"sq.{i:03d}" for i in range(0, 40, 3)],  # gaps between them: a read per run
    ["sq.004", "sq.002", "sq.004", "sq.003"],  # one name twice
])
@pytest.mark.parametrize("batch", [1 << 20, 3 * 256, 100])  # reads of many, of three, and of one
@pytest.mark.parametrize("transposed", [None, (8, 8)])
def test_same_size_runs_are_read_together_as_one_at_a_time(subject, monkeypatch, names, batch, transposed):
    monkeypatch.setattr(sample_runs, "BATCH_BYTES", batch)
    reads = []
    with TorchContentReader(subject.tensors, subject.file_spans) as one, \
            TorchContentReader(subject.tensors, subject.file_spans) as many:
        want = [one.sample(n) if transposed is None else one.sample_transposed(n) for n in names]
        real = many._pread
        monkeypatch.setattr(many, "_pread", lambda fd, n, off: reads.append(n) or real(fd, n, off))
        assert many._samples_together(names, transposed) == want  # the columns' path, taken
        assert many.bytes_read == one.bytes_read
    assert max(reads) <= max(batch, 8 * 8 * 4)  # at most BATCH_BYTES a read, or one tensor


@pytest.mark.parametrize("names", [["sq.001", "v.003"], ["sq.001", "half"], ["big", "sq.001"], ["sq.001", "nothing"],
                                   ["e1", "e2"], ["sq.001", "e1"]])
def test_names_of_more_than_one_size_are_left_to_the_name_by_name_path(subject, names):
    with TorchContentReader(subject.tensors, subject.file_spans) as reader:
        assert reader._samples_together(names, None) is None


def test_a_restored_alias_is_left_to_the_name_by_name_path(tmp_path):
    w = torch.randn(4, 4)
    path = write_safetensors(tmp_path / "m.safetensors", {"emb.weight": w, "other": torch.randn(4, 4)},
                             metadata={"lm_head.weight": "emb.weight"})
    subject = load_target(str(path))
    with TorchContentReader(subject.tensors, subject.file_spans) as reader:
        assert reader._samples_together(["emb.weight", "other"], None) is not None
        assert reader._samples_together(["lm_head.weight", "other"], None) is None
        assert reader.samples(["lm_head.weight", "emb.weight"]) == [reader.sample("emb.weight")] * 2
