"""The report's per-tensor rows, kept compact and made into dicts when read.

A report holds one row per tensor name. As dicts, 100,000 rows take about 60 MB (a ten-key dict,
a shape list and a tied-with list each); as tuples they take a third of that, and a checkpoint of
that size is exactly where the peak memory of ``inspect`` matters. ``TensorRows`` is a read-only
sequence of the same dicts, each built on access, so every reader of ``Report.tensors`` (indexing,
iteration, ``len``, comparison with a list) sees what it saw before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, overload


class Row(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    bytes: int
    role: str
    device: str
    tie_group: int | None  # index into the groups given to TensorRows


class TensorRows(Sequence):
    """Rows as dicts: ``name, shape, dtype, numel, bytes, role, device, tie_group, tie_kind, tied_with``.

    Args:
        rows: one ``Row`` per tensor name, in the report's order.
        groups: ``(kind, names)`` of each tie group, by the index a row's ``tie_group`` holds.
    """

    __slots__ = ("_groups", "_rows")

    def __init__(self, rows: list[Row], groups: Sequence[tuple[str, Sequence[str]]]):
        self._rows = rows
        self._groups = list(groups)

    def _dict(self, r: Row) -> dict[str, Any]:
        gi = r.tie_group
        kind, names = self._groups[gi] if gi is not None else (None, ())
        return {"name": r.name, "shape": list(r.shape), "dtype": r.dtype, "numel": r.numel, "bytes": r.bytes,
                "role": r.role, "device": r.device, "tie_group": gi, "tie_kind": kind,
                "tied_with": [n for n in names if n != r.name]}

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._dict(r) for r in self._rows[i]]
        return self._dict(self._rows[i])

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return map(self._dict, self._rows)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __repr__(self) -> str:
        return f"TensorRows({len(self)} rows)"
