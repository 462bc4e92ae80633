"""Rows written as they come: CSV, JSON lines, or Parquet, each resumable.

A row is written whole and flushed before the next, so a scan cut short leaves every row it
finished; ``--resume`` reads the targets already written, drops a last row that was cut in the
middle, and goes on without writing any target twice. Parquet has no row-by-row append (a file
is readable only once its footer is written), so a Parquet output is a folder of part files
(``part-00000.parquet``, ...), each written whole under a temporary name and then renamed; the
folder reads as one table (``pandas.read_parquet(folder)``). Rows not yet in a part when the
scan stops are scanned again on resume.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, TextIO

from tiecheck.errors import TiecheckError
from tiecheck.scan.row import INT_FIELDS, ROW_FIELDS

FORMATS = ("csv", "jsonl", "parquet")
PARQUET_ROWS = 256  # rows per Parquet part file
_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
             ".pq": "parquet"}


def format_for(output: str | None, fmt: str | None) -> str:
    """The format asked for, else the output's suffix says, else CSV."""
    if fmt:
        return fmt
    return _SUFFIXES.get(Path(output).suffix.lower(), "csv") if output else "csv"


class RowWriter:
    """Writes rows to ``output`` (or to ``stream`` when there is none) in ``fmt``.

    Args:
        output: the file (a folder for Parquet), or None for the stream.
        fmt: ``csv``, ``jsonl`` or ``parquet``.
        resume: go on with an existing output; without it an existing output is refused.
        stream: where rows go without an output (standard output).
    """

    def __init__(self, output: str | None, fmt: str, resume: bool = False, stream: TextIO | None = None):
        self.fmt, self.output = fmt, Path(output) if output else None
        self.done: set[str] = set()
        self._fh: TextIO | None = None
        self._buffer: list[dict[str, Any]] = []
        self._parts = 0
        if self.output is None:
            if fmt == "parquet":
                raise TiecheckError("Parquet rows need a folder to go to: give -o FOLDER.parquet")
            self._fh = stream
            self._start_text(fresh=True)
            return
        exists = self.output.exists() or self.output.is_symlink()
        if exists and not resume:
            raise TiecheckError(f"{self.output} exists: --resume goes on with it (targets already in it are skipped), "
                                f"or remove it to start again")
        if fmt == "parquet":
            self._open_parquet(exists)
        else:
            self._open_text(exists)

    # -- CSV and JSON lines -------------------------------------------------------------------------------
    def _open_text(self, exists: bool) -> None:
        rows: list[dict[str, Any]] = []
        if exists:
            if not self.output.is_file():
                raise TiecheckError(f"{self.output}: not a file; give the rows a file name")
            rows = self._read_text()
            self.done = {r["target"] for r in rows}
            self._rewrite(rows)  # a row cut in the middle is dropped; the rest stays as it was
        try:
            self._fh = open(self.output, "a", encoding="utf-8", newline="")  # noqa: SIM115 - open while rows come; close() closes it
        except OSError as e:
            raise TiecheckError(f"{self.output}: cannot write the rows ({e.strerror or e})") from e
        self._start_text(fresh=not rows)

    def _start_text(self, fresh: bool) -> None:
        if self.fmt == "csv":
            self._csv = csv.DictWriter(self._fh, fieldnames=ROW_FIELDS, lineterminator="\n")
            if fresh:
                self._csv.writeheader()
                self._fh.flush()

    def _read_text(self) -> list[dict[str, Any]]:
        """The complete rows of an existing output; a last row without its newline was cut short."""
        try:
            text = self.output.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TiecheckError(f"{self.output}: cannot read it to resume ({getattr(e, 'strerror', None) or e})") from e
        if text and not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        if self.fmt == "jsonl":
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                try:
                    row = json.loads(line)
                except ValueError:
                    raise TiecheckError(f"{self.output}: line {n} is not a JSON row; is this a scan's output?") from None
                if not isinstance(row, dict) or "target" not in row:
                    raise TiecheckError(f"{self.output}: line {n} is not a scan row; is this a scan's output?")
                rows.append(row)
            return rows
        reader = csv.DictReader(io.StringIO(text))
        if text and tuple(reader.fieldnames or ()) != ROW_FIELDS:
            raise TiecheckError(f"{self.output}: its columns are not a scan's ({', '.join(reader.fieldnames or [])}); "
                                f"is this a scan's output?")
        return [r for r in reader if None not in r.values()]

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.output.with_name(f".{self.output.name}.tiecheck-tmp")
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                if self.fmt == "csv":
                    w = csv.DictWriter(fh, fieldnames=ROW_FIELDS, lineterminator="\n")
                    w.writeheader()
                    w.writerows(rows)
                else:
                    fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            os.replace(tmp, self.output)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise TiecheckError(f"{self.output}: cannot write the rows ({e.strerror or e})") from e

    # -- Parquet ------------------------------------------------------------------------------------------
    def _open_parquet(self, exists: bool) -> None:
        pq = _pyarrow_parquet()
        if exists and not self.output.is_dir():
            raise TiecheckError(f"{self.output}: not a folder; Parquet rows go to a folder of part files")
        self.output.mkdir(parents=True, exist_ok=True)
        parts = sorted(self.output.glob("part-*.parquet"))
        for p in parts:
            try:
                self.done.update(pq.read_table(p, columns=["target"]).column("target").to_pylist())
            except Exception as e:  # noqa: BLE001 - pyarrow raises its own kinds for a damaged file
                raise TiecheckError(f"{p}: cannot read it to resume ({type(e).__name__}: {e})") from None
        self._parts = len(parts)

    def _flush_parquet(self) -> None:
        if not self._buffer:
            return
        import pyarrow as pa  # noqa: PLC0415 - the `parquet` extra, only for Parquet output

        pq = _pyarrow_parquet()
        schema = pa.schema([(f, pa.int64() if f in INT_FIELDS else pa.float64() if f == "seconds" else pa.string())
                            for f in ROW_FIELDS])
        table = pa.Table.from_pylist(self._buffer, schema=schema)
        name = f"part-{self._parts:05d}.parquet"
        tmp = self.output / f".{name}.tiecheck-tmp"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, self.output / name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise TiecheckError(f"{self.output / name}: cannot write the rows ({e.strerror or e})") from e
        self._parts += 1
        self._buffer.clear()

    # -- rows -------------------------------------------------------------------------------------------
    def write(self, row: dict[str, Any]) -> None:
        """One row, written (and flushed) before this returns; Parquet rows a part file at a time."""
        self.done.add(row["target"])
        if self.fmt == "parquet":
            self._buffer.append(row)
            if len(self._buffer) >= PARQUET_ROWS:
                self._flush_parquet()
            return
        if self.fmt == "csv":
            self._csv.writerow(row)
        else:
            self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Write what is buffered and close the output (the stream stays open)."""
        if self.fmt == "parquet":
            self._flush_parquet()
        elif self._fh is not None and self.output is not None:
            self._fh.close()
        self._fh = None


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415 - the `parquet` extra, only for Parquet output
    except ImportError:
        raise TiecheckError("Parquet output needs pyarrow: pip install 'tiecheck[parquet]' (or write CSV or JSON "
                            "lines)") from None
    return pq
