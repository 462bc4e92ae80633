"""``tiecheck fix``'s byte-for-byte comparison of the copy against the input through reused buffers:
unaligned offsets, chunk boundaries, a changed byte anywhere, a range past the end, ranges compared once."""

from __future__ import annotations

import importlib
import os
import threading

import pytest

# The module the comparer lives in: COMPARE_CHUNK is patched on it.
content = importlib.import_module("tiecheck.loaders.filecompare")

SIZE = 3 * 4096 + 123  # not a multiple of a page or of the chunk


@pytest.fixture
def cmp():
    """A file comparer, closed after the test."""
    c = content.FileRangeCompare()
    yield c
    c.close()


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setattr(content, "COMPARE_CHUNK", 4096)  # several reads per range, one boundary mid-range
    data = os.urandom(SIZE)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 7 + data)  # the same bytes at offset 7 of a and 70001 of b: never page aligned
    b.write_bytes(b"y" * 70001 + data + b"tail")
    return a, b, data


def test_equal_ranges_at_unaligned_offsets(files, cmp):
    a, b, _ = files
    assert cmp.equal((str(a), 7), (str(b), 70001), SIZE)
    assert cmp.bytes_read == 2 * SIZE


@pytest.mark.parametrize("at", [0, 4095, 4096, SIZE - 1])
def test_one_changed_byte_anywhere_is_found(files, at, cmp):
    a, b, data = files
    changed = bytearray(data)
    changed[at] ^= 1
    b.write_bytes(b"y" * 70001 + bytes(changed) + b"tail")
    assert not cmp.equal((str(a), 7), (str(b), 70001), SIZE)


def test_a_range_past_the_end_is_a_short_read(files, cmp):
    a, b, _ = files
    with pytest.raises(OSError, match="short read"):
        cmp.equal((str(a), 7), (str(b), 70001 + SIZE), SIZE)  # starts 4 bytes before the end of b


def test_a_pair_found_equal_is_not_read_again(files, cmp):
    a, b, _ = files
    assert cmp.equal((str(a), 7), (str(b), 70001), SIZE)
    assert cmp.equal((str(a), 7), (str(b), 70001), SIZE)  # a dropped name sharing the kept name's bytes
    assert cmp.bytes_read == 2 * SIZE
    assert not cmp.equal((str(a), 7), (str(b), 70000), SIZE)  # another range is compared


@pytest.fixture
def parallel(files, monkeypatch):
    """Every chunk of the files above read on two threads, as chunks of PARALLEL_FROM bytes and more are."""
    monkeypatch.setattr(content, "PARALLEL_FROM", 1024)
    return files


@pytest.mark.parametrize("at", [0, 4095, 4096, SIZE - 1])
def test_two_threads_find_one_changed_byte_in_either_file(parallel, at, cmp):
    a, b, data = parallel
    assert cmp.equal((str(a), 7), (str(b), 70001), SIZE)
    changed = bytearray(data)
    changed[at] ^= 1
    a.write_bytes(b"x" * 7 + bytes(changed))
    assert not content.FileRangeCompare().equal((str(a), 7), (str(b), 70001), SIZE)
    b.write_bytes(b"y" * 70001 + bytes(changed) + b"tail")
    assert not cmp.equal((str(a), 0), (str(b), 70001), SIZE)


def test_two_threads_see_a_short_read_in_either_file(parallel, cmp):
    a, b, _ = parallel
    with pytest.raises(OSError, match="short read"):
        cmp.equal((str(a), 7), (str(b), 70001 + SIZE), SIZE)
    with pytest.raises(OSError, match="short read"):
        cmp.equal((str(a), 11), (str(b), 70005), SIZE)  # equal bytes, but a ends 4 bytes early


def test_closing_ends_the_reading_thread(parallel):
    a, b, _ = parallel
    c = content.FileRangeCompare()
    assert c.equal((str(a), 7), (str(b), 70001), SIZE)
    assert any(t.name.startswith("tiecheck-compare") for t in threading.enumerate())
    c.close()
    assert not any(t.name.startswith("tiecheck-compare") for t in threading.enumerate())
