"""Hostile and broken servers: every promise of docs/security.md holds for remote bytes.

A server on the loopback (``support.servers.FileServer``) misbehaves one way per test: it ignores
the byte range, sends more than asked, stalls, redirects to another host, lies about the file's
size, compresses, or leaves out which bytes it sent; a file lies about its header length. Each is
one line and exit 2, within the timeout, with nothing left behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import tiecheck
from tiecheck.cli import main

from support.checkpoints import safetensors_with_header
from support.servers import FileServer


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A server over a folder holding a safetensors file of 1 MiB of data, a lying header, a
    torch.save file and an index naming a shard outside its folder; stand-ins under tmp_path."""
    root = tmp_path / "www"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(512, 256, generator=g), "b": torch.randn(512, 256, generator=g)},
              str(root / "m.safetensors"))
    (root / "liar.safetensors").write_bytes((2 ** 40 - 1).to_bytes(8, "little") + b'{"a": 1}' + b"\0" * 4096)
    (root / "long.safetensors").write_bytes(safetensors_with_header({}, b"", length=10_000))
    torch.save({"a": torch.zeros(4)}, root / "sd.pt")
    (root / "escape.index.json").write_text(json.dumps({"weight_map": {"a": "../m.safetensors"}}))
    monkeypatch.setenv("TIECHECK_REMOTE_TIMEOUT", "1")
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    with FileServer(root) as srv:
        srv.stall_s = 4.0
        srv.stand_ins = where
        yield srv


def _one_line(srv, target: str, *words: str) -> str:
    t0 = time.monotonic()
    res = CliRunner().invoke(main, ["inspect", target, "--no-flops"])
    took = time.monotonic() - t0
    assert res.exit_code == 2, res.output
    assert res.output.startswith("tiecheck: error: "), res.output
    assert res.output.count("\n") == 1, res.output
    for w in words:
        assert w in res.output, res.output
    assert "Traceback" not in res.output
    assert "unexpected" not in res.output
    assert os.listdir(srv.stand_ins) == []  # no stand-in left behind
    assert took < srv.stall_s, f"{took:.1f} s: the timeout did not cut the wait"
    return res.output


@pytest.mark.parametrize(("behaviour", "words"), [
    ("ignore-range", ["ignored the byte range", "HTTP 200", "download the file"]),
    ("more", ["sent more than the", "bytes asked for"]),
    ("stall", ["no answer within 1 s", "TIECHECK_REMOTE_TIMEOUT"]),
    ("stall-body", ["no answer within 1 s"]),
    # a size that lies from the first reply is held against the header, as a local file's size is
    ("size:99999999", ["not a valid safetensors file: the file holds 98,951,279 bytes after the last tensor"]),
    ("no-content-range", ["does not say which bytes it holds"]),
    ("gzip", ["compressed (gzip)"]),
])
def test_a_server_held_to_the_range_it_was_asked(served, behaviour, words):
    served.behaviour["m.safetensors"] = behaviour
    _one_line(served, served.url_of("m.safetensors"), "/m.safetensors: ", *words)
    assert served.sent["m.safetensors"] < 1 << 20 or behaviour in ("ignore-range", "more")


def test_a_lie_about_the_size_after_the_first_read(served):
    """The first reply says the true size; a later one (the content pass's samples) says another."""
    served.behaviour["m.safetensors"] = "size-late:5000000"
    _one_line(served, served.url_of("m.safetensors"), "the server says the file holds 5,000,000 bytes, after "
              "1,048,720 before: it changed while it was read")


def test_a_redirect_to_another_host_is_refused(served):
    with FileServer(served.root) as other:
        served.behaviour["m.safetensors"] = f"redirect:{other.url_of('m.safetensors')}?X-Amz-Signature=secret"
        out = _one_line(served, served.url_of("m.safetensors"), "redirected to", "another host")
        assert other.requests == {}  # never asked
        assert "secret" not in out  # a signed URL's query is not printed


def test_a_redirect_on_the_same_host_is_followed(served):
    served.behaviour["old.safetensors"] = "redirect:/m.safetensors"
    (served.root / "old.safetensors").write_bytes(b"")
    report = tiecheck.analyze(served.url_of("old.safetensors"))
    assert report.to_dict()["summary"]["bytes_unique"] == 2 * 512 * 256 * 4


def test_a_header_length_that_lies_is_refused_before_it_is_fetched(served):
    _one_line(served, served.url_of("liar.safetensors"), "/liar.safetensors: not a valid safetensors file",
              "exceeds the 100,000,000-byte limit")
    assert served.sent["liar.safetensors"] <= 4096
    _one_line(served, served.url_of("long.safetensors"), "/long.safetensors: not a valid safetensors file",
              "exceeds the file size")


def test_what_is_not_safetensors_is_not_downloaded(served):
    _one_line(served, served.url_of("sd.pt"), "/sd.pt: neither a safetensors file nor a weights index")
    assert served.sent["sd.pt"] <= 4096


def test_a_shard_outside_the_index_folder_is_refused_by_the_loader(served):
    out = _one_line(served, served.url_of("escape.index.json"), "lies outside its folder")
    assert f"{served.url}/escape.index.json" in out  # named by its URL, not by the stand-in folder
    assert "m.safetensors" not in served.sent


def test_missing_and_unreachable(served):
    _one_line(served, served.url_of("nothing.safetensors"), "not found (HTTP 404)")
    _one_line(served, "http://127.0.0.1:9/m.safetensors", "cannot fetch")
    _one_line(served, served.url_of("") + "empty/", "holds no safetensors weights")
