"""Remote bytes, read by range: every byte tiecheck fetches from a server comes through here.

A remote file is read in byte ranges it was asked for and nothing else, and a server is held to
the request as a file is held to its header: it must answer a range with exactly that range
(HTTP 206 and a matching ``Content-Range``), say the same file size every time, stay on the host
it was named by, and keep answering. Anything else is one line (a ``RemoteError``), never a
download:

* a reply longer than asked is cut at the first byte past the range and refused, so a server
  cannot make tiecheck hold more than it asked for; a reply to a range that sends the whole file
  (HTTP 200) is refused before its body is read;
* no answer, or a pause in a reply, longer than the timeout (``TIECHECK_REMOTE_TIMEOUT``, 30 s by
  default) ends the read; so does a reply that trickles (slower than ``MIN_RATE`` on average once
  four timeouts have passed);
* a redirect is followed only to the same origin (scheme, host and port) as the URL it came
  from; a redirect elsewhere is refused and named, since tiecheck reads from the host the target
  names (the Hub's own redirect to its CDN is huggingface_hub's answer, read once from
  ``get_hf_file_metadata``, and the CDN is then held to the same rules);
* a compressed reply is refused (``Accept-Encoding: identity`` is asked): its decoded size is
  not the range's.

HTTP(S) and the Hub are read with the httpx client huggingface_hub uses (``get_session()`` for the
Hub, so its offline mode and headers apply), streamed, so the cuts above happen while the reply
arrives. fsspec's HTTP reader is not used for them: it reads a 206 reply whole whatever its
length. ``s3://`` and ``gs://`` go through fsspec (s3fs, gcsfs), whose clients read a reply
whole: there the length is checked after the read, and S3 gets the timeout as botocore's.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from tiecheck.errors import TargetError

DEFAULT_TIMEOUT = 30.0
MIN_RATE = 64 << 10  # bytes per second a long reply must average once 4 timeouts have passed
MAX_REDIRECTS = 5
_CHUNK = 64 << 10
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


class RemoteError(TargetError):
    """A remote file could not be read as asked: the server, the network or the request."""


class RemoteNotFound(RemoteError):
    """The remote file does not exist (HTTP 404, no such object, no such entry in the repository)."""


def timeout() -> float:
    """Seconds to wait for an answer or for the next bytes of one (``TIECHECK_REMOTE_TIMEOUT``)."""
    raw = os.environ.get("TIECHECK_REMOTE_TIMEOUT", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise TargetError(f"TIECHECK_REMOTE_TIMEOUT={raw!r}: not a number of seconds") from None
    if not value > 0:
        raise TargetError(f"TIECHECK_REMOTE_TIMEOUT={raw!r}: must be more than 0 seconds")
    return value


@dataclass
class FetchStats:
    """What was fetched from remote files for one target, as the report states it.

    ``section`` is the report's ``remote`` object, kept up to date as bytes arrive: the subject
    carries it in ``extra`` from the moment it is loaded, and the content pass fetches after that,
    so the report (built after the pass) holds the final count.
    """

    bytes: int = 0
    requests: int = 0
    section: dict[str, Any] = field(default_factory=lambda: {"bytes_fetched": 0, "requests": 0})
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, n: int) -> None:
        with self._lock:  # samples are fetched from several threads at once
            self.bytes += n
            self.requests += 1
            self.section["bytes_fetched"] = self.bytes
            self.section["requests"] = self.requests


def http_client_module() -> Any:
    """httpx2, the HTTP client huggingface_hub >= 2 uses (installed with it)."""
    try:
        import httpx2  # noqa: PLC0415 - only remote targets need it
    except ImportError:
        raise TargetError("reading URLs and Hub ids needs huggingface_hub >= 2 (and its httpx2): pip install "
                          "'tiecheck[remote]'") from None
    return httpx2


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the port filled in from the scheme."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.scheme, (parts.hostname or "").lower(), port


class RemoteFile:
    """One remote file of known size, read by range. ``where`` is how errors name it."""

    where: str
    size: int
    stats: FetchStats

    def pread(self, n: int, offset: int) -> bytes:
        """Exactly ``n`` bytes from ``offset`` (``content.RangeSource``), counted in ``stats``."""
        if n <= 0:
            return b""
        if offset < 0 or offset + n > self.size:
            raise RemoteError(f"{self.where}: bytes {offset:,}-{offset + n - 1:,} lie past the end of the "
                              f"{self.size:,}-byte file")
        data = self._fetch(offset, n)
        self.stats.add(len(data))
        return data

    def _fetch(self, offset: int, n: int) -> bytes:  # pragma: no cover - each kind of file has its own
        raise NotImplementedError

    def probe(self, n: int) -> bytes:
        """The first bytes of the file, at most ``n``."""
        return self.pread(min(n, self.size), 0)

    def read_whole(self, limit: int, what: str) -> bytes:
        """The whole file (a config or an index), refused above ``limit`` bytes before it is fetched."""
        if self.size > limit:
            raise RemoteError(f"{self.where}: {self.size:,} bytes is more than any {what} holds (the limit is "
                              f"{limit:,}); refusing to fetch it")
        return self.pread(self.size, 0)


class HttpFile(RemoteFile):
    """A file behind an HTTP(S) URL, read with Range requests through an httpx client.

    Args:
        url: where the bytes are.
        where: how errors name the file.
        stats: the target's fetch counter.
        client: an ``httpx2.Client`` (huggingface_hub's session for the Hub).
        headers: sent with every request (the Hub's auth headers, only to a Hub origin).
        size: the file's size when known (the Hub says it); else the first read learns it.
    """

    def __init__(self, url: str, where: str, stats: FetchStats, client: Any, headers: dict[str, str] | None = None,
                 size: int | None = None):
        self.url, self.where, self.stats, self.client = url, where, stats, client
        self.headers = dict(headers or {})
        self.size = -1 if size is None else size
        self._redirect_lock = threading.Lock()

    def probe(self, n: int) -> bytes:
        """The first bytes of the file, at most ``n``; learns its size when it was not known."""
        if self.size >= 0:
            return self.pread(min(n, self.size), 0)
        data = self._fetch(0, n, short_ok=True)
        self.stats.add(len(data))
        return data

    def _fetch(self, offset: int, n: int, short_ok: bool = False) -> bytes:
        httpx2 = http_client_module()

        limit = timeout()
        url = self.url
        try:
            for _ in range(MAX_REDIRECTS + 1):
                headers = {**self.headers, "Range": f"bytes={offset}-{offset + n - 1}", "Accept-Encoding": "identity"}
                with self.client.stream("GET", url, headers=headers, follow_redirects=False,
                                        timeout=httpx2.Timeout(limit)) as reply:
                    if reply.status_code in (301, 302, 303, 307, 308):
                        url = self._redirected(url, reply.headers.get("location"))
                        continue
                    return self._body(reply, offset, n, short_ok, limit)
        except httpx2.TimeoutException:
            raise RemoteError(f"{self.where}: no answer within {limit:g} s (TIECHECK_REMOTE_TIMEOUT sets the "
                              f"timeout)") from None
        except httpx2.HTTPError as e:
            raise RemoteError(f"{self.where}: cannot fetch ({type(e).__name__}: {_first_line(e)})") from None
        except TargetError:
            raise
        except Exception as e:
            if type(e).__name__ == "OfflineModeIsEnabled":
                raise RemoteError(f"{self.where}: HF_HUB_OFFLINE is set, so the Hub is not asked; unset it to "
                                  f"fetch headers") from None
            raise
        raise RemoteError(f"{self.where}: more than {MAX_REDIRECTS} redirects")

    def _redirected(self, url: str, location: str | None) -> str:
        """The next URL of a redirect, if it stays on the same origin; remembered for later reads."""
        if not location:
            raise RemoteError(f"{self.where}: the server answered a redirect without a Location")
        target = urljoin(url, location)
        if origin(target) != origin(url):
            raise RemoteError(f"{self.where}: the server redirected to {_shown(target)}, another host; tiecheck "
                              f"reads only from the host the target names (give that URL if you trust it)")
        with self._redirect_lock:
            self.url = target
        return target

    def _body(self, reply: Any, offset: int, n: int, short_ok: bool, limit: float) -> bytes:
        code = reply.status_code
        if code == 200:
            raise RemoteError(f"{self.where}: the server ignored the byte range and began sending the whole file "
                              f"(HTTP 200); tiecheck reads remote files by range only: download the file and "
                              f"inspect it locally")
        if code == 416:
            raise RemoteError(f"{self.where}: the server says bytes {offset:,}-{offset + n - 1:,} are past the end "
                              f"of the file (HTTP 416): the file is shorter than its size says")
        if code == 404:
            raise RemoteNotFound(f"{self.where}: not found (HTTP 404)")
        if code != 206:
            raise RemoteError(f"{self.where}: {_status_text(code)}")
        encoding = reply.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise RemoteError(f"{self.where}: the server sent the range compressed ({encoding}) though asked not to")
        want = self._check_range(reply.headers.get("content-range"), offset, n, short_ok)
        deadline = time.monotonic() + 4 * limit + want / MIN_RATE
        data = bytearray()
        for chunk in reply.iter_raw(_CHUNK):
            data += chunk
            if len(data) > want:
                raise RemoteError(f"{self.where}: the server sent more than the {want:,} bytes asked for "
                                  f"(bytes {offset:,}-{offset + want - 1:,}); refusing the reply")
            if time.monotonic() > deadline:
                raise RemoteError(f"{self.where}: the reply is too slow ({len(data):,} of {want:,} bytes after "
                                  f"{4 * limit + want / MIN_RATE:.0f} s)")
        if len(data) < want:
            raise RemoteError(f"{self.where}: the reply ended after {len(data):,} of the {want:,} bytes asked for")
        return bytes(data)

    def _check_range(self, header: str | None, offset: int, n: int, short_ok: bool) -> int:
        """How many bytes the reply must hold, from its ``Content-Range``; sets or checks the size."""
        m = _CONTENT_RANGE.match(header or "")
        if m is None or m.group(3) == "*":
            raise RemoteError(f"{self.where}: the server's partial reply does not say which bytes it holds and of "
                              f"what size (Content-Range: {header!r})")
        first, last, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if self.size < 0:
            self.size = total
        elif total != self.size:
            raise RemoteError(f"{self.where}: the server says the file holds {total:,} bytes, after "
                              f"{self.size:,} before: it changed while it was read; try again")
        end = min(offset + n, total) if short_ok else offset + n
        if first != offset or last != end - 1 or last >= total:
            raise RemoteError(f"{self.where}: asked for bytes {offset:,}-{offset + n - 1:,}, the server answered "
                              f"bytes {first:,}-{last:,} of {total:,}")
        return end - offset


class FsspecFile(RemoteFile):
    """An object in a store fsspec reads (``s3://`` with s3fs, ``gs://`` with gcsfs)."""

    def __init__(self, fs: Any, path: str, where: str, size: int, stats: FetchStats):
        self.fs, self.path, self.where, self.size, self.stats = fs, path, where, size, stats

    def _fetch(self, offset: int, n: int) -> bytes:
        data = call_store(lambda: self.fs.cat_file(self.path, start=offset, end=offset + n), self.where)
        if len(data) != n:
            raise RemoteError(f"{self.where}: asked for {n:,} bytes at {offset:,}, the store sent {len(data):,}")
        return data


def call_store(fn: Callable[[], Any], where: str) -> Any:
    """Call into a storage library, its failures as one line each."""
    try:
        return fn()
    except FileNotFoundError:
        raise RemoteNotFound(f"{where}: no such object") from None
    except PermissionError as e:
        raise RemoteError(f"{where}: access denied ({_first_line(e)})") from None
    except TargetError:
        raise
    except Exception as e:  # noqa: BLE001 - s3fs, gcsfs and their clients raise many kinds; each is the store's
        if "credential" in type(e).__name__.lower():
            raise RemoteError(f"{where}: no credentials for the store ({_first_line(e)}); set them as its client "
                              f"reads them (e.g. AWS_ACCESS_KEY_ID, AWS_PROFILE)") from None
        if "timeout" in type(e).__name__.lower():
            raise RemoteError(f"{where}: no answer within {timeout():g} s (TIECHECK_REMOTE_TIMEOUT sets the "
                              f"timeout)") from None
        raise RemoteError(f"{where}: cannot read ({type(e).__name__}: {_first_line(e)})") from None


def store_options(protocol: str) -> dict[str, Any]:
    """fsspec options that bound a store's waits by the timeout, where its library takes one."""
    if protocol in ("s3", "s3a"):
        t = timeout()
        return {"config_kwargs": {"connect_timeout": t, "read_timeout": t,
                                  "retries": {"max_attempts": 2, "mode": "standard"}}}
    return {}


def _status_text(code: int) -> str:
    if code in (401, 403):
        return f"access denied (HTTP {code}); for a gated or private model, log in (hf auth login)"
    return f"the server answered HTTP {code}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _shown(url: str) -> str:
    """A URL as an error shows it: without its query (a signed URL carries credentials there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
