"""Turning files on the client's disk into jobs: checks, upload into the store, queued records.

Model files (and their sidecar `<stem>.npz`) are copied into the store under their content hash, so a
worker on another machine reads exactly what was submitted, and the hash feeds the job key. A path
that cannot become a job (missing, a directory, too large) becomes a failed record in the batch with
its reason, so `status`, `report` and `--wait` show it beside the jobs that ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from portq.tasks.core.contract import (
    SAFE_ID,
    ConvertSource,
    JobKind,
    JobOptions,
    JobRecord,
    JobSpec,
    JobStatus,
    SourceRef,
    Target,
    new_id,
    safe_name,
)
from portq.tasks.core.errors import ConfigError, InputError, PortqError, validation_problems
from portq.tasks.state import delivery, records
from portq.tasks.state.store import Store, input_key, sha256_file
from pydantic import ValidationError

SIDECAR_SUFFIX = ".npz"


def new_batch_id() -> str:
    return datetime.now(timezone.utc).strftime("b%Y%m%d-%H%M%S-") + new_id()[:6]


@dataclass
class Submission:
    batch: str
    specs: list[JobSpec] = field(default_factory=list)
    rejected: list[JobRecord] = field(default_factory=list)


def _upload(store: Store, path: Path, name: str | None = None) -> SourceRef:
    sha = sha256_file(path)
    key = input_key(sha, "".join(path.suffixes[-1:]))
    store.put_file(path, key)
    return SourceRef(key=key, name=name or str(path), sha256=sha, size=path.stat().st_size)


def check_sample_path(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"sample file is {size} bytes, over the limit of {max_bytes}", step="submit", file=str(path),
                         hint="raise PORTQ_MAX_SAMPLE_BYTES if this is intended")


def check_model_path(path: Path, max_bytes: int) -> None:
    if not path.exists():
        raise InputError("file does not exist", step="submit", file=str(path))
    if path.is_dir():
        raise InputError("is a directory, not a model file", step="submit", file=str(path),
                         hint=f"pass the files inside it, e.g. {path}/*.pt")
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"file is {size} bytes, over the limit of {max_bytes}", step="submit", file=str(path),
                         hint="raise PORTQ_MAX_MODEL_BYTES if this is intended")


def prepare(paths: list[str], store: Store, *, batch: str | None, options: dict[str, Any],
            load: dict[str, Any] | None = None, force: bool = False, max_bytes: int,
            max_sample_bytes: int | None = None, displays: dict[str, str] | None = None) -> Submission:
    """Build one `convert` JobSpec per model path and write its spec and `queued` record; bad paths become
    failed records. `options` are the JobOptions fields (the sample is added per file); `load` the
    ConvertSource fields (arch, arch_kwargs, trust_pickle); `displays` what to call a path in records and
    errors when it is not the user's own (an in-memory module saved to a temporary file)."""
    if batch is not None and not SAFE_ID.match(batch):  # before anything is written under its name
        raise ConfigError(f"batch name {batch!r} is not a valid id: letters, digits, '.', '_' and '-', starting with "
                          "a letter or digit, at most 128 characters", step="submit", hint="e.g. nightly-2024-06-01")
    sub = Submission(batch=batch or new_batch_id())
    try:  # a bad option fails the whole submission before anything is uploaded
        JobOptions.model_validate(options)
        ConvertSource.model_validate({"model": {"key": "-", "name": "-", "sha256": "-", "size": 0}, **(load or {})})
    except ValidationError as e:
        raise ConfigError(validation_problems(e), step="submit") from None
    for raw in paths:
        path = Path(raw)
        display = (displays or {}).get(raw, str(path))
        model = safe_name(path.stem if path.suffix else path.name)
        job_id = new_id("j")
        try:
            check_model_path(path, max_bytes)
            source = _upload(store, path, display)
            sidecar = path.with_suffix(SIDECAR_SUFFIX)
            sample = None
            if sidecar.is_file() and sidecar != path:
                check_sample_path(sidecar, max_sample_bytes or max_bytes)
                sample = _upload(store, sidecar)
            spec = JobSpec(job_id=job_id, batch_id=sub.batch, model=model, kind=JobKind.convert, force=force,
                           source=ConvertSource(model=source, **(load or {})),
                           options=JobOptions.model_validate({**options, "sample": sample}))
        except PortqError as e:
            rec = JobRecord(job_id=job_id, batch=sub.batch, model=model, source=display,
                            target=Target(options.get("target", "cpu")), status=JobStatus.failed)
            records.transition(store, rec, JobStatus.failed, fresh=True, error=e.message)
            sub.rejected.append(rec)
            continue
        delivery.write_spec(store, spec)  # what `portq retry` resubmits
        records.transition(store, records.new_record(spec), JobStatus.queued, fresh=True)
        sub.specs.append(spec)
    return sub
