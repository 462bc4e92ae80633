"""Remote targets: Hugging Face Hub model ids and ``https://``, ``s3://``, ``gs://`` URLs, read
without downloading weights.

A Hub id (``org/name``, ``org/name@revision``) is read from the local Hugging Face cache when the
cache holds the model with its weights (``huggingface_hub.try_to_load_from_cache``; this works
with ``HF_HUB_OFFLINE=1``), exactly as the folder it is. Otherwise, as for a URL, the remote files
are read where they are, by range (``ranges.py``):

1. the folder's ``config.json`` and weights index are fetched whole (each bounded);
2. each safetensors file's first bytes and header are fetched, and the file is laid out as a
   *stand-in* in a private temporary folder: its real header, then a hole the size of its data
   (a sparse file, no disk used). The stand-in's path is registered with ``content.py`` as backed
   by the remote file, so every read of its data is a range request and never the hole;
3. the temporary folder is read by the same loaders as any local folder (``load_path``): the
   same safetensors header parser and checks, the same Hugging Face reconciliation (``hf.py``),
   the same alias maps; the folder is then removed (the loaders' memory maps keep the stand-ins
   as long as the subject lives, and the registrations are released with it).

Errors and notes name the remote files (``hf://org/name/model.safetensors``, the URL), never the
temporary folder. Only safetensors weights are read remotely: a ``torch.save`` zip is read from
its end (its central directory) and as a whole pickle, which is a download.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urljoin

import torch

# The `remote` extra. This module is itself imported only for a URL or what may be a Hub id (the
# loaders' READERS table), so its libraries load at its top; without them a Hub id or a store URL
# is refused in one line that names the extra.
try:
    import huggingface_hub as hub
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.utils import HFValidationError, build_hf_headers, validate_repo_id
except ImportError:  # pragma: no cover - exercised with the extra uninstalled
    hub = None
try:
    import fsspec
except ImportError:  # pragma: no cover - exercised with the extra uninstalled
    fsspec = None

from tiecheck.errors import TargetError, TiecheckError
from tiecheck.loaders import REMOTE_SCHEMES, detect, load_path
from tiecheck.loaders.content import register_stand_in, release_stand_in, tensor_layout
from tiecheck.loaders.formats.hf import PREFERRED, find_weights
from tiecheck.loaders.formats.safetensors_header import DTYPES, header_length, read_header
from tiecheck.loaders.formats.sharded import shard_paths
from tiecheck.loaders.ranges import (
    FetchStats,
    FsspecFile,
    HttpFile,
    RemoteError,
    RemoteFile,
    RemoteNotFound,
    call_store,
    http_client_module,
    origin,
    store_options,
    timeout,
)
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.tensor_facts import tensor_facts

URL_SCHEMES = tuple(s for s in REMOTE_SCHEMES if s != "hf://")
CONFIG = detect.HF_CONFIG
CONFIG_LIMIT = 16 << 20  # as hf.read_config: configs are kilobytes
INDEX_LIMIT = 64 << 20  # as detect's weights-index limit
FIRST_BYTES = 4096  # the first read of a safetensors file: its length and, for a small header, all of it
MAX_STAND_IN = 1 << 44  # 16 TiB: larger than any checkpoint file, smaller than what a filesystem refuses
HEADER_THREADS = 8  # shards whose headers are fetched at once
# transformers' order of preference among safetensors weights (hf.PREFERRED without torch.save).
SAFETENSORS_WEIGHTS = ("model.safetensors.index.json", "model.safetensors")
TORCH_SAVE_SUFFIXES = (".bin", ".bin.index.json", ".pt", ".pth", ".ckpt")
# A Hub id: namespace/name, an optional @revision. What huggingface_hub's validate_repo_id accepts,
# checked by it afterwards; names of local files (`out/model.safetensors`) are not asked about.
_HUB_ID = re.compile(r"^(?:hf://)?([\w.-]+/[\w.-]+)(?:@([^\s@]+))?$")
_FILE_SUFFIXES = (".safetensors", ".json", ".pt", ".pth", ".bin", ".ckpt", ".pt2", ".onnx", ".gguf", ".py",
                  ".distcp", ".txt")


def is_url(target: str) -> bool:
    """A URL tiecheck reads by range (``https://``, ``http://``, ``s3://``, ``gs://``)."""
    return target.lower().startswith(URL_SCHEMES)


def hub_id(target: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``target`` reads as a Hub model id (``org/name[@revision]``,
    optionally ``hf://``), else None. A name with a file suffix is taken for a missing local file."""
    m = _HUB_ID.match(target.strip())
    if m is None or m.group(1).lower().endswith(_FILE_SUFFIXES):
        return None
    if hub is None:
        raise TargetError(f"{target}: no such file or folder, bundled model or Python spec; reading it as a Hugging "
                          f"Face Hub id needs huggingface_hub: pip install 'tiecheck[remote]'") from None
    try:
        validate_repo_id(m.group(1))
    except HFValidationError:
        return None
    return m.group(1), m.group(2)


def load_remote(target: str, *, key: str | None = None, trust_pickle: bool = False,
                trust_remote_code: bool = False, progress: Callable[[int, int], None] | None = None) -> Subject:
    """A URL or a Hub id, as a Subject, with no weights downloaded.

    Args:
        target: an ``https://``, ``http://``, ``s3://`` or ``gs://`` URL (a safetensors file, a weights
            index, or a folder: a URL ending in ``/``, or a store prefix), or a Hub id.
        key, trust_pickle, trust_remote_code: as for a local target.
        progress: ``progress(done, total)`` as shard headers are fetched.

    Returns:
        The Subject, its ``extra["remote"]`` saying where it was read and how many bytes were
        fetched (counted until the analysis ends).

    Raises:
        TargetError: the target cannot be found or read (one line naming the remote file).
    """
    options = dict(key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code)
    if is_url(target):
        return _load_url(target, options, progress)
    ident = hub_id(target)
    if ident is None:
        raise TargetError(f"{target}: not a URL or a Hugging Face Hub model id (org/name[@revision])")
    return _load_hub(target, ident[0], ident[1], options, progress)


# -- the Hugging Face Hub -----------------------------------------------------------------------------

def _load_hub(target: str, repo_id: str, revision: str | None, options: dict,
              progress: Callable[[int, int], None] | None) -> Subject:
    cached = cached_snapshot(repo_id, revision)
    if cached is not None:
        sub = load_path(cached, progress=progress, **options)
        sub.source.notes.insert(0, f"read from the local Hugging Face cache: {cached}")
        sub.source = replace(sub.source, target=target)
        sub.extra["remote"] = {"where": "cache", "repo_id": repo_id, "revision": revision or "main",
                               "snapshot": str(cached), "bytes_fetched": 0, "requests": 0}
        return sub
    if hub_constants.is_offline_mode():
        raise TargetError(f"{target}: not in the local Hugging Face cache with its weights, and HF_HUB_OFFLINE is "
                          f"set, so the Hub is not asked; unset HF_HUB_OFFLINE, or download it first (hf download "
                          f"{repo_id})")
    stats = FetchStats()
    folder = HubFolder(target, repo_id, revision, stats)
    sub = _load_mirrored(folder, None, options, progress, stats)
    sub.source.notes.insert(0, f"read from the Hugging Face Hub ({folder.endpoint}): {repo_id} at commit "
                               f"{folder.sha} (revision {revision or 'main'}); headers and samples fetched by "
                               f"range requests, no weights downloaded")
    sub.extra["remote"].update(where="hub", repo_id=repo_id, revision=revision or "main", commit=folder.sha)
    return sub


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cache snapshot of ``repo_id`` at ``revision`` when it holds the model's weights, all of them.

    The snapshot is found by ``try_to_load_from_cache`` (which resolves a branch through the cache's
    refs, without asking the Hub); it counts only when the Hugging Face folder loader would find
    its weights there (every shard of an index), since a partial download is read from the Hub.
    """
    for name in (CONFIG, *PREFERRED):
        found = hub.try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(found, str):
            folder = Path(found).parent
            break
    else:
        return None
    try:
        if not (folder / CONFIG).is_file():
            return folder if any((folder / n).is_file() for n in PREFERRED[1::2]) else None
        kind, weights, _ = find_weights(folder)
        if kind == detect.WEIGHTS_INDEX:
            index = detect.read_weights_index(weights)
            if index is None:
                return None
            shard_paths(weights, index)  # every shard present, or this is a partial download
    except TargetError:
        return None
    return folder


class HubFolder:
    """A model repository on the Hub at one commit: its file list from ``model_info`` (one call), each
    file's location and size from ``get_hf_file_metadata`` (a HEAD that follows the Hub's own
    redirect to its CDN), and its bytes by range through huggingface_hub's HTTP session."""

    def __init__(self, target: str, repo_id: str, revision: str | None, stats: FetchStats):
        self.target, self.repo_id, self.stats = target, repo_id, stats  # target: as the user gave it
        api = hub.HfApi()
        self.endpoint = api.endpoint
        info = _hub_call(lambda: api.model_info(repo_id, revision=revision, files_metadata=True, timeout=timeout()),
                         target, repo_id, revision, self.endpoint)
        self.sha = info.sha or revision or "main"
        self.sizes = {s.rfilename: s.size for s in info.siblings or []}
        self.where = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
        self.client = hub.get_session()
        self._revision = revision

    def names(self) -> list[str]:
        return sorted(self.sizes)

    def open(self, name: str) -> RemoteFile | None:
        if name not in self.sizes:
            return None
        where = f"{self.where}/{name}"
        url = hub.hf_hub_url(self.repo_id, name, revision=self.sha, endpoint=self.endpoint)
        meta = _hub_call(lambda: hub.get_hf_file_metadata(url, timeout=timeout(), endpoint=self.endpoint), where,
                         self.repo_id, self._revision, self.endpoint)
        # The auth header goes only to the Hub itself, never to the CDN its redirect names.
        headers = build_hf_headers() if origin(meta.location) == origin(self.endpoint) else {}
        size = meta.size if meta.size is not None else self.sizes.get(name)
        return HttpFile(meta.location, where, self.stats, self.client, headers=headers, size=size)


def _hub_call(fn: Callable[[], Any], where: str, repo_id: str, revision: str | None, endpoint: str) -> Any:
    """A huggingface_hub call, its errors as one line each."""
    httpx2 = http_client_module()

    try:
        return fn()
    except hub_errors.GatedRepoError:
        raise TargetError(f"{where}: {repo_id} is gated on the Hub: accept its conditions on its page and log in "
                          f"(hf auth login)") from None
    except hub_errors.RepositoryNotFoundError:
        raise TargetError(f"{where}: no such file or folder, bundled model or Python spec, and no model {repo_id} on "
                          f"the Hugging Face Hub ({endpoint}) that this login can see") from None
    except hub_errors.RevisionNotFoundError:
        raise TargetError(f"{where}: {repo_id} has no revision {revision!r} on the Hub") from None
    except hub_errors.EntryNotFoundError:
        raise RemoteNotFound(f"{where}: not found on the Hub") from None
    except hub_errors.OfflineModeIsEnabled:
        raise TargetError(f"{where}: HF_HUB_OFFLINE is set, so the Hub is not asked; unset it, or download the "
                          f"model first (hf download {repo_id})") from None
    except hub_errors.HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else "?"
        raise TargetError(f"{where}: the Hub answered HTTP {status}") from None
    except httpx2.TimeoutException:
        raise TargetError(f"{where}: the Hub ({endpoint}) gave no answer within {timeout():g} s "
                          f"(TIECHECK_REMOTE_TIMEOUT sets the timeout)") from None
    except httpx2.HTTPError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TargetError(f"{where}: no such file or folder, bundled model or Python spec; as a Hugging Face Hub id "
                          f"it could not be looked up: cannot reach the Hub at {endpoint} ({first})") from None


# -- URLs ---------------------------------------------------------------------------------------------

class HttpFolder:
    """A folder behind an HTTP(S) URL (ending in ``/``): no listing, files opened by name."""

    def __init__(self, url: str, stats: FetchStats, client: Any, target: str):
        self.url, self.stats, self.client = url if url.endswith("/") else url + "/", stats, client
        self.where, self.target = self.url.rstrip("/"), target

    def names(self) -> None:
        return None  # HTTP cannot list a folder: files are asked for by name

    def open(self, name: str) -> RemoteFile:
        return HttpFile(urljoin(self.url, quote(name)), f"{self.where}/{name}", self.stats, self.client)


class StoreFolder:
    """A prefix of an object store (``s3://bucket/model``), listed by fsspec."""

    def __init__(self, fs: Any, path: str, where: str, stats: FetchStats, target: str):
        self.fs, self.path, self.where, self.stats = fs, path.rstrip("/"), where.rstrip("/"), stats
        self.target = target
        self._sizes: dict[str, int] | None = None

    @property
    def sizes(self) -> dict[str, int]:
        """File name -> size, listed once when first needed (a single-file target may never need it)."""
        if self._sizes is None:
            entries = call_store(lambda: self.fs.ls(self.path, detail=True), self.where)
            self._sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
                           if e.get("type") == "file"}
        return self._sizes

    def names(self) -> list[str]:
        return sorted(self.sizes)

    def open(self, name: str) -> RemoteFile | None:
        if name not in self.sizes:
            return None
        return FsspecFile(self.fs, f"{self.path}/{name}", f"{self.where}/{name}", self.sizes[name], self.stats)


def _load_url(target: str, options: dict, progress: Callable[[int, int], None] | None) -> Subject:
    stats = FetchStats()
    scheme = target.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        client = http_client_module().Client(follow_redirects=False, trust_env=True)
        if target.endswith("/"):
            folder: Any = HttpFolder(target, stats, client, target)
            sub = _load_mirrored(folder, None, options, progress, stats, closing=[client])
        else:
            base, name = target.rsplit("/", 1)
            folder = HttpFolder(base + "/", stats, client, target)
            file = HttpFile(target, target, stats, client)
            sub = _load_mirrored(folder, (unquote(name.split("?", 1)[0]) or "file", file), options, progress,
                                 stats, closing=[client])
    else:
        sub = _load_store(target, options, progress, stats)
    sub.source.notes.insert(0, f"read from {target} by range requests: headers and samples fetched, no weights "
                               f"downloaded")
    sub.extra["remote"]["where"] = scheme
    return sub


def _load_store(target: str, options: dict, progress: Callable[[int, int], None] | None,
                stats: FetchStats) -> Subject:
    if fsspec is None:
        raise TargetError(f"{target}: reading object stores needs fsspec and its store's library: pip install "
                          f"'tiecheck[remote]'") from None
    protocol = target.split("://", 1)[0].lower()
    try:
        fs, path = fsspec.core.url_to_fs(target, **store_options(protocol))
    except ImportError as e:
        raise TargetError(f"{target}: reading {protocol}:// needs {getattr(e, 'name', None) or 'its library'}: pip "
                          f"install 'tiecheck[remote]'") from None
    except ValueError as e:
        raise TargetError(f"{target}: {e}") from None
    info = call_store(lambda: fs.info(path), target)
    if info.get("type") == "directory":
        return _load_mirrored(StoreFolder(fs, path, target, stats, target), None, options, progress, stats)
    parent, name = path.rstrip("/").rsplit("/", 1) if "/" in path.rstrip("/") else ("", path)
    where_parent = target.rstrip("/").rsplit("/", 1)[0]
    file = FsspecFile(fs, path, target, int(info.get("size") or 0), stats)
    folder = StoreFolder(fs, parent, where_parent, stats, target)
    return _load_mirrored(folder, (name, file), options, progress, stats)


# -- the stand-in folder ------------------------------------------------------------------------------

class Mirror:
    """A private temporary folder standing in for a remote one: small JSON files copied, safetensors
    files as their header followed by a hole (see the module docstring)."""

    def __init__(self, where: str):
        self.root = Path(tempfile.mkdtemp(prefix="tiecheck-remote-"))
        self.where = where.rstrip("/")
        self.stand_ins: dict[str, RemoteFile] = {}

    def path(self, name: str) -> Path:
        # Names come from a listing or an index: only plain file names reach the folder.
        if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            raise RemoteError(f"{self.where}: refusing the file name {name!r} (not a plain name in the folder)")
        return self.root / name

    def add_json(self, name: str, file: RemoteFile, limit: int, what: str) -> None:
        data = file.read_whole(limit, what) if file.size >= 0 else file.probe(limit + 1)
        if len(data) > limit:
            raise RemoteError(f"{file.where}: more than {limit:,} bytes, more than any {what} holds; refusing it")
        self.path(name).write_bytes(data)

    def add_safetensors(self, name: str, file: RemoteFile, head: bytes | None = None) -> None:
        """Lay out a stand-in for a remote safetensors file, checked by the local header parser."""
        head = head if head is not None else file.probe(FIRST_BYTES)
        if not detect.looks_like_safetensors(head[:16]):
            raise RemoteError(f"{file.where}: not a safetensors file (no safetensors header in its first bytes); "
                              f"remote targets are read for safetensors weights only: download it and inspect it "
                              f"locally")
        n = header_length(file.where, head, file.size)  # the length checked before its bytes are fetched
        if file.size > MAX_STAND_IN:
            raise RemoteError(f"{file.where}: the server says the file holds {file.size:,} bytes, more than any "
                              f"checkpoint file ({MAX_STAND_IN:,}); refusing it")
        raw = head[:8 + n] if len(head) >= 8 + n else head + file.pread(8 + n - len(head), len(head))
        path = self.path(name)
        try:
            with open(path, "wb") as fh:
                fh.write(raw)
                fh.truncate(file.size)  # the data: a hole, never written, never read
        except OSError as e:
            raise RemoteError(f"{file.where}: cannot lay out its {file.size:,}-byte stand-in in {self.root.parent} "
                              f"({e.strerror or e})") from None
        header = read_header(path)
        unaligned = next((e.name for e in header.entries.values()
                          if e.end > e.begin and (header.data_start + e.begin) % DTYPES[e.dtype][1]), None)
        if unaligned is not None:
            raise RemoteError(f"{file.where}: tensor {unaligned!r} starts at an offset that is not a multiple of its "
                              f"element size (a hand-made header); such tensors are copied whole, so this file is "
                              f"read only locally: download it")
        self.stand_ins[str(path)] = file
        register_stand_in(str(path), file)

    def shown(self, text: str) -> str:
        """``text`` with the temporary folder's paths given back as the remote names they stand for."""
        return text.replace(str(self.root), self.where)

    def remove_folder(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _load_mirrored(folder: Any, single: tuple[str, RemoteFile] | None, options: dict,
                   progress: Callable[[int, int], None] | None, stats: FetchStats,
                   closing: list[Any] | None = None) -> Subject:
    """Lay out the stand-in folder for ``folder`` (or for its one file ``single``), read it with the
    local loaders, and tie the stand-ins' registrations (and ``closing``) to the subject's life."""
    mirror = Mirror(folder.where)
    try:
        try:
            if single is None:
                _mirror_folder(folder, mirror, progress)
                sub = load_path(mirror.root, **options)
            else:
                name = _mirror_file(folder, mirror, *single, progress)
                sub = load_path(mirror.path(name), **options)
        except TiecheckError as e:
            e.args = (mirror.shown(str(e)),)
            raise
        # The loaders' notes describe the stand-ins: name the remote files, and how their data is read.
        sub.source = replace(sub.source, target=folder.target, notes=[
            mirror.shown(n).replace("data memory-mapped", "data read by range") for n in sub.source.notes])
    except BaseException:
        _release(list(mirror.stand_ins.items()), closing or [])
        mirror.remove_folder()
        raise
    # The stand-ins are mapped by the loaders: removing their folder now leaves the mappings intact.
    mirror.remove_folder()
    remote = {n for n, span in sub.file_spans.items() if getattr(span, "path", None) in mirror.stand_ins}
    sub.tensors = RemoteTensors(sub.tensors, remote)
    sub.extra["remote"] = stats.section
    weakref.finalize(sub, _release, list(mirror.stand_ins.items()), list(closing or []))
    return sub


class RemoteTensors(Mapping):
    """A remote subject's tensors, those whose bytes are remote handed out on the meta device.

    The loaders made them as views of the stand-ins, whose data is a hole: read through a view,
    every value would be zero, and two remote files would compare equal. So a view never leaves:
    its name gives a meta tensor of the same shape, strides and dtype, and its values are read
    only through the content reader, by range (facts and file layouts come from the loaders'
    own mapping, as for a local file).
    """

    def __init__(self, tensors: Mapping, remote: set[str]):
        self._tensors, self._remote = tensors, remote

    def __getitem__(self, name: str):
        t = self._tensors[name]
        if name not in self._remote:
            return t  # no bytes in the files (an empty tensor), or copied from real bytes
        return torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device="meta")

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def facts(self) -> list:
        return tensor_facts(self._tensors)  # the views' own facts: their storages are the stand-ins'

    def file_layout(self, name: str) -> tuple[int, int, int] | None:
        where = getattr(self._tensors, "file_layout", None)
        return where(name) if callable(where) else tensor_layout(self._tensors[name])


def _release(stand_ins: list[tuple[str, RemoteFile]], closing: list[Any]) -> None:
    for path, file in stand_ins:
        release_stand_in(path, file)
    for c in closing:
        c.close()


def _mirror_folder(folder: Any, mirror: Mirror, progress: Callable[[int, int], None] | None) -> None:
    """config.json and the safetensors weights transformers would load (or, with a listing, every
    safetensors file or index at the top of the folder, for the loader to choose among)."""
    listed = folder.names()
    config = folder.open(CONFIG)
    if config is not None:
        with _absent_ok():
            mirror.add_json(CONFIG, config, CONFIG_LIMIT, "model config")
    for name in SAFETENSORS_WEIGHTS:
        file = folder.open(name)
        if file is None:
            continue
        with _absent_ok() as absent:
            if name.endswith(".json"):
                _mirror_index(folder, mirror, name, file, progress)
            else:
                mirror.add_safetensors(name, file)
        if not absent:
            return
    if listed is not None:
        indexes = [n for n in listed if n.endswith(".safetensors.index.json")]
        files = [n for n in listed if n.endswith(".safetensors")]
        for n in indexes:
            _mirror_index(folder, mirror, n, folder.open(n), progress)
        if not indexes:
            for n in files:
                mirror.add_safetensors(n, folder.open(n))
        if indexes or files:
            return
        torch_save = [n for n in listed if n.endswith(TORCH_SAVE_SUFFIXES)]
        if torch_save:
            raise RemoteError(f"{folder.where}: holds torch.save weights only ({', '.join(torch_save[:3])}); remote "
                              f"targets are read for safetensors weights (a torch.save file is read whole): download "
                              f"the model and inspect the folder")
    looked = ", ".join(SAFETENSORS_WEIGHTS) + (" or any *.safetensors file" if listed is not None else "")
    raise RemoteError(f"{folder.where}: holds no safetensors weights (looked for {looked})")


def _mirror_file(folder: Any, mirror: Mirror, name: str, file: RemoteFile,
                 progress: Callable[[int, int], None] | None) -> str:
    """One remote file, recognised by its first bytes: a safetensors file, or a weights index with its shards."""
    head = file.probe(FIRST_BYTES)
    if detect.looks_like_safetensors(head[:16]):
        mirror.add_safetensors(name, file, head)
    elif head.lstrip()[:1] == b"{":
        _mirror_index(folder, mirror, name, file, progress)
    else:
        raise RemoteError(f"{file.where}: neither a safetensors file nor a weights index (*.index.json); remote "
                          f"targets are read for safetensors weights only: download it and inspect it locally")
    return name


def _mirror_index(folder: Any, mirror: Mirror, name: str, file: RemoteFile,
                  progress: Callable[[int, int], None] | None) -> None:
    """An index and every shard it names that the folder holds, headers fetched a few at a time. A
    shard it names outside the folder, or that is missing, is left out: the loader names it."""
    mirror.add_json(name, file, INDEX_LIMIT, "weights index")
    index = detect.read_weights_index(mirror.path(name))
    if index is None:
        return  # not an index: the loader says what it is
    shards = sorted({s for s in index["weight_map"].values() if isinstance(s, str) and s and "/" not in s
                     and "\\" not in s and s not in (".", "..")})
    opened = [(s, f) for s in shards if (f := _open_present(folder, s)) is not None]
    done = 0

    def one(item: tuple[str, RemoteFile]) -> None:
        with _absent_ok():
            mirror.add_safetensors(*item)

    with ThreadPoolExecutor(max_workers=min(HEADER_THREADS, max(1, len(opened)))) as pool:
        for _ in pool.map(one, opened):
            done += 1
            if progress is not None:
                progress(done, len(opened))


def _open_present(folder: Any, name: str) -> RemoteFile | None:
    with _absent_ok():
        return folder.open(name)
    return None


class _absent_ok:
    """A block in which a remote file found missing (HTTP 404, no such entry) is skipped, not an error:
    the loader reports what is missing, by name, from the folder it then reads. ``as`` gives a list
    that is non-empty when the block was skipped."""

    def __enter__(self) -> list[bool]:
        self.absent: list[bool] = []
        return self.absent

    def __exit__(self, kind, value, tb) -> bool:
        if kind is not None and issubclass(kind, RemoteNotFound):
            self.absent.append(True)
            return True
        return False

