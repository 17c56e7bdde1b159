"""Turning files on the client's disk into jobs: checks, upload into the store, queued records.

Model files (and their sidecar `<stem>.npz`) are copied into the store under their content hash, so a
worker on another machine reads exactly what was submitted, and the hash feeds the job key; a Hugging Face
model folder is checked and packed into one archive first (`model_folders`), which travels the same way. A path
that cannot become a job (missing, too large, a folder that is no model folder) becomes a failed record in the
batch with its reason, so `status`, `report` and `--wait` show it beside the jobs that ran.

`prepare` makes one `convert` job per file; `prepare_fusion` one `fuse` job of several files, which is
refused as a whole (nothing uploaded) when one of its files cannot be used.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from portq.tasks.core.contract import (
    SAFE_ID,
    SIDECAR_SUFFIX,
    ConvertSource,
    FinetuneOptions,
    FuseMember,
    FuseSource,
    HuggingFaceSource,
    JobKind,
    JobOptions,
    JobRecord,
    JobSpec,
    JobStatus,
    SourceRef,
    Target,
    model_name,
    new_id,
    safe_name,
)
from portq.tasks.core.errors import ConfigError, InputError, PortqError, validation_problems
from portq.tasks.core.requests import HF_LOAD_FIELDS
from portq.tasks.state import delivery, lifecycle
from portq.tasks.state.keys import input_key
from portq.tasks.state.model_folders import (
    ARCHIVE_SUFFIX,
    CONFIG,
    check_folder,
    folder_size,
    is_model_folder,
    pack_folder,
)
from portq.tasks.state.store import Store, sha256_file
from pydantic import ValidationError


def new_batch_id() -> str:
    return datetime.now(timezone.utc).strftime("b%Y%m%d-%H%M%S-") + new_id()[:6]


@dataclass
class Submission:
    batch: str
    specs: list[JobSpec] = field(default_factory=list)
    rejected: list[JobRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the client skipped or replaced, to tell the user


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


def check_model_path(path: Path, max_bytes: int, display: str | None = None) -> None:
    display = display or str(path)
    if not path.exists():
        raise InputError("file does not exist", step="submit", file=display)
    if path.is_dir():
        raise InputError("is a directory, not a model file", step="submit", file=display,
                         hint=f"pass the model files inside it, e.g. {path}/*; a sample .npz beside its model goes "
                              "with it" if not (path / CONFIG).is_file() else
                         "a Hugging Face model folder is converted by `portq submit FOLDER`, not fused")
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"file is {size} bytes, over the limit of {max_bytes}", step="submit", file=display,
                         hint="raise PORTQ_MAX_MODEL_BYTES if this is intended")


GLOB_CHARS = frozenset("*?[")


def select_models(paths: list[str], max_bytes: int, displays: dict[str, str] | None = None,
                  load: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """The models among `paths`, checked before anything is written: a path that cannot be a model (missing,
    a pattern the shell left unexpanded, a directory that is not a Hugging Face model folder or one that cannot
    be converted with the request's `load` options, a file over the size limit) raises ConfigError naming it, so
    a mistake queues nothing. A sample file (`<stem>.npz`) given beside its model (`models/*`) is skipped by rule:
    it goes with its model, as its sample. Returns (models, notes on what was skipped)."""
    given = {Path(p) for p in paths}
    models, notes = [], []
    for raw in paths:
        path = Path(raw)
        display = (displays or {}).get(raw, raw)
        if path.suffix == SIDECAR_SUFFIX and path.is_file():
            owners = [p for p in given if p != path and p.with_suffix(SIDECAR_SUFFIX) == path]
            if owners:
                notes.append(f"{display}: skipped, the sample inputs of {sorted(owners)[0]}")
                continue
            raise ConfigError(f"is a sample file ({SIDECAR_SUFFIX}), not a model", step="submit", file=display,
                              hint=f"it is read as the sample of the model file beside it with the same stem; pass "
                                   f"that model (or --calibration {display} for static int8)")
        if not path.exists() and GLOB_CHARS & set(raw):
            raise ConfigError("matches no file (the shell passed the pattern on as it was)", step="submit",
                              file=display, hint="check the pattern and the directory")
        try:
            if is_model_folder(path):
                check_folder(path, display, (load or {}).get("task"), bool((load or {}).get("trust_remote_code")))
            else:
                check_model_path(path, max_bytes, display)
        except InputError as e:
            raise ConfigError(e.cause, step="submit", file=display, hint=e.hint) from None
        models.append(raw)
    return models, notes


def check_batch_name(batch: str) -> None:
    if not SAFE_ID.match(batch):
        raise ConfigError(f"batch name {batch!r} is not a valid id: letters, digits, '.', '_' and '-', starting with "
                          "a letter or digit, at most 128 characters", step="submit", hint="e.g. nightly-2024-06-01")


def claim_batch(store: Store, batch: str | None, sources: list[str] | None = None) -> list[str]:
    """Make room in `batch` for a new submission of `sources` (the model paths as records name them; None: every
    job of the batch). A job of the batch for the same source is replaced when it has finished (its record, spec
    and versions removed; its result stays in the store and serves the new job from the cache), so submitting the
    same files to the same batch again gives one row per file, not two; one still queued or running is refused
    (ConfigError). Jobs for other files stay: a batch can be built over several submissions. Returns what to tell
    the user."""
    from portq.tasks.state import keys
    from portq.tasks.state.records import list_records

    if batch is None:
        return []
    check_batch_name(batch)
    records = [r for r in list_records(store, batch) if sources is None or r.source in sources]
    if not records:
        return []
    unfinished = [r for r in records if not r.status.finished]
    if unfinished:
        names = ", ".join(sorted({r.source for r in unfinished})[:3])
        raise ConfigError(f"batch {batch!r} has {len(unfinished)} job(s) for these models still queued or running "
                          f"({names})", step="submit",
                          hint=f"follow it (`portq wait {batch}`), cancel it (`portq cancel {batch}`), or choose "
                               "another --batch")
    for r in records:
        for key in (keys.record_key(batch, r.job_id), keys.spec_key(batch, r.job_id),
                    keys.dead_letter_key(batch, r.job_id), f"{keys.BATCHES}/{batch}/versions/{r.job_id}"):
            store.delete(key)
    return [f"batch {batch}: replaced {len(records)} finished job(s) of the same model file(s) (their results stay in "
            "the store and serve as the cache)"]


def _folder_source(store: Store, path: Path, display: str, hf: dict[str, Any], max_bytes: int) -> HuggingFaceSource:
    """A Hugging Face model folder checked (nothing is uploaded when it cannot be used), packed into one archive and
    uploaded like a model file."""
    facts = check_folder(path, display, hf.get("task"), bool(hf.get("trust_remote_code")))
    size = folder_size(path, facts.files)
    if size > max_bytes:
        raise InputError(f"the folder's files are {size} bytes, over the limit of {max_bytes}", step="submit",
                         file=display, hint="raise PORTQ_MAX_MODEL_BYTES if this is intended")
    with tempfile.TemporaryDirectory(prefix="portq-folder-") as tmp:
        archive = pack_folder(path, facts.files, Path(tmp) / f"folder{ARCHIVE_SUFFIX}")
        ref = _upload(store, archive, display)
    return HuggingFaceSource.model_validate({**hf, "model": ref, "task": facts.task})


def prepare(paths: list[str], store: Store, *, batch: str | None, options: dict[str, Any],
            load: dict[str, Any] | None = None, force: bool = False, calibration: list[Path] | None = None,
            max_bytes: int, max_sample_bytes: int | None = None, displays: dict[str, str] | None = None) -> Submission:
    """Build one `convert` JobSpec per model path and write its spec and `queued` record; bad paths become
    failed records. `options` are the JobOptions fields (the sample is added per file); `load` the
    ConvertSource fields (arch, arch_kwargs, trust_pickle) and HuggingFaceSource fields (task, trust_remote_code,
    sequence_length, batch_size): a model file takes the first, a Hugging Face model folder (a directory) the
    second; `calibration` files go to the optimize options;
    `displays` what to call a path in records and errors when it is not the user's own (an in-memory module
    saved to a temporary file)."""
    if batch is not None:  # before anything is written under its name
        check_batch_name(batch)
    sub = Submission(batch=batch or new_batch_id())
    hf = {k: v for k, v in (load or {}).items() if k in HF_LOAD_FIELDS}
    load = {k: v for k, v in (load or {}).items() if k not in HF_LOAD_FIELDS}
    ref = {"key": "-", "name": "-", "sha256": "-", "size": 0}
    try:  # a bad option fails the whole submission before anything is uploaded
        JobOptions.model_validate(options)
        ConvertSource.model_validate({"model": ref, **load})
        HuggingFaceSource.model_validate({"model": ref, "task": "-", **{k: v for k, v in hf.items() if v is not None}})
    except ValidationError as e:
        raise ConfigError(validation_problems(e), step="submit") from None
    if calibration:
        refs = []
        for path in calibration:
            check_sample_path(path, max_sample_bytes or max_bytes)
            refs.append(_upload(store, path).model_dump(mode="json"))
        options = {**options, "optimize": {**(options.get("optimize") or {}), "calibration": refs}}
    for raw in paths:
        path = Path(raw)
        display = (displays or {}).get(raw, str(path))
        folder = is_model_folder(path)
        model = model_name(str(path.resolve()) if folder else raw)
        job_id = new_id("j")
        try:
            sample = None
            if folder:
                spec = JobSpec(job_id=job_id, batch_id=sub.batch, model=model, kind=JobKind.huggingface, force=force,
                               source=_folder_source(store, path, display, hf, max_bytes),
                               options=JobOptions.model_validate(options))
            else:
                check_model_path(path, max_bytes)
                source = _upload(store, path, display)
                sidecar = path.with_suffix(SIDECAR_SUFFIX)
                if sidecar.is_file() and sidecar != path:
                    check_sample_path(sidecar, max_sample_bytes or max_bytes)
                    sample = _upload(store, sidecar)
                spec = JobSpec(job_id=job_id, batch_id=sub.batch, model=model, kind=JobKind.convert, force=force,
                               source=ConvertSource(model=source, **load),
                               options=JobOptions.model_validate({**options, "sample": sample}))
        except PortqError as e:
            rec = JobRecord(job_id=job_id, batch=sub.batch, model=model, source=display,
                            target=Target(options.get("target", "cpu")), status=JobStatus.failed)
            lifecycle.refused(store, rec, e.message, new=True)
            sub.rejected.append(rec)
            continue
        delivery.write_spec(store, spec)  # what `portq retry` resubmits
        lifecycle.submitted(store, spec)
        sub.specs.append(spec)
    return sub


@dataclass
class FusionRequest:
    """A fusion as the client has it: files on its disk, the method with its checked parameters, the data."""

    members: list[str]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    eval_data: str | None = None
    calibration: str | None = None
    finetune: dict[str, Any] | None = None  # FinetuneOptions' fields, with "data" a path
    name: str | None = None  # the fused model's name in reports


def member_labels(paths: list[str]) -> list[str]:
    """How messages and reports name each file: its file name, or the path as given where file names clash
    (`run1/model.pt`, `run2/model.pt`); the same path given twice is told apart by `#2`, `#3`."""
    names = [Path(p).name for p in paths]
    labels = [n if names.count(n) == 1 else p for n, p in zip(names, paths)]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def _check_fusion_file(path: str, limit: int, model: bool) -> None:
    """A member (model) or data file that can be used, or a ConfigError: one unusable file refuses the whole
    fusion before anything is uploaded."""
    p = Path(path)
    try:
        if model:
            check_model_path(p, limit)
        elif not p.is_file():
            raise InputError("file does not exist" if not p.exists() else "is not a file", step="fuse", file=path)
        else:
            check_sample_path(p, limit)
    except InputError as e:
        raise ConfigError(e.cause, step="fuse", file=e.file, hint=e.hint) from None


def prepare_fusion(request: FusionRequest, store: Store, *, batch: str | None, options: dict[str, Any],
                   load: dict[str, Any] | None = None, force: bool = False, max_bytes: int,
                   max_sample_bytes: int | None = None) -> Submission:
    """Build the one `fuse` JobSpec of a fusion and write its spec and `queued` record.

    Every file is checked before any is uploaded; the job's sample is the first member's sidecar `.npz`.
    `options` are the JobOptions fields, `load` how every model file is loaded (arch, arch_kwargs,
    trust_pickle). The method and its parameters were checked by the caller.
    """
    sub = Submission(batch=batch or new_batch_id())
    JobOptions.model_validate(options)
    sample_limit = max_sample_bytes or max_bytes
    paths = [*request.members, *([request.base] if request.base else [])]
    finetune_data = (request.finetune or {}).get("data")
    for path in paths:
        _check_fusion_file(path, max_bytes, model=True)
    first = Path(request.members[0])
    sidecar: Path | None = first.with_suffix(SIDECAR_SUFFIX)
    if sidecar is not None and (not sidecar.is_file() or sidecar == first):
        sidecar = None
    for data in (request.eval_data, request.calibration, finetune_data, str(sidecar) if sidecar else None):
        if data:
            _check_fusion_file(data, sample_limit, model=False)

    def upload(path: str | None) -> SourceRef | None:
        return _upload(store, Path(path)) if path else None

    members = [FuseMember(model=_upload(store, Path(p)), name=n, **(load or {}))
               for p, n in zip(paths, member_labels(paths))]
    base = members.pop() if request.base else None
    finetune = None
    if request.finetune is not None and finetune_data:
        finetune = FinetuneOptions(**{**request.finetune, "data": upload(finetune_data)})
    sample = _upload(store, sidecar) if sidecar is not None else None
    source = FuseSource(
        members=members, method=request.method, params=request.params, base=base,
        eval_data=upload(request.eval_data), calibration=upload(request.calibration), finetune=finetune)
    stems = [Path(p).stem for p in request.members]
    model = safe_name(request.name or f"{request.method}-{'-'.join(stems)}")
    spec = JobSpec(job_id=new_id("j"), batch_id=sub.batch, model=model, kind=JobKind.fuse, force=force,
                   source=source, options=JobOptions.model_validate({**options, "sample": sample}))
    delivery.write_spec(store, spec)
    lifecycle.submitted(store, spec)
    sub.specs.append(spec)
    return sub
