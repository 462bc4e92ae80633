"""A weights index is recognised by its parse (a ``weight_map`` object); a JSON file that cannot be one is
turned away before it is parsed, never an index that spells its key with escapes."""

from __future__ import annotations

import json

import pytest

import tiecheck.loaders.detect as detect
from tiecheck.loaders.detect import WEIGHTS_INDEX, sniff_file


@pytest.mark.parametrize(("text", "kind"), [
    ('{"weight_map": {"a": "m.safetensors"}}', WEIGHTS_INDEX),
    ('{"weight\\u005fmap": {"a": "m.safetensors"}}', WEIGHTS_INDEX),  # the same key, escaped
    ('{"\\u0077eight_map": {"a": "m.safetensors"}}', WEIGHTS_INDEX),
    ('{"weight_map": []}', None),
    ('{"weightmap": {"a": "m.safetensors"}}', None),
    ('{"schema_version": 3, "tensors": [{"name": "\\u00e9"}]}', None),
])
def test_an_index_is_known_by_its_weight_map_however_spelled(tmp_path, text, kind):
    path = tmp_path / "x.json"
    path.write_text(text)
    assert json.loads(text) is not None
    assert sniff_file(path) == kind


def test_json_without_the_key_is_not_parsed(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"schema_version": 3, "tensors": [{"name": f"t{i}"} for i in range(1000)]}))

    def parse(raw):
        raise AssertionError("parsed")

    monkeypatch.setattr(detect, "parse_json", parse)
    assert sniff_file(path) is None
