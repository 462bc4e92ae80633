"""The content reader's batched samples (``samples``) are, name for name, what ``sample`` and
``sample_transposed`` read one at a time: small tensors side by side in a file are read in one
``pread`` per run of them, and a run of small matrices is transposed by one gather."""

from __future__ import annotations

import pytest
import torch

from tiecheck.loaders import load_target
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
