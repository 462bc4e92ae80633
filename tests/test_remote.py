"""Remote targets read where they are: over HTTP with byte ranges, from the Hub's endpoints (through
huggingface_hub, over real HTTP), from the Hugging Face cache, and from S3 (moto's server).

Every server runs on the loopback (``support.servers``); each test holds the remote report to the
report of the same files read locally, and the bytes fetched to what a header-only read needs.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import tiecheck
from tiecheck.cli import main
from tiecheck.errors import TargetError
from tiecheck.loaders import content
from tiecheck.loaders.value_match import value_match

from support.hf import EMB, HEAD, tiny_llama
from support.servers import S3_ENV, FileServer, HubServer, hf_cache, s3_server


def _shape(report) -> dict:
    """What a report says about ties and findings, whatever the target's name."""
    d = report.to_dict()
    return {"format": d["source"]["format"], "ties": [g["names"] for g in d["tie_groups"]],
            "findings": sorted((f["code"], tuple(f["names"])) for f in d["findings"]),
            "tensors": len(d["tensors"]), "bytes": d["summary"]["bytes_unique"]}


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Stand-in folders go here, so a test can see that none is left behind."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


@pytest.fixture
def llama_folder(tmp_path):
    """A tied one-layer Llama as save_pretrained writes it (safetensors, the tied head dropped)."""
    folder = tmp_path / "tied"
    tiny_llama(tie=True).save_pretrained(folder)
    return folder


@pytest.fixture
def sharded_untied(tmp_path):
    """An untied Llama in several shards with an index, the head stored twice with equal content."""
    folder = tmp_path / "sharded"
    model = tiny_llama(tie=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.save_pretrained(folder, max_shard_size="4KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.fixture
def duplicate_file(tmp_path):
    """A safetensors file whose head is a copy of the embedding (a broken tie), and other tensors."""
    path = tmp_path / "files" / "dup.safetensors"
    path.parent.mkdir()
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(256, 64, generator=g)
    save_file({EMB: emb, HEAD: emb.clone(), "a.weight": torch.randn(256, 64, generator=g),
               "b.weight": torch.randn(256, 64, generator=g)}, str(path))
    return path


# -- HTTP(S) --------------------------------------------------------------------------------------------

def test_a_url_to_a_safetensors_file_is_read_by_range(duplicate_file, private_tmp):
    local = tiecheck.analyze(str(duplicate_file))
    with FileServer(duplicate_file.parent) as srv:
        report = tiecheck.analyze(srv.url_of("dup.safetensors"))
        sent = srv.sent["dup.safetensors"]
    assert _shape(report) == _shape(local)
    assert ("TC005", (HEAD, EMB)) in _shape(report)["findings"]
    d = report.to_dict()
    assert d["source"]["target"].endswith("/dup.safetensors")
    # What the server sent is what the report says it fetched: the header, the samples, and the
    # duplicate pair compared in full (64 KiB each); never the two other tensors.
    size = duplicate_file.stat().st_size
    pair = 2 * 256 * 64 * 4
    assert d["remote"]["bytes_fetched"] == sent
    assert pair < sent < pair + 4096 + 2048
    assert sent < size
    assert os.listdir(private_tmp) == []  # the stand-in folder is gone
    del report
    gc.collect()
    assert content._STAND_INS == {}  # and its registrations went with the subject


def test_without_duplicates_only_headers_are_fetched(duplicate_file):
    with FileServer(duplicate_file.parent) as srv:
        report = tiecheck.analyze(srv.url_of("dup.safetensors"), duplicates=False)
        sent = srv.sent["dup.safetensors"]
    header = 8 + int.from_bytes(duplicate_file.read_bytes()[:8], "little")
    assert sent == min(4096, duplicate_file.stat().st_size) >= header
    assert report.to_dict()["remote"]["requests"] == 1


def test_a_url_to_a_folder_is_a_hugging_face_folder(llama_folder):
    local = tiecheck.analyze(str(llama_folder))
    with FileServer(llama_folder.parent) as srv:
        report = tiecheck.analyze(srv.url_of("tied/"))
    assert _shape(report) == _shape(local)
    d = report.to_dict()
    assert d["source"]["format"] == "Hugging Face folder (safetensors)"
    assert d["hf"]["architecture"]["class"] == "LlamaForCausalLM"
    assert any(f["code"] == "TC012" for f in d["findings"])  # the dropped head: tied by the architecture
    assert not any("tiecheck-remote" in n for n in d["source"]["notes"])


def test_a_url_to_an_index_reads_every_shard_header(sharded_untied):
    local = tiecheck.analyze(str(sharded_untied / "model.safetensors.index.json"))
    with FileServer(sharded_untied.parent) as srv:
        report = tiecheck.analyze(srv.url_of("sharded/model.safetensors.index.json"))
        shards = {k for k in srv.sent if k.endswith(".safetensors")}
    assert _shape(report) == _shape(local)
    assert shards == {f"sharded/{p.name}" for p in sharded_untied.glob("*.safetensors")}
    assert len(shards) > 1


def test_the_hugging_face_reconciliation_compares_remote_bytes(sharded_untied, tmp_path):
    """The folder loader compares a tied pair stored twice: through the stand-in, the bytes it
    compares are the remote ones, not the stand-in's hole (zeros would be equal whatever the files hold)."""
    config = json.loads((sharded_untied / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (sharded_untied / "config.json").write_text(json.dumps(config))
    equal_local = _shape(tiecheck.analyze(str(sharded_untied)))
    with FileServer(sharded_untied.parent) as srv:
        equal_remote = _shape(tiecheck.analyze(srv.url_of("sharded/")))
    assert equal_remote == equal_local
    assert any(code == "TC016" for code, _ in equal_remote["findings"])  # stored twice, equal
    # Now the copies differ: transformers would warn and load them untied.
    other = tmp_path / "differ"
    other.mkdir()
    for p in sharded_untied.iterdir():
        other.joinpath(p.name).write_bytes(p.read_bytes())
    index = json.loads((other / "model.safetensors.index.json").read_text())
    shard = other / index["weight_map"][HEAD]
    from safetensors.torch import load_file  # noqa: PLC0415 - the reference reader, to rewrite one shard
    tensors = load_file(str(shard))
    tensors[HEAD] = tensors[HEAD] + 1
    save_file(tensors, str(shard), metadata={"format": "pt"})
    differ_local = _shape(tiecheck.analyze(str(other)))
    with FileServer(tmp_path) as srv:
        differ_remote = _shape(tiecheck.analyze(srv.url_of("differ/")))
    assert differ_remote == differ_local
    assert any(code == "TC015" for code, _ in differ_remote["findings"])  # declared tied, stored different


def test_the_cli_says_what_was_fetched(duplicate_file):
    with FileServer(duplicate_file.parent) as srv:
        res = CliRunner().invoke(main, ["inspect", srv.url_of("dup.safetensors"), "--no-flops"])
    assert res.exit_code == 1, res.output  # the broken tie is an error
    assert "range requests" in res.output
    assert "fetched" in res.output


# -- the Hub ----------------------------------------------------------------------------------------------

@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The Hub's endpoints on the loopback, as HF_ENDPOINT names them (huggingface_hub reads it at import,
    into these two constants); an empty cache; online."""
    with HubServer() as server:
        monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        yield server


def test_a_hub_id_is_read_from_the_hub_without_its_weights(hub, llama_folder, sharded_untied):
    hub.add("org/tiny", llama_folder)
    sha = hub.add("org/tiny", sharded_untied, revision="untied")
    report = tiecheck.analyze("org/tiny")
    assert _shape(report) == _shape(tiecheck.analyze(str(llama_folder)))
    d = report.to_dict()
    assert d["source"]["target"] == "org/tiny"
    assert d["remote"]["where"] == "hub"
    assert d["remote"]["revision"] == "main"
    assert "GET /api/models/org/tiny" in hub.calls
    assert any(c.startswith("HEAD /org/tiny/resolve/") for c in hub.calls)
    # The weights come from the CDN the Hub redirects to, by range, and not whole.
    weights = llama_folder / "model.safetensors"
    assert 0 < hub.cdn.sent["model.safetensors"] < weights.stat().st_size

    at = tiecheck.analyze("org/tiny@untied")
    assert _shape(at) == _shape(tiecheck.analyze(str(sharded_untied)))
    assert at.to_dict()["remote"]["commit"] == sha
    assert "GET /api/models/org/tiny/revision/untied" in hub.calls


@pytest.mark.parametrize(("target", "message"), [
    ("org/none", "no such file or folder, bundled model or Python spec, and no model org/none on the Hugging Face Hub"),
    ("org/tiny@nope", "org/tiny has no revision 'nope' on the Hub"),
    ("org/gated", "is gated on the Hub"),
])
def test_a_hub_id_that_is_not_there_is_one_line(hub, llama_folder, target, message):
    hub.add("org/tiny", llama_folder)
    hub.add("org/gated", llama_folder)
    hub.gated.add("org/gated")
    res = CliRunner().invoke(main, ["inspect", target, "--no-flops"])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1, res.output
    assert message in res.output, res.output


def test_a_path_that_exists_wins_over_a_hub_id(hub, llama_folder, tmp_path, monkeypatch):
    hub.add("org/tiny", llama_folder)
    (tmp_path / "org").mkdir()
    save_file({"x": torch.zeros(3)}, str(tmp_path / "org" / "tiny"))
    monkeypatch.chdir(tmp_path)
    report = tiecheck.analyze("org/tiny")
    assert report.to_dict()["source"]["format"] == "safetensors"
    assert hub.calls == []


def test_the_cache_comes_first_and_works_offline(hub, llama_folder, monkeypatch):
    sha = hub.add("org/tiny", llama_folder)
    snap = hf_cache(Path(hf_constants.HF_HUB_CACHE), "org/tiny", llama_folder, sha)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    report = tiecheck.analyze("org/tiny")
    assert _shape(report) == _shape(tiecheck.analyze(str(llama_folder)))
    assert hub.calls == []
    d = report.to_dict()
    assert d["remote"] == {"where": "cache", "repo_id": "org/tiny", "revision": "main", "snapshot": str(snap),
                           "bytes_fetched": 0, "requests": 0}
    assert tiecheck.analyze(f"org/tiny@{sha}").to_dict()["source"]["target"] == f"org/tiny@{sha}"


def test_a_partial_download_in_the_cache_is_read_from_the_hub(hub, llama_folder, monkeypatch):
    sha = hub.add("org/tiny", llama_folder)
    hf_cache(Path(hf_constants.HF_HUB_CACHE), "org/tiny", llama_folder, sha, only={"config.json"})
    report = tiecheck.analyze("org/tiny")
    assert report.to_dict()["remote"]["where"] == "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TargetError, match="not in the local Hugging Face cache with its weights, and HF_HUB_OFFLINE"):
        tiecheck.analyze("org/tiny")


def test_offline_with_a_cache_from_the_environment(llama_folder, tmp_path):
    """HF_HUB_CACHE and HF_HUB_OFFLINE=1 as a user sets them, read by a fresh interpreter (huggingface_hub
    reads them at import): a cached model is inspected, one not cached is one line."""
    cache = tmp_path / "cache"
    hf_cache(cache, "org/tiny", llama_folder, "a" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "CI": "true"}
    script = ("import json; from click.testing import CliRunner; from tiecheck.cli import main; "
              "runs = [CliRunner().invoke(main, ['inspect', t, '--no-flops', '--format', 'json']) "
              "for t in ('org/tiny', 'org/other')]; "
              "print(json.dumps([[r.exit_code, r.stdout, r.stderr] for r in runs]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    (code, out, _), (other_code, _, other_err) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert code == 0, proc.stderr
    d = json.loads(out)
    assert d["remote"]["where"] == "cache"
    assert d["hf"]["architecture"]["class"] == "LlamaForCausalLM"
    assert other_code == 2
    assert other_err.count("\n") == 1
    assert "org/other: not in the local Hugging Face cache with its weights, and HF_HUB_OFFLINE is set" in other_err


# -- S3 (moto) --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3():
    yield from s3_server()


@pytest.fixture
def bucket(s3, monkeypatch, llama_folder, duplicate_file):
    url, client = s3
    for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": url}.items():
        monkeypatch.setenv(k, v)
    name = f"models-{os.getpid()}-{len(client.list_buckets()['Buckets'])}"
    client.create_bucket(Bucket=name)
    for p in llama_folder.iterdir():
        client.upload_file(str(p), name, f"tiny/{p.name}")
    client.upload_file(str(duplicate_file), name, "files/dup.safetensors")
    return name


def test_an_s3_folder_and_file_are_read_by_range(bucket, llama_folder, duplicate_file):
    folder = tiecheck.analyze(f"s3://{bucket}/tiny")
    assert _shape(folder) == _shape(tiecheck.analyze(str(llama_folder)))
    assert folder.to_dict()["source"]["target"] == f"s3://{bucket}/tiny"
    one = tiecheck.analyze(f"s3://{bucket}/files/dup.safetensors")
    assert _shape(one) == _shape(tiecheck.analyze(str(duplicate_file)))
    fetched = one.to_dict()["remote"]["bytes_fetched"]
    assert fetched < duplicate_file.stat().st_size


def test_a_missing_object_is_one_line(bucket):
    res = CliRunner().invoke(main, ["inspect", f"s3://{bucket}/nothing/here.safetensors", "--no-flops"])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1
    assert f"s3://{bucket}/nothing/here.safetensors: no such object" in res.output


def test_remote_values_are_read_by_range_only(tmp_path):
    """A remote tensor is handed out on the meta device: read through the loader's view of the stand-in,
    every value would be zero, and two different remote files would match byte for byte (as ``diff``
    across formats matches tensors)."""
    g = torch.Generator().manual_seed(3)
    save_file({"x": torch.randn(64, 16, generator=g)}, str(tmp_path / "a.safetensors"))
    save_file({"y": torch.randn(64, 16, generator=g)}, str(tmp_path / "b.safetensors"))
    with FileServer(tmp_path) as srv:
        x = tiecheck.loaders.load_target(srv.url_of("a.safetensors")).tensors["x"]
        y = tiecheck.loaders.load_target(srv.url_of("b.safetensors")).tensors["y"]
    assert x.device.type == "meta"
    assert (x.shape, x.dtype) == ((64, 16), torch.float32)
    assert value_match(x, y) is None
