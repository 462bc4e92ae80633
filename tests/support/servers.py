"""Real servers on the loopback for the remote-target tests: no request leaves the machine.

* ``FileServer``: an HTTP/1.1 server (``http.server`` in a thread) serving a folder's files with
  single byte ranges, as a web server or a CDN does, and told per path to misbehave the ways a
  hostile or broken server does (ignore the range, send more than asked, stall, redirect
  elsewhere, lie about the size (from the first reply, or from the second on), compress). It counts the body bytes it sends per path.
* ``HubServer``: the endpoints huggingface_hub calls for a model, behind ``HF_ENDPOINT``:
  ``GET /api/models/{repo}[/revision/{rev}]`` (model info with file sizes), ``HEAD`` and ``GET``
  ``/{repo}/resolve/{rev}/{file}`` (small files answered here; safetensors files redirected to a
  second server standing for the CDN, as the Hub redirects LFS files), with the ``X-Error-Code``
  headers huggingface_hub turns into its errors.
* ``hf_cache``: a folder laid out as huggingface_hub lays its cache (blobs, snapshots, refs).
* ``s3_server``: moto's ``ThreadedMotoServer`` for the S3 API.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up mid-reply (as tiecheck does on a reply too long) is expected here


class _Base(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm, the body of a keep-alive
    # reply waits for the client's delayed ACK (40 ms a request), which no real server makes it do.
    disable_nagle_algorithm = True
    owner: Any = None

    def log_message(self, *args) -> None:  # quiet: the tests read the counters instead
        pass

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _route(self, head: bool) -> None:  # pragma: no cover - each server routes its own paths
        self._send(404, b"")

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _serve_file(self, path: Path, key: str, head: bool = False, extra: dict | None = None) -> None:
        """A file, whole or one byte range, with the owner's misbehaviour for ``key`` if any."""
        owner = self.owner
        size = path.stat().st_size
        how = owner.behaviour.get(key, "")
        owner.requests[key] += 1
        if how.startswith("redirect:"):
            return self._send(302, headers={"Location": how.split(":", 1)[1]})
        if how == "stall":
            time.sleep(owner.stall_s)
        m = _RANGE.match(self.headers.get("Range", "") or "")
        if m is None or how == "ignore-range":
            if not head:
                owner.sent[key] += size
            return self._send(200, path.read_bytes(), {"Accept-Ranges": "bytes", **(extra or {})}, head)
        start = int(m.group(1))
        end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        if start >= size:
            return self._send(416, headers={"Content-Range": f"bytes */{size}"})
        with open(path, "rb") as fh:  # the range alone: a benchmark serves gigabytes a few bytes at a time
            fh.seek(start)
            body = fh.read(end + 1 - start)
        total = size
        headers = {"Content-Range": f"bytes {start}-{end}/{total}", **(extra or {})}
        if how == "more":
            body += b"\0" * (1 << 20)  # a megabyte past the range
        elif how.startswith("size:") or (how.startswith("size-late:") and owner.requests[key] > 1):
            headers["Content-Range"] = f"bytes {start}-{end}/{how.split(':', 1)[1]}"
        elif how == "no-content-range":
            del headers["Content-Range"]
        elif how == "gzip":
            headers["Content-Encoding"] = "gzip"
        elif how == "stall-body":
            self.send_response(206)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:1])
            self.wfile.flush()
            time.sleep(owner.stall_s)
            return
        if not head:
            owner.sent[key] += len(body)
        self._send(206, body, headers, head)


class _Running:
    """A server on 127.0.0.1 in a thread, stopped by ``close``."""

    def __init__(self, handler: type) -> None:
        self.behaviour: dict[str, str] = {}
        self.requests: dict[str, int] = defaultdict(int)
        self.sent: dict[str, int] = defaultdict(int)
        self.stall_s = 3.0
        handler = type("Handler", (handler,), {"owner": self})
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _FileHandler(_Base):
    def _route(self, head: bool) -> None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        path = (self.owner.root / rel).resolve()
        if not path.is_file() or self.owner.root.resolve() not in path.parents:
            return self._send(404, b"not found")
        self._serve_file(path, rel, head)


class FileServer(_Running):
    """Serves ``root``'s files over HTTP with byte ranges; ``behaviour[relative path]`` misbehaves."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        super().__init__(_FileHandler)

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"


# -- the Hub ------------------------------------------------------------------------------------------

class _HubHandler(_Base):
    def _route(self, head: bool) -> None:
        hub: HubServer = self.owner
        path = unquote(urlsplit(self.path).path)
        hub.calls.append(f"{self.command} {path}")
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$", path)
        if m:
            return self._model_info(hub, m.group(1), m.group(2) or "main")
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._resolve(hub, m.group(1), m.group(2), m.group(3), head)
        self._send(404, b"no such endpoint")

    def _repo(self, hub: HubServer, repo: str, rev: str) -> tuple[str, Path] | None:
        if repo not in hub.repos:
            self._send(404, b"{}", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return None
        if repo in hub.gated:
            self._send(403, b"{}", {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
            return None
        revs = hub.repos[repo]
        for name, (sha, folder) in revs.items():
            if rev in (name, sha):
                return sha, folder
        self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        return None

    def _model_info(self, hub: HubServer, repo: str, rev: str) -> None:
        found = self._repo(hub, repo, rev)
        if found is None:
            return
        sha, folder = found
        siblings = [{"rfilename": p.name, "size": p.stat().st_size} for p in sorted(folder.iterdir()) if p.is_file()]
        body = json.dumps({"id": repo, "modelId": repo, "sha": sha, "private": False, "siblings": siblings}).encode()
        self._send(200, body, {"Content-Type": "application/json"})

    def _resolve(self, hub: HubServer, repo: str, rev: str, name: str, head: bool) -> None:
        found = self._repo(hub, repo, rev)
        if found is None:
            return
        sha, folder = found
        path = folder / name
        if not path.is_file():
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
        etag = hashlib.sha256(path.read_bytes()).hexdigest()
        meta = {"X-Repo-Commit": sha, "ETag": f'"{etag}"'}
        if name.endswith(".safetensors"):  # an LFS file: redirected to the CDN, as the Hub does
            meta.update({"X-Linked-Size": path.stat().st_size, "X-Linked-Etag": f'"{etag}"',
                         "Location": f"{hub.cdn.url}/{repo}/{sha}/{name}"})
            return self._send(302, headers=meta, head=head)
        self._serve_file(path, f"{repo}/{name}", head, meta)


class _CdnHandler(_Base):
    def _route(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        m = re.match(r"^/([^/]+/[^/]+)/([0-9a-f]+)/(.+)$", path)
        folder = next((f for revs in self.owner.hub.repos.values() for sha, f in revs.values()
                       if m and sha == m.group(2)), None)
        if m is None or folder is None or not (folder / m.group(3)).is_file():
            return self._send(404, b"")
        self._serve_file(folder / m.group(3), m.group(3), head)


class HubServer(_Running):
    """The Hub's model endpoints over ``repos[repo_id][revision] = (commit sha, folder)``."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, tuple[str, Path]]] = {}
        self.gated: set[str] = set()
        self.calls: list[str] = []
        self.cdn = _Running(_CdnHandler)
        self.cdn.hub = self
        super().__init__(_HubHandler)

    def add(self, repo_id: str, folder: Path, revision: str = "main", sha: str | None = None) -> str:
        sha = sha or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        self.repos.setdefault(repo_id, {})[revision] = (sha, Path(folder))
        return sha

    def close(self) -> None:
        super().close()
        self.cdn.close()


# -- the Hugging Face cache -------------------------------------------------------------------------------

def hf_cache(cache: Path, repo_id: str, folder: Path, sha: str, ref: str = "main",
             only: set[str] | None = None) -> Path:
    """Lay ``folder``'s files into ``cache`` as huggingface_hub does: ``models--org--name/blobs/<etag>``,
    ``snapshots/<sha>/<file>`` symlinked to its blob, ``refs/<ref>`` holding the sha. ``only`` keeps
    some files out (a partial download). Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(sha)
    for p in sorted(folder.iterdir()):
        if not p.is_file() or (only is not None and p.name not in only):
            continue
        blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copyfile(p, blob)
        os.symlink(os.path.relpath(blob, snap), snap / p.name)
    return snap


# -- S3 ---------------------------------------------------------------------------------------------------

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_SESSION_TOKEN": "testing"}


def s3_server() -> Iterator[tuple[str, Any]]:
    """moto's S3 server on the loopback: yields (endpoint URL, a boto3 client to fill it)."""
    import boto3  # noqa: PLC0415 - boto3 and moto take a second to import: only the S3 tests pay it
    from moto.server import ThreadedMotoServer  # noqa: PLC0415 - idem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    try:
        yield url, client
    finally:
        server.stop()
