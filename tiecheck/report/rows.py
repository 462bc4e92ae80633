"""The report's per-tensor rows, kept compact and made into typed rows when read.

A report holds one row per tensor name. As dicts, 100,000 rows take about 60 MB (a ten-key dict,
a shape list and a tied-with list each); as tuples they take a third of that, and a checkpoint of
that size is exactly where the peak memory of ``inspect`` matters. ``TensorRows`` keeps each row as
a ``Row`` (eight fields, its tie group by index), made from its fact when read for a report an
analysis makes (``FactRows``: the facts are kept anyway), and makes the ``TensorRow`` a reader sees,
with its group's kind and the names it is tied with, on access; JSON encodes the rows one at a time
from ``dicts()``, never all of them at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from json.encoder import encode_basestring
from typing import Any, NamedTuple, overload

from tiecheck.analyses.ties import TieGroup
from tiecheck.facts import TensorFact


class Row(NamedTuple):
    """One tensor as a report stores it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    bytes: int
    role: str
    device: str
    tie_group: int | None  # index into the groups given to TensorRows


class TensorRow(NamedTuple):
    """One tensor as a report shows it: a ``Row``, with its tie group's kind and the names it is tied with."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    bytes: int
    role: str
    device: str
    tie_group: int | None
    tie_kind: str | None
    tied_with: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "numel": self.numel,
                "bytes": self.bytes, "role": self.role, "device": self.device, "tie_group": self.tie_group,
                "tie_kind": self.tie_kind, "tied_with": list(self.tied_with)}


class _Made(Sequence):
    """A sequence of ``_row(item)`` for each item of ``_rows``, each made when it is read."""

    __slots__ = ()
    _rows: Sequence

    def _row(self, item: Any) -> Any:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._row(r) for r in self._rows[i]]
        return self._row(self._rows[i])

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Any]:
        return map(self._row, self._rows)


class FactRows(_Made):
    """``Row``s made from facts as they are read: the facts are kept for the analysis anyway, and a
    list of a million rows made at once was 150 MB at the end of ``inspect``, where its peak is."""

    __slots__ = ("_index", "_rows")

    def __init__(self, facts: tuple[TensorFact, ...], index: Mapping[str, int]):
        self._rows = facts
        self._index = index  # name -> its tie group's index, for tied names

    def _row(self, f: TensorFact) -> Row:
        return Row(f.name, f.shape, f.dtype, f.numel, f.numel * f.itemsize, f.role, f.device, self._index.get(f.name))

    def names(self) -> list[str]:
        return [f.name for f in self._rows]


class TensorRows(_Made):
    """Rows as ``TensorRow``: ``name, shape, dtype, numel, bytes, role, device, tie_group, tie_kind, tied_with``.

    Args:
        rows: one ``Row`` per tensor name, in the report's order.
        groups: ``(kind, names)`` of each tie group, by the index a row's ``tie_group`` holds.
    """

    __slots__ = ("_groups", "_rows")

    def __init__(self, rows: Sequence[Row], groups: Sequence[tuple[str, Sequence[str]]]):
        self._rows = rows
        self._groups = list(groups)

    @classmethod
    def of(cls, facts: Sequence[TensorFact], groups: Sequence[TieGroup]) -> TensorRows:
        """One row per fact, in the facts' order, pointing at its tie group among ``groups``; each row
        is made from its fact when it is read (``FactRows``), never all of them at once."""
        index = {n: i for i, g in enumerate(groups) for n in g.names}
        return cls(FactRows(tuple(facts), index), [(g.kind, g.names) for g in groups])

    @classmethod
    def from_dicts(cls, rows: Iterable[Mapping[str, Any]], groups: Sequence[tuple[str, Sequence[str]]]) -> TensorRows:
        """Rows read back from a report's JSON, whose ``tie_group`` indices point into ``groups``."""
        return cls([Row(r["name"], tuple(r["shape"]), r["dtype"], r["numel"], r["bytes"], r["role"], r["device"],
                        r.get("tie_group")) for r in rows], groups)

    def _row(self, r: Row) -> TensorRow:
        gi = r.tie_group
        kind, names = self._groups[gi] if gi is not None else (None, ())
        return TensorRow(*r, kind, tuple(n for n in names if n != r.name))

    def dicts(self) -> Iterator[dict[str, Any]]:
        """The rows as the report's JSON writes them, one at a time."""
        groups = self._groups
        for r in self._rows:
            gi = r.tie_group
            kind, names = groups[gi] if gi is not None else (None, ())
            yield {"name": r.name, "shape": list(r.shape), "dtype": r.dtype, "numel": r.numel, "bytes": r.bytes,
                   "role": r.role, "device": r.device, "tie_group": gi, "tie_kind": kind,
                   "tied_with": [n for n in names if n != r.name]}

    def json_lines(self) -> Iterator[str]:
        """Each row as ``json.JSONEncoder(ensure_ascii=False).encode`` writes ``dicts()``'s, made
        without the dict: the same string function the encoder calls (``encode_basestring``, in C),
        and integers as their ``repr``. A dict per row and the encoder's walk over it were most of
        writing 100,000 rows; the text is the same byte for byte (``tests/test_report_outputs.py``)."""
        groups, quote = self._groups, encode_basestring
        text = {}  # dtype, role and device: a handful of distinct values, each quoted once

        def q(s: str) -> str:
            got = text.get(s)
            if got is None:
                got = text[s] = quote(s)
            return got

        def rest(r: Row, gi: int | None, kind: str | None, tied: str) -> str:
            """The row's text after its name."""
            return (f'"shape": [{", ".join(map(repr, r.shape))}], "dtype": {q(r.dtype)}, '
                    f'"numel": {r.numel!r}, "bytes": {r.bytes!r}, "role": {q(r.role)}, "device": {q(r.device)}, '
                    f'"tie_group": {"null" if gi is None else repr(gi)}, '
                    f'"tie_kind": {"null" if kind is None else q(kind)}, "tied_with": [{tied}]}}')

        # An untied row's text after its name is its other fields': a checkpoint of many tensors of a
        # few shapes writes each such tail once (a million rows, a handful of tails).
        tails: dict[tuple, str] = {}
        for r in self._rows:
            gi = r.tie_group
            if gi is None:
                fields = r[1:]
                tail = tails.get(fields)
                if tail is None:
                    tail = tails[fields] = rest(r, None, None, "")
                yield f'{{"name": {quote(r.name)}, {tail}'
                continue
            kind, names = groups[gi]
            yield f'{{"name": {quote(r.name)}, ' + rest(r, gi, kind, ", ".join([quote(n) for n in names if n != r.name]))

    def names(self) -> list[str]:
        """Every row's name, without making the rows."""
        if isinstance(self._rows, FactRows):
            return self._rows.names()
        return [r.name for r in self._rows]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __repr__(self) -> str:
        return f"TensorRows({len(self)} rows)"
