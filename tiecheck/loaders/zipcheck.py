"""Zip archives read defensively: ``torch.save`` files, ``.pt2`` archives and DCP chunks are zips.

Python's ``zipfile`` and torch's miniz reader trust the central directory: a record can claim
any size, any compression method, encryption, or a local header past the end of the file, and
the readers answer with a dozen exception types (``NotImplementedError`` for a version or method,
``RuntimeError`` for encryption, ``zlib.error``, ``EOFError``...) or, for a deflated record
declaring gigabytes, by allocating them. Every zip is therefore opened here first: each record
is checked against the file before anything reads it, a compressed record may not inflate past
``MAX_INFLATE`` bytes, two records may not share a name (readers disagree on which one wins) or
bytes, and every failure becomes one ``TargetError`` naming the file, the record and its byte offset.
"""

from __future__ import annotations

import itertools
import os
import struct
import zipfile
import zlib
from typing import IO

from tiecheck.errors import TargetError

# The most a compressed record may expand to in memory. torch.save and torch.export store their
# records uncompressed; only a zip rewritten by another tool holds deflated records, and none of
# the small records tiecheck reads from them (pickles, JSON configs) comes near this.
MAX_INFLATE = 256 << 20
# Deflate cannot expand more than about 1032:1; a record declaring more is lying about its size.
_DEFLATE_RATIO = 1032
_LOCAL_HEADER = 30

# What zipfile raises for damaged or unsupported archives, besides BadZipFile.
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, zlib.error, EOFError,
              OSError, ValueError, OverflowError, struct.error, KeyError, UnicodeDecodeError, IndexError)


def describe(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class ZipArchive:
    """The records of one zip, each checked against the file before it is read.

    ``source`` is a path or a seekable binary file (a window of a larger file, for DCP chunks);
    ``label`` is how messages name it.
    """

    def __init__(self, source: str | os.PathLike | IO[bytes], label: str):
        self.label = label
        try:
            if isinstance(source, (str, os.PathLike)):
                self._fh: IO[bytes] = open(source, "rb")  # noqa: SIM115 - kept open for the archive's life; close() closes it
                self._owned = True
            else:
                self._fh, self._owned = source, False
            self.size = self._fh.seek(0, os.SEEK_END)
            self.zf = zipfile.ZipFile(self._fh)
            infos = self.zf.infolist()
        except ZIP_ERRORS as e:
            self.close()
            raise TargetError(f"{label}: not a readable zip archive, truncated or corrupt ({describe(e)})") from e
        self.infos: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in self.infos:
                self.close()
                raise TargetError(f"{label}: the zip directory lists two records named {info.filename!r}; readers "
                                  f"disagree on which one counts, so the archive is refused")
            self.infos[info.filename] = info
        self._data_start: dict[str, int] = {}

    def close(self) -> None:
        zf = getattr(self, "zf", None)
        if zf is not None:
            zf.close()
        if getattr(self, "_owned", False):
            self._fh.close()

    def __enter__(self) -> ZipArchive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self.infos)

    def _bad(self, info: zipfile.ZipInfo, why: str) -> TargetError:
        return TargetError(f"{self.label}: record {info.filename!r} (local header at byte {info.header_offset:,}) "
                           f"{why}")

    def check(self, name: str) -> zipfile.ZipInfo:
        """The record's directory entry, after checking it against the bytes of the file."""
        info = self.infos.get(name)
        if info is None:
            raise TargetError(f"{self.label}: the archive has no record {name!r}; it is partial or corrupt")
        if name in self._data_start:
            return info
        if info.flag_bits & 0x61:  # bit 0 encrypted, 5 patched data, 6 strong encryption
            raise self._bad(info, f"is encrypted or patched (flags {info.flag_bits:#06x}); checkpoints never are")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise self._bad(info, f"uses compression method {info.compress_type}; tiecheck reads stored and deflated "
                                  f"records only")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise self._bad(info, f"is stored uncompressed but its sizes disagree ({info.compress_size:,} stored, "
                                  f"{info.file_size:,} declared)")
        if info.compress_type == zipfile.ZIP_DEFLATED and (
                info.file_size > MAX_INFLATE or info.file_size > _DEFLATE_RATIO * info.compress_size + 1024):
            raise self._bad(info, f"is compressed and declares {info.file_size:,} bytes uncompressed from "
                                  f"{info.compress_size:,}; tiecheck inflates at most {MAX_INFLATE:,} bytes per record "
                                  f"(torch writes records uncompressed: re-save the file with torch)")
        if info.header_offset < 0 or info.header_offset + _LOCAL_HEADER > self.size:
            raise self._bad(info, f"lies outside the file ({self.size:,} bytes): the archive is truncated or corrupt")
        try:
            if self._owned:  # one small read, without moving (or refilling) the buffered handle
                local = os.pread(self._fh.fileno(), _LOCAL_HEADER, info.header_offset)
            else:
                self._fh.seek(info.header_offset)
                local = self._fh.read(_LOCAL_HEADER)
        except OSError as e:
            raise self._bad(info, f"cannot be read ({e.strerror or e})") from e
        if len(local) < _LOCAL_HEADER or local[:4] != b"PK\x03\x04":
            raise self._bad(info, "has no local header where the directory says: the archive is corrupt")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + _LOCAL_HEADER + name_len + extra_len
        if start + info.compress_size > self.size:
            raise self._bad(info, f"runs past the end of the file (bytes {start:,}-{start + info.compress_size:,} of "
                                  f"{self.size:,}): the archive is truncated")
        self._data_start[name] = start
        return info

    def check_all(self) -> None:
        """Every record checked, and no two of them sharing bytes: a directory whose entries overlap
        would make two records (two storages) out of the same bytes, which no zip writer does."""
        for name in self.infos:
            self.check(name)
        spans = sorted((info.header_offset, self._data_start[name] + info.compress_size, name)
                       for name, info in self.infos.items())
        for (_, end, first), (start, _, second) in itertools.pairwise(spans):
            if start < end:
                raise self._bad(self.infos[second], f"overlaps record {first!r} (which ends at byte {end:,}): two "
                                                    f"records share bytes, so the archive is refused")

    def read(self, name: str, limit: int = MAX_INFLATE) -> bytes:
        """A record's bytes, at most ``limit`` of them."""
        info = self.check(name)
        if info.file_size > limit:
            raise self._bad(info, f"declares {info.file_size:,} bytes; tiecheck reads at most {limit:,} for it")
        try:
            return self.zf.read(info)
        except ZIP_ERRORS as e:
            raise self._bad(info, f"is corrupt ({describe(e)})") from e

    def span(self, name: str) -> tuple[int, int] | None:
        """(byte offset in the file, size) of a stored record's bytes; None when it is compressed."""
        info = self.check(name)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        return self._data_start[name], info.file_size
