"""``ZipArchive`` at its limits: each check of a record against the file, seen refusing exactly what
it must and passing what sits on the line, on zips made by ``zipfile`` and then edited by hand."""

from __future__ import annotations

import io
import os
import struct
import zipfile

import pytest

from tiecheck.errors import TargetError
from tiecheck.loaders.zipcheck import MAX_INFLATE, ZipArchive, describe


def _zip(records: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytearray:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in records:
            zf.writestr(name, data)
    return bytearray(buf.getvalue())


def _declare_size(raw: bytearray, size: int) -> bytearray:
    """The central directory's (uncompressed) size of the first record set to ``size``."""
    at = raw.index(b"PK\x01\x02")
    raw[at + 24:at + 28] = struct.pack("<I", size)
    return raw


def _compressed_size(raw: bytes) -> int:
    at = raw.index(b"PK\x01\x02")
    return struct.unpack("<I", raw[at + 20:at + 24])[0]


def _open(raw: bytes, tmp_path) -> ZipArchive:
    path = tmp_path / "a.zip"
    path.write_bytes(bytes(raw))
    return ZipArchive(path, "a.zip")


# Deflate's most: 1032 bytes out for each byte in (a stream of back-references of the longest match).
RATIO = 1032


def test_a_deflated_record_may_declare_up_to_the_ratio_deflate_can_reach(tmp_path):
    raw = _zip([("data.pkl", os.urandom(2000))])
    c = _compressed_size(raw)
    with _open(_declare_size(raw, RATIO * c + 1024), tmp_path) as z:
        assert z.check("data.pkl").file_size == RATIO * c + 1024
    with _open(_declare_size(raw, RATIO * c + 1025), tmp_path) as z, \
            pytest.raises(TargetError, match="is compressed and declares"):
        z.check("data.pkl")


def test_a_deflated_record_may_declare_at_most_max_inflate(tmp_path):
    raw = _zip([("data.pkl", os.urandom(300_000))])  # compressed enough that the ratio allows more
    assert RATIO * _compressed_size(raw) > MAX_INFLATE + 1
    with _open(_declare_size(raw, MAX_INFLATE), tmp_path) as z:
        z.check("data.pkl")
    with _open(_declare_size(raw, MAX_INFLATE + 1), tmp_path) as z, \
            pytest.raises(TargetError, match=f"inflates at most {MAX_INFLATE:,} bytes"):
        z.check("data.pkl")
    assert MAX_INFLATE == 256 << 20


def test_two_records_of_one_name_are_refused_and_the_file_closed(tmp_path):
    with pytest.warns(UserWarning, match="Duplicate name"):
        raw = _zip([("data.pkl", b"a" * 10), ("data.pkl", b"b" * 10)])
    before = _fds()
    with pytest.raises(TargetError, match=r"lists two records named 'data\.pkl'") as refused:
        _open(raw, tmp_path)
    assert _fds() == before, refused  # closed when refused, not when the refusal is collected


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_file_that_is_no_zip_says_what_zipfile_said_and_is_closed(tmp_path):
    (tmp_path / "a.zip").write_bytes(b"PK not a zip at all" * 10)
    before = _fds()
    with pytest.raises(TargetError, match=r"not a readable zip archive, truncated or corrupt \(BadZipFile: ") as refused:
        ZipArchive(tmp_path / "a.zip", "a.zip")
    assert _fds() == before, refused


def test_an_archive_closes_its_file_when_its_block_ends(tmp_path):
    before = _fds()
    with _open(_zip(STORED, zipfile.ZIP_STORED), tmp_path) as z:
        assert _fds() == before + 1
    assert _fds() == before, z


def test_an_error_is_described_by_its_type_and_first_line_up_to_200_characters():
    assert describe(ValueError("x" * 300 + "\nsecond line")) == "ValueError: " + "x" * 200
    assert describe(EOFError()) == "EOFError"


def _central(raw: bytearray, offset: int, fmt: str, value: int) -> bytearray:
    """A field of the first record's central directory entry set to ``value``."""
    at = raw.index(b"PK\x01\x02") + offset
    raw[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return raw


STORED = [("data.pkl", b"x" * 100)]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: _central(r, 8, "<H", 0x1), "is encrypted or patched"),
    (lambda r: _central(r, 8, "<H", 0x20), "is encrypted or patched"),
    (lambda r: _central(r, 10, "<H", 12), "uses compression method 12"),
    (lambda r: _central(r, 24, "<I", 99), r"sizes disagree \(100 stored, 99 declared\)"),
    (lambda r: _central(r, 42, "<I", 10_000_000), "lies outside the file"),
    (lambda r: r.__setitem__(slice(0, 4), b"PK\x00\x00") or r, "has no local header where the directory says"),
    (lambda r: _central(_central(r, 20, "<I", 10_000), 24, "<I", 10_000), "runs past the end of the file"),
])
def test_each_check_of_a_record_refuses_in_one_line(tmp_path, edit, message):
    with _open(edit(_zip(STORED, zipfile.ZIP_STORED)), tmp_path) as z, pytest.raises(TargetError, match=message):
        z.check("data.pkl")


def test_an_unedited_record_passes_and_its_span_is_its_bytes(tmp_path):
    raw = _zip(STORED, zipfile.ZIP_STORED)
    with _open(raw, tmp_path) as z:
        offset, size = z.span("data.pkl")
        assert bytes(raw[offset:offset + size]) == b"x" * 100
        assert z.read("data.pkl") == b"x" * 100
        z.check_all()
    with _open(_zip([("data.pkl", b"y" * 100)]), tmp_path) as z:
        assert z.span("data.pkl") is None  # deflated: no span to read in place
        with pytest.raises(TargetError, match="reads at most 99 for it"):
            z.read("data.pkl", limit=99)


def test_a_missing_record_is_named(tmp_path):
    with _open(_zip(STORED, zipfile.ZIP_STORED), tmp_path) as z, \
            pytest.raises(TargetError, match=r"the archive has no record 'other\.pkl'"):
        z.check("other.pkl")


def test_records_that_share_bytes_are_refused(tmp_path):
    raw = _zip([("a.pkl", b"a" * 100), ("b.pkl", b"b" * 100)], zipfile.ZIP_STORED)
    second = raw.index(b"PK\x01\x02", raw.index(b"PK\x01\x02") + 4)
    raw[second + 42:second + 46] = struct.pack("<I", 0)  # b.pkl's local header is a.pkl's
    with _open(raw, tmp_path) as z, pytest.raises(TargetError, match="overlaps record"):
        z.check_all()


def test_a_window_of_a_larger_file_is_read_as_a_zip(tmp_path):
    """DCP chunks: a seekable file object, not a path; the archive leaves it open for its owner."""
    fh = io.BytesIO(bytes(_zip(STORED, zipfile.ZIP_STORED)))
    with ZipArchive(fh, "chunk") as z:
        assert z.read("data.pkl") == b"x" * 100
    assert not fh.closed


def test_a_path_that_cannot_be_opened_is_refused_in_one_line(tmp_path):
    with pytest.raises(TargetError, match="not a readable zip archive"):
        ZipArchive(tmp_path / "missing.zip", "missing.zip")


def test_a_record_may_end_at_the_last_byte_and_not_one_past(tmp_path):
    raw = _zip(STORED, zipfile.ZIP_STORED)
    start = 30 + len("data.pkl")  # the local header, its name, no extra field
    room = len(raw) - start
    for size, ok in ((room, True), (room + 1, False)):
        edited = _central(_central(bytearray(raw), 20, "<I", size), 24, "<I", size)
        with _open(edited, tmp_path) as z:
            if ok:
                z.check("data.pkl")
            else:
                with pytest.raises(TargetError, match="runs past the end of the file"):
                    z.check("data.pkl")


def test_a_record_whose_bytes_fail_their_crc_is_refused_when_read(tmp_path):
    raw = _zip(STORED, zipfile.ZIP_STORED)
    at = raw.index(b"x" * 100)
    raw[at] ^= 0xFF
    with _open(raw, tmp_path) as z, pytest.raises(TargetError, match=r"is corrupt \(BadZipFile: "):
        z.read("data.pkl")


class _FailingRead(io.BytesIO):
    """A window of a larger file whose local header cannot be read (an I/O error)."""

    def read(self, n=-1):
        if self.tell() == 0 and n == 30:
            raise OSError(5, "Input/output error")
        return super().read(n)


def test_a_local_header_that_cannot_be_read_is_refused_in_one_line():
    with ZipArchive(_FailingRead(bytes(_zip(STORED, zipfile.ZIP_STORED))), "chunk") as z, \
            pytest.raises(TargetError, match=r"cannot be read \(Input/output error\)"):
        z.check("data.pkl")
