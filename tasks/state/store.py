"""Shared storage: a directory, or any fsspec URL (`s3://bucket/prefix` through s3fs, ...).

The layout under the store's root is in `portq.tasks.state.keys`, which builds every key.

How a result folder is published, the first complete one winning and a reader never seeing a part of one:

- **Directory store.** A file is written under a temporary name in `tmp/` and renamed into place; a result
  folder is assembled in `tmp/` and renamed into place (rename(2) onto a non-empty folder fails, so the
  first rename wins), so a reader sees all of it or none, and a writer killed half-way leaves nothing but a
  `tmp/` entry that `sweep_staging` removes later.
- **Object store** (no atomic rename). Each delivery uploads into a folder of its own,
  `results/<job_key>/d-<id>/`, report.json last, then commits by creating `results/<job_key>/commit.json`,
  which names that folder, with a conditional write (S3's `If-None-Match: *`): exactly one create succeeds,
  so the first complete folder wins and a later delivery deletes its own. Readers find a result through
  `commit.json` only, and it is written after every file of its folder, so they never see a folder without
  its report.json, nor files of two deliveries mixed. Before uploading, a delivery leaves a marker in `tmp/`
  naming its folder; a writer killed half-way leaves that marker and an uncommitted folder, which
  `sweep_staging` removes once they are older than any job can run.

Single objects (records, specs, inputs) are written with one PUT each, which object stores apply whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from portq.tasks.core.errors import ConfigError, StoreError
from portq.tasks.core.settings import redact_url
from portq.tasks.state.keys import (  # noqa: F401  (the keys' old home: callers may import them from here)
    STAGING,
    dead_letter_key,
    input_key,
    record_key,
    result_key,
    spec_key,
)


def _os_reason(e: OSError) -> str:
    """What went wrong, without the paths: 'No space left on device' (shutil.copytree lists every file's error)."""
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        why = str(e.args[0][0][-1])
        return re.sub(r"^\[Errno \d+\] ([^:]+).*$", r"\1", why)
    return e.strerror or str(e)


def _parameters(fn: Any) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: object stores: the file in a result key that names the delivery folder holding the result
COMMIT = "commit.json"
#: object stores: how many files `read_many` fetches at once
_CONCURRENT_READS = 32
#: object stores: a delivery's own folder under its result key
_DELIVERY = re.compile(r"^d-[0-9a-f]{12,32}$")


@dataclass(frozen=True)
class Publication:
    """Where one delivery's result folder goes: `key` is where readers look it up (`results/<job key>`),
    `folder` where this delivery writes it (the key itself on a directory store, a folder of its own under the
    key on an object store)."""

    key: str
    folder: str


@dataclass(frozen=True)
class Published:
    """The outcome of a publication: the folder that holds the result now, and whether it is this delivery's."""

    folder: str
    won: bool


class Store:
    """The shared store: keys (`results/<job key>/...`) under one root, a directory or an fsspec URL. Every
    failure is a StoreError that names the URL (without credentials) and says what to check."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        #: the root as shown to users: no user, password or token in it
        self.display = redact_url(self.root) if "://" in self.root else self.root
        protocol = fsspec.core.split_protocol(self.root)[0] or "file"
        # Object stores change under us (other workers write): never answer from a cached listing.
        options = {} if protocol in ("file", "local") else {"use_listings_cache": False}
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.root, **options)
        except ImportError as e:
            raise ConfigError(f"cannot open store {self.display}: {self._shown(e)}", step="store",
                              hint="pip install 'portq[s3]' for s3:// stores" if protocol in ("s3", "s3a")
                              else f"install the fsspec package for {protocol}://") from e
        except ValueError as e:
            raise ConfigError(f"cannot open store {self.display}: {self._shown(e)}", step="store",
                              hint="PORTQ_STORE is a directory or an fsspec URL such as s3://bucket/prefix") from e
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local and os.path.exists(self.base) and not os.path.isdir(self.base):
            raise ConfigError(f"the store {self.display} is a file, not a folder", step="store",
                              hint="point --store or PORTQ_STORE at a folder; it is created if missing")
        self._cache_dir: Path | None = None
        # s3fs asks for an object's size (a HEAD) before a whole-object GET, to split large ones into ranges;
        # what the store reads this way is small (records, reports, commits): one GET each
        self._read_kw = {"max_concurrency": 1} if "max_concurrency" in _parameters(self.fs.cat_file) else {}

    def _shown(self, e: BaseException) -> str:
        """An exception's text, fit to show: the store's URL in it without credentials."""
        return str(e).replace(self.root, self.display)

    def __repr__(self) -> str:
        return f"Store({self.display!r})"

    def __reduce__(self) -> tuple[type[Store], tuple[str]]:
        # a step's child process opens the same store from its root (filesystem objects need not pickle)
        return (Store, (self.root,))

    # ------------------------------------------------------------------------------------------ paths
    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"store key {key!r} leaves the store", step="store")
        return f"{self.base}/{key}" if key else self.base

    def url(self, key: str) -> str:
        """Where a user finds `key`: a filesystem path for a local store, a URL otherwise."""
        return self._path(key) if self.local else f"{self.display}/{key}"

    @property
    def endpoint(self) -> str | None:
        """The object store's endpoint (S3 and compatible servers), for messages; None where there is none."""
        with suppress(Exception):
            endpoint = self.fs.s3.meta.endpoint_url
            return redact_url(str(endpoint)) if endpoint else None
        return None

    # ------------------------------------------------------------------------------------------ reads
    def exists(self, key: str) -> bool:
        return bool(self._io("check", key, self.fs.exists, self._path(key)))

    def read_bytes(self, key: str) -> bytes:
        return bytes(self._io("read", key, self.fs.cat_file, self._path(key), **self._read_kw))

    def read_json(self, key: str) -> Any:
        return self.parse_json(key, self.read_bytes(key))

    def read_many(self, keys: list[str]) -> dict[str, bytes]:
        """The contents of several files, one GET each, concurrently on an object store; missing ones left out."""
        out: dict[str, bytes] = {}
        for key, data in zip(keys, self._fetch([self._path(k) for k in keys])):
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):
                raise self._error("read", key, data)
            out[key] = bytes(data)
        return out

    def _fetch(self, paths: list[str]) -> list[Any]:
        """Each path's bytes or the exception reading it raised (fsspec's `cat` of a list would stat every path
        first: twice the requests)."""
        if not getattr(self.fs, "async_impl", False):
            results: list[Any] = []
            for path in paths:
                try:
                    results.append(self.fs.cat_file(path, **self._read_kw))
                except Exception as e:  # noqa: BLE001  (returned, as the async branch does)
                    results.append(e)
            return results
        import asyncio

        from fsspec.asyn import sync

        async def fetch_all() -> list[Any]:
            limit = asyncio.Semaphore(_CONCURRENT_READS)

            async def one(path: str) -> Any:
                async with limit:
                    return await self.fs._cat_file(path, **self._read_kw)

            return await asyncio.gather(*(one(p) for p in paths), return_exceptions=True)

        return list(sync(self.fs.loop, fetch_all))

    def find(self, key: str = "") -> list[str]:
        """Every file under `key`, at any depth, as keys (empty if there is none)."""
        try:
            found = self._io("list", key, self.fs.find, self._path(key))
        except StoreError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return []
            raise
        prefix = self.base.rstrip("/") + "/"
        return sorted(str(p)[len(prefix):] for p in found if str(p).startswith(prefix))

    def list(self, key: str) -> list[str]:
        """Names directly under `key` (empty if it does not exist)."""
        return sorted(self.versions(key))

    def versions(self, key: str) -> dict[str, str]:
        """Names directly under `key`, each with a token that changes whenever its content does (the object's
        ETag; inode, mtime and size on a directory store): one listing tells which entries changed."""
        try:
            entries = self._io("list", key, self.fs.ls, self._path(key), detail=True)
        except StoreError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return {}
            raise
        out = {}
        for entry in entries:
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            tag = entry.get("ETag") or entry.get("etag") or entry.get("md5Hash")
            if not tag:
                stamp = entry.get("mtime") or entry.get("LastModified") or entry.get("created") or entry.get("updated")
                tag = f"{entry.get('ino', '')}:{stamp}:{entry.get('size')}"
            out[name] = str(tag)
        return out

    def sha256(self, key: str, chunk: int = 1 << 20) -> str:
        """The SHA-256 of the file at `key`, read as a stream (an artifact may be larger than memory)."""
        def digest() -> str:
            h = hashlib.sha256()
            with self.fs.open(self._path(key), "rb") as f:
                while block := f.read(chunk):
                    h.update(block)
            return h.hexdigest()

        return str(self._io("read", key, digest))

    @contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        """A local path to read `key` from: the file itself for a local store, a downloaded copy otherwise."""
        if self.local:
            yield Path(self._path(key))
            return
        tmp = Path(self._scratch()) / f"{uuid.uuid4().hex}-{key.rsplit('/', 1)[-1]}"
        self._io("download", key, self.fs.get_file, self._path(key), str(tmp))
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    # ----------------------------------------------------------------------------------------- writes
    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomic for a local store (temp file + rename); a single PUT for object stores."""
        path = self._path(key)
        if self.local:
            self._makedirs(os.path.dirname(path))
            tmp = self._staging_path(key)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except OSError as e:
                Path(tmp).unlink(missing_ok=True)
                raise StoreError(f"cannot write {path}: {e.strerror or e}", step="store") from e
            return
        self._io("write", key, self.fs.pipe_file, path, data)

    def write_json(self, key: str, data: Any) -> None:
        self.write_bytes(key, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist yet, in one step; False when it already did.

        On S3 a conditional PUT (`If-None-Match: *`): of two writers racing, exactly one succeeds.
        """
        path = self._path(key)
        if self.local:
            self._makedirs(os.path.dirname(path))
            tmp = self._staging_path(key)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.link(tmp, path)  # link(2) fails when the name exists: the first one wins
                return True
            except FileExistsError:
                return False
            except OSError as e:
                raise StoreError(f"cannot write {path}: {e.strerror or e}", step="store") from e
            finally:
                Path(tmp).unlink(missing_ok=True)
        try:
            self._io("write", key, self.fs.pipe_file, path, data, mode="create")
        except StoreError as e:
            if isinstance(e.__cause__, FileExistsError):
                return False
            raise
        return True

    def put_file(self, local: str | os.PathLike[str], key: str) -> None:
        """Upload a local file to `key` unless it is already there (keys are content-addressed)."""
        if self.exists(key):
            return
        path = self._path(key)
        if self.local:
            self._makedirs(os.path.dirname(path))
            tmp = self._staging_path(key)
            try:
                shutil.copyfile(local, tmp)
                os.replace(tmp, path)
            except OSError as e:
                Path(tmp).unlink(missing_ok=True)
                raise StoreError(f"cannot copy {local} to {path}: {e.strerror or e}", step="store") from e
            return
        self._io("upload", key, self.fs.put_file, str(local), path)

    # ------------------------------------------------------------------------------------ publication
    def publication(self, key: str) -> Publication:
        """Where a new delivery of the result at `key` writes its folder (see the module's docstring)."""
        if self.local:
            return Publication(key, key)
        return Publication(key, f"{key}/d-{uuid.uuid4().hex[:16]}")

    def committed(self, key: str, commit_file: str = "report.json") -> str | None:
        """The folder holding the complete result published at `key`, or None when there is none (yet)."""
        if self.local:
            return key if self.exists(f"{key}/{commit_file}") else None
        try:
            pointer = self.read_json(f"{key}/{COMMIT}")
        except StoreError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return None
            raise
        folder = pointer.get("folder") if isinstance(pointer, dict) else None
        if not isinstance(folder, str) or not _DELIVERY.match(folder):
            raise StoreError(f"{self.url(f'{key}/{COMMIT}')} does not name a result folder", step="store")
        return f"{key}/{folder}"

    def publish_dir(self, local_dir: str | os.PathLike[str], publication: Publication | str,
                    commit_file: str = "report.json") -> Published:
        """Publish a finished result folder at its key, all at once; the first complete folder wins.

        When a result is there already, or another delivery commits first, this delivery's files are discarded
        and the result folder that won is returned: a second delivery of the same job never leaves a second
        or mixed set of artifacts.
        """
        pub = publication if isinstance(publication, Publication) else self.publication(publication)
        existing = self.committed(pub.key, commit_file)
        if existing is not None:
            return Published(existing, won=False)
        if self.local:
            return self._publish_by_rename(Path(local_dir), pub.key, commit_file)
        return self._publish_by_commit(Path(local_dir), pub, commit_file)

    def _publish_by_rename(self, local_dir: Path, key: str, commit_file: str) -> Published:
        path = self._path(key)
        self._makedirs(os.path.dirname(path))
        staging = self._staging_path(key)
        try:
            shutil.copytree(local_dir, staging)
            if os.path.isdir(path) and not os.path.exists(f"{path}/{commit_file}"):
                # an incomplete folder (left by an older writer that died): move it aside to be swept
                os.rename(path, self._staging_path(key))
            # rename(2) onto an existing non-empty folder fails: whoever renamed first keeps the key.
            os.rename(staging, path)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            if os.path.exists(f"{path}/{commit_file}"):
                return Published(key, won=False)
            raise StoreError(f"cannot publish {path}: {_os_reason(e)}", step="store") from e
        return Published(key, won=True)

    def _publish_by_commit(self, local_dir: Path, pub: Publication, commit_file: str) -> Published:
        delivery = pub.folder.rsplit("/", 1)[-1]
        marker = f"{STAGING}/{delivery}.json"
        self.write_json(marker, {"key": pub.key, "folder": pub.folder, "at": time.time()})
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != commit_file)
        if files:
            self._io("upload", pub.folder, self.fs.put, [str(p) for p in files],
                     [self._path(f"{pub.folder}/{p.relative_to(local_dir).as_posix()}") for p in files])
        if (local_dir / commit_file).exists():  # last: a folder with its report.json is complete
            self._io("upload", pub.folder, self.fs.put_file, str(local_dir / commit_file),
                     self._path(f"{pub.folder}/{commit_file}"))
        pointer = json.dumps({"folder": delivery, "at": time.time()}).encode()
        won = self.create(f"{pub.key}/{COMMIT}", pointer)
        winner = pub.folder if won else self.committed(pub.key, commit_file)
        if not won:
            self._discard(pub.folder)
        self._discard(marker)
        if winner is None:  # cannot happen unless someone deleted the commit right after it was made
            raise StoreError(f"{self.url(pub.key)} lost its commit while publishing", step="store")
        return Published(winner, won=won)

    def size(self, key: str) -> int:
        """The size of the file at `key`, in bytes."""
        return int(self._io("stat", key, self.fs.size, self._path(key)))

    def sweep_staging(self, older_than_s: float) -> int:
        """Remove what writers that died left behind (older than any live job); returns how many entries.

        Directory store: staging files and folders under `tmp/`. Object store: the markers under `tmp/` and the
        delivery folders they name that were never committed.
        """
        if not self.local:
            return self._sweep_deliveries(older_than_s)
        root = self._path(STAGING)
        if not os.path.isdir(root):
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in os.scandir(root):
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue  # another worker swept it first
        return removed

    def _sweep_deliveries(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        markers = [f"{STAGING}/{n}" for n in self.list(STAGING) if n.endswith(".json")]
        removed = 0
        for key, data in self.read_many(markers).items():
            try:
                marker = json.loads(data)
                folder, result_key_, at = marker["folder"], marker["key"], float(marker["at"])
            except (ValueError, KeyError, TypeError):
                self._discard(key)
                continue
            if at >= cutoff:
                continue
            if not (isinstance(folder, str) and isinstance(result_key_, str) and folder.startswith(f"{result_key_}/")
                    and _DELIVERY.match(folder.rsplit("/", 1)[-1])):
                self._discard(key)
                continue
            if self.committed(result_key_) != folder:
                self._discard(folder)
            self._discard(key)
            removed += 1
        return removed

    def delete(self, key: str) -> None:
        path = self._path(key)
        if self.exists(key):
            self._io("delete", key, self.fs.rm, path, recursive=True)

    def check(self) -> None:
        """Reach the store and write to it (a small file under tmp/, removed again): a StoreError that names
        the store, the endpoint and what to do, before anything else is attempted."""
        key = f"{STAGING}/probe-{uuid.uuid4().hex[:12]}"
        if self.local:
            self._makedirs(self._path(STAGING))
        self.write_bytes(key, b"portq can write here\n")
        self._discard(key)

    # ---------------------------------------------------------------------------------------- helpers
    def _makedirs(self, path: str) -> None:
        """A folder of the local store, created if missing: a read-only or misplaced store is one sentence."""
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            where = f" ({e.filename})" if e.filename and str(e.filename) != self.root else ""
            raise ConfigError(f"cannot write to the store {self.display}: {e.strerror or e}{where}", step="store",
                              hint="point --store or PORTQ_STORE at a folder you can write to; it is created if "
                                   "missing") from e

    def _discard(self, key: str) -> None:
        """Delete `key` (a file or a folder) if possible; what stays behind is swept later."""
        with suppress(StoreError):
            self._io("delete", key, self.fs.rm, self._path(key), recursive=True)

    def parse_json(self, key: str, data: bytes) -> Any:
        """`data` read from `key`, as JSON (a StoreError naming the file when it is not)."""
        try:
            return json.loads(data)
        except ValueError as e:
            raise StoreError(f"{self.url(key)} is not valid JSON: {e}", step="store") from e

    def _staging_path(self, key: str) -> str:
        root = self._path(STAGING)
        self._makedirs(root)
        return f"{root}/{uuid.uuid4().hex[:12]}-{key.rsplit('/', 1)[-1]}"

    def _scratch(self) -> str:
        if self._cache_dir is None:
            import tempfile

            self._cache_dir = Path(tempfile.mkdtemp(prefix="portq-store-"))
        return str(self._cache_dir)

    def _io(self, what: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001  (each filesystem raises its own; every one is a storage failure)
            raise self._error(what, key, e) from e

    def _error(self, what: str, key: str, e: BaseException) -> StoreError:
        """A storage failure as a sentence: what was done, to which URL, and what to try; no credentials."""
        where = self.url(key)
        kinds = {c.__name__ for c in type(e).__mro__}
        text = redact_url(str(e)) if "://" in str(e) else str(e)
        if kinds & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
            return StoreError(f"cannot {what} {where}: no credentials for the object store ({text})", step="store",
                              hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, "
                                   "or an IAM role where the worker runs")
        if kinds & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
                    "ConnectionError", "ClientConnectorError", "ServerDisconnectedError", "TimeoutError"}:
            endpoint = self.endpoint
            return StoreError(f"cannot {what} {where}: the store's endpoint"
                              f"{' ' + endpoint if endpoint else ''} does not answer ({text})", step="store",
                              hint="check AWS_ENDPOINT_URL (or the default endpoint's network access) and that "
                                   "the object store is up")
        if isinstance(e, PermissionError):
            return StoreError(f"cannot {what} {where}: permission denied ({text})", step="store",
                              hint="the credentials in use need read and write access to the store's "
                                   "bucket and prefix")
        if isinstance(e, FileNotFoundError):
            if not self.local and "bucket" in text.lower():
                return StoreError(f"cannot {what} {where}: {text}", step="store",
                                  hint="create the bucket, or point PORTQ_STORE at an existing one")
            return StoreError(f"{where} does not exist", step="store")
        if isinstance(e, OSError) and e.errno is not None and e.strerror:
            return StoreError(f"cannot {what} {where}: {e.strerror}", step="store")
        return StoreError(f"cannot {what} {where}: {text or type(e).__name__}", step="store")
