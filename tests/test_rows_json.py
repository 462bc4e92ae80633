"""``TensorRows.json_lines`` writes each row as the json module's C encoder writes the row's dict.

The report's JSON must not change with the faster row writer: every name a checkpoint can hold
(quotes, backslashes, control characters, non-ASCII, lone surrogates, the line separators the
report escapes afterwards), tie groups of several names, and rows read back from a report.
"""

from __future__ import annotations

import json

from tiecheck.report.rows import Row, TensorRows

NAMES = [
    "model.embed_tokens.weight",
    'a"quote\\back\\slash',
    "tab\there\nnewline\r\x00nul\x1b[31mred",
    "ünïcödé.名前.weight",
    "lone\ud800surrogate",
    "line\u2028sep\u2029para\x7fdel\x9bcsi",
    "",
]


def _rows() -> TensorRows:
    rows = [Row(n, (8, 8) if i % 2 else (3,), "bfloat16" if i % 3 else "float32", 64, 256,
                "buffer" if i == 2 else "parameter", "meta" if i == 3 else "cpu", 0 if i < 3 else None)
            for i, n in enumerate(NAMES)]
    rows.append(Row("scalar", (), "int64", 1, 8, "tensor", "cpu", 1))
    return TensorRows(rows, [("same_parameter", tuple(NAMES[:3])), ("view", ("scalar", "x\u2028y"))])


def test_each_line_is_the_encoders_text_of_the_rows_dict():
    rows = _rows()
    encode = json.JSONEncoder(ensure_ascii=False).encode
    assert list(rows.json_lines()) == [encode(d) for d in rows.dicts()]


def test_rows_read_back_from_a_report_write_the_same_lines():
    rows = _rows()
    back = TensorRows.from_dicts([json.loads(line) for line in rows.json_lines()],
                                 [("same_parameter", tuple(NAMES[:3])), ("view", ("scalar", "x\u2028y"))])
    assert list(back.json_lines()) == list(rows.json_lines())


def test_rows_sharing_every_field_but_the_name_each_write_their_own_name():
    rows = TensorRows([Row(f"experts.{i}.w", (8, 8), "float32", 64, 256, "tensor", "cpu", None) for i in range(5)]
                      + [Row("experts.5.w", (8, 8), "float32", 64, 256, "tensor", "cpu", 0),
                         Row("experts.6.w", (8, 8), "float32", 64, 256, "tensor", "cpu", 0),
                         Row("experts.7.w", (8, 8), "float32", 64, 255, "tensor", "cpu", None)],
                      [("shared_storage", ("experts.5.w", "experts.6.w"))])
    encode = json.JSONEncoder(ensure_ascii=False).encode
    assert list(rows.json_lines()) == [encode(d) for d in rows.dicts()]
