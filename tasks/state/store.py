"""Shared storage: a directory, or any fsspec URL (object stores later).

Layout under the store root:

    inputs/<sha256><suffix>            uploaded model files and sample .npz, content-addressed
    results/<job_key>/                 one job's artifacts, report.json (written last) and report.md
    batches/<batch>/jobs/<job_id>.json each job's state record
    batches/<batch>/specs/<job_id>.json each job's spec, as sent (what `portq retry` resubmits)
    batches/<batch>/dead/<job_id>.json  dead letters: jobs that ended without a report
    series/<series>/<batch>.json       the nights of a manifest's series (portq.tasks.state.series)
    tmp/                               staging for atomic writes; entries older than any job are swept

Writes are atomic: a file is written under a temporary name in `tmp/` and renamed into place; a result
folder is assembled in `tmp/` and renamed into place, so a reader sees all of it or none, and a writer
killed half-way leaves nothing but a `tmp/` entry that `sweep_staging` removes later. The first
complete result folder for a key wins; later ones are discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from portq.tasks.core.errors import StoreError


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def input_key(sha256: str, suffix: str) -> str:
    suffix = "".join(c for c in suffix.lower() if c.isalnum() or c == ".")[:12]
    return f"inputs/{sha256}{suffix}"


def result_key(job_key: str) -> str:
    return f"results/{job_key}"


def record_key(batch: str, job_id: str) -> str:
    return f"batches/{batch}/jobs/{job_id}.json"


def spec_key(batch: str, job_id: str) -> str:
    return f"batches/{batch}/specs/{job_id}.json"


def dead_letter_key(batch: str, job_id: str) -> str:
    return f"batches/{batch}/dead/{job_id}.json"


#: staging area for atomic writes, on the same filesystem as everything it is renamed into
STAGING = "tmp"


class Store:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.root)
        except (ImportError, ValueError) as e:
            raise StoreError(f"cannot open store {root!r}: {e}", step="store") from e
        self.local = isinstance(self.fs, LocalFileSystem)
        self._cache_dir: Path | None = None

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

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
        return self._path(key) if self.local else f"{self.root}/{key}"

    # ------------------------------------------------------------------------------------------ reads
    def exists(self, key: str) -> bool:
        return self._io("check", key, self.fs.exists, self._path(key))

    def read_bytes(self, key: str) -> bytes:
        return self._io("read", key, self.fs.cat_file, self._path(key))

    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except ValueError as e:
            raise StoreError(f"{self.url(key)} is not valid JSON: {e}", step="store") from e

    def list(self, key: str) -> list[str]:
        """Names directly under `key` (empty if it does not exist)."""
        path = self._path(key)
        if not self.exists(key):
            return []
        entries = self._io("list", key, self.fs.ls, path, detail=False)
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

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
            os.makedirs(os.path.dirname(path), exist_ok=True)
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

    def put_file(self, local: str | os.PathLike[str], key: str) -> None:
        """Upload a local file to `key` unless it is already there (keys are content-addressed)."""
        if self.exists(key):
            return
        path = self._path(key)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = self._staging_path(key)
            try:
                shutil.copyfile(local, tmp)
                os.replace(tmp, path)
            except OSError as e:
                Path(tmp).unlink(missing_ok=True)
                raise StoreError(f"cannot copy {local} to {path}: {e.strerror or e}", step="store") from e
            return
        self._io("upload", key, self.fs.put_file, str(local), path)

    def publish_dir(self, local_dir: str | os.PathLike[str], key: str, commit_file: str = "report.json") -> bool:
        """Move a finished result folder into place at `key`, all at once; the first complete folder wins.

        Returns False (and leaves the existing folder alone) when `key` already exists: a second
        delivery of the same job must not leave a second or mixed set of artifacts.
        """
        if self.exists(f"{key}/{commit_file}"):
            return False
        path = self._path(key)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
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
                if os.path.isdir(path):
                    return False
                raise StoreError(f"cannot publish {path}: {e.strerror or e}", step="store") from e
            return True
        # Object stores have no atomic folder rename: upload everything else, then the commit file.
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        for p in files:
            if p.name != commit_file:
                self._io("upload", key, self.fs.put_file, str(p), f"{path}/{p.relative_to(local_dir)}")
        commit = Path(local_dir) / commit_file
        if commit.exists():
            self._io("upload", key, self.fs.put_file, str(commit), f"{path}/{commit_file}")
        return True

    def size(self, key: str) -> int:
        """The size of the file at `key`, in bytes."""
        return int(self._io("stat", key, self.fs.size, self._path(key)))

    def sweep_staging(self, older_than_s: float) -> int:
        """Remove staging entries left by writers that died (older than any live job); returns how many."""
        if not self.local:
            return 0
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

    def delete(self, key: str) -> None:
        path = self._path(key)
        if self.exists(key):
            self._io("delete", key, self.fs.rm, path, recursive=True)

    # ---------------------------------------------------------------------------------------- helpers
    def _staging_path(self, key: str) -> str:
        root = self._path(STAGING)
        os.makedirs(root, exist_ok=True)
        return f"{root}/{uuid.uuid4().hex[:12]}-{key.rsplit('/', 1)[-1]}"

    def _scratch(self) -> str:
        if self._cache_dir is None:
            import tempfile

            self._cache_dir = Path(tempfile.mkdtemp(prefix="portq-store-"))
        return str(self._cache_dir)

    def _io(self, what: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as e:
            raise StoreError(f"{self.url(key)} does not exist", step="store") from e
        except OSError as e:
            raise StoreError(f"cannot {what} {self.url(key)}: {e}", step="store") from e
