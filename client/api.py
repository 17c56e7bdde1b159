"""portq's Python API (`import portq`): submit models, follow a batch, read its report.

The `portq` command is built on these functions, so both take one path: the same settings resolution
(keyword arguments, then `PORTQ_*` environment variables, then defaults, through `Settings.resolve`), the
same checks, the same errors (`portq.PortqError` and its subclasses; nothing here exits the process), and
the typed objects of the job contract (`BatchReport`, `JobRecord`) as results.

    import portq

    report = portq.submit(["models/bert.pt2"], formats=["onnx", "torchscript"], store="/shared/portq")
    for job in report.jobs:
        print(job.model, job.status.value, job.best)

With no broker configured, jobs run in this process (the embedded default) and `submit` returns when they
have finished. With a broker, `submit` queues them and, with `wait=True` (the default), follows the batch
until every job has finished; `wait=False` returns at once with the batch as queued.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union

from portq.client.in_memory import is_module, module_name, save_module
from portq.client.progress import BatchProgress, BatchWatcher, OnProgress
from portq.tasks.core.contract import (
    ArtifactRequest,
    BatchReport,
    Comparison,
    InputSpec,
    JobRecord,
    JobSpec,
    Precision,
    Target,
)
from portq.tasks.core.errors import ConfigError, InputError, WaitTimeout
from portq.tasks.core.requests import (
    HF_LOAD_FIELDS,
    ConvertRequest,
    FuseRequest,
    JobRequest,
    OptimizeRequest,
    PackageRequest,
)
from portq.tasks.core.settings import Settings
from portq.tasks.formats import artifact_requests
from portq.tasks.state import records as batches
from portq.tasks.state.store import Store
from portq.tasks.state.submission import Submission, claim_batch, prepare, select_models

if TYPE_CHECKING:
    import torch
    from portq.tasks.execution.night import Night
    from portq.tasks.reports.provenance import Verification
    from portq.tasks.reports.triton import Packaged

#: what `submit` takes: model files or Hugging Face model folders (paths), or nn.Module objects with `example_inputs`
ModelSource = Union[str, "os.PathLike[str]", "torch.nn.Module"]

#: polling interval while following a batch, seconds
POLL_S = 0.5


def settings(broker: str | None = None, store: str | None = None) -> Settings:
    """The settings a call runs with: the keyword arguments, then PORTQ_* environment variables, then defaults."""
    return Settings.resolve(broker_url=broker, store=store)


def submit(
    models: ModelSource | Sequence[ModelSource],
    request: ConvertRequest | None = None,
    *,
    example_inputs: Any = None,
    broker: str | None = None,
    store: str | None = None,
    progress: OnProgress | None = None,
    on_submitted: Callable[[Submission, Settings, Store], None] | None = None,
    on_started: Callable[[Submission, Settings, Store], None] | None = None,
    **options: Any,
) -> BatchReport:
    """Convert models: one job per model file, Hugging Face model folder (or in-memory `nn.Module`), each to every
    format in `formats`.

    The options are `ConvertRequest`'s fields (the `portq submit` flags of the same names), given as keyword
    arguments or as a request: `target`, `formats`, `batch`, `wait` (default True here), `timeout`, `inputs`, `dynamic`,
    `atol`, `rtol`, `tolerance_mode`, `quantile`, `tolerance_precision`, `optimize`, `precision`, `calibration`,
    `output_tol`, `localise`, `opset`, `seed`, `runs`, `warmup`, `batch_sizes`, `arch`, `arch_kwargs`,
    `trust_pickle`, `force`; for Hugging Face folders `task`, `trust_remote_code`, `sequence_length`, `batch_size`.

    Returns the batch report: every job with its status, artifacts, parity and latency, once they have finished;
    with `wait=False` on a queue, the batch as queued. A job that fails is in the report (`status` failed, `error`
    why); what stops the whole submission (a bad option, an unreachable broker) raises a `PortqError`, and
    following the batch past `timeout` seconds (0: no limit) raises `WaitTimeout`.

    An `nn.Module` needs `example_inputs` (a tensor or a tuple of them); it is saved as a `.pt2` by
    torch.export (else TorchScript by torch.jit.trace) and submitted as that file. `inputs` are input specs
    (`'ids:int64[batch=2,16]{0,30000}'`), `output_tol` per-output tolerances (`{"logits": {"atol": 1e-3}}`);
    `optimize` ("auto", or variant names) adds optimization variants, `precision` the lossy precisions they may
    use (`["int8"]`), `calibration` .npz files for static int8. `progress` is called at every poll while
    the batch runs; `on_submitted` once the jobs are recorded in the store (the batch id is known), `on_started`
    once they are on the queue, or about to run here.
    """
    req = ConvertRequest.build(request, **_waiting(request, options))
    resolved = settings(broker, store)
    st = Store(resolved.store)
    sources = list(models) if isinstance(models, (list, tuple)) else [models]
    if not sources:
        raise InputError("no models given", step="submit", hint="pass model files or nn.Module objects")
    job, load = job_options(req)
    with tempfile.TemporaryDirectory(prefix="portq-modules-") as tmp:
        paths, displays = _files(sources, example_inputs, Path(tmp), list(req.dynamic))
        paths, notes = select_models(paths, resolved.max_model_bytes, displays, load)
        notes += claim_batch(st, req.batch, [displays.get(p, str(Path(p))) for p in paths])
        sub = prepare(paths, st, batch=req.batch, options=job, load=load, force=req.force,
                      calibration=calibration_files(req.calibration), max_bytes=resolved.max_model_bytes,
                      max_sample_bytes=resolved.max_sample_bytes, displays=displays)
        sub.notes = notes
    return dispatch(sub, resolved, st, wait=req.wait, timeout=req.timeout, progress=progress,
                    on_submitted=on_submitted, on_started=on_started)


def optimize(models: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
             request: OptimizeRequest | None = None, *, broker: str | None = None, store: str | None = None,
             progress: OnProgress | None = None, on_submitted: Callable[[Submission, Settings, Store], None] | None
             = None, on_started: Callable[[Submission, Settings, Store], None] | None = None,
             **options: Any) -> BatchReport:
    """Optimization variants of existing ONNX files (a portq artifact's model.onnx included), each measured against
    the file itself; the fastest that passes parity is picked. Options: `OptimizeRequest`'s fields. Anything that is
    not ONNX is refused (ConfigError) before work starts."""
    from portq.client.onnx_files import artifact_inputs, check_onnx

    req = OptimizeRequest.build(request, step="optimize", **_waiting(request, options))
    paths = [Path(p) for p in ([models] if isinstance(models, (str, os.PathLike)) else models)]
    for path in paths:
        check_onnx(path)
    specs = req.inputs or (artifact_inputs(paths[0]) if len(paths) == 1 else [])
    convert = ConvertRequest.build(target=req.target, formats=["onnx"], batch=req.batch, wait=req.wait,
                                   timeout=req.timeout, force=req.force, inputs=specs, optimize=req.optimize,
                                   precision=req.precision, calibration=req.calibration)
    return submit([str(p) for p in paths], convert, broker=broker, store=store, progress=progress,
                  on_submitted=on_submitted, on_started=on_started)


def fuse(models: Sequence[str | os.PathLike[str]], request: FuseRequest | None = None, *, broker: str | None = None,
         store: str | None = None, progress: OnProgress | None = None,
         on_submitted: Callable[[Any, Settings, Store], None] | None = None,
         on_started: Callable[[Any, Settings, Store], None] | None = None, **options: Any) -> BatchReport:
    """Fuse models into one (an ensemble, a chain, a merge of their weights), optionally fine-tune it, then convert
    and check it like any model: one job. Options: `FuseRequest`'s fields (`method` is required). The request is
    checked before anything is uploaded (a ConfigError says what is wrong); what needs the models loaded fails the
    job at step `fuse`."""
    from portq.client.fusion import prepare_fusion_jobs

    req = FuseRequest.build(request, step="fuse", **_waiting(request, options))
    resolved = settings(broker, store)
    st = Store(resolved.store)
    sub = prepare_fusion_jobs([os.fspath(m) for m in models], req, resolved, st, job_options(req, "fuse"))
    return dispatch(sub, resolved, st, wait=req.wait, timeout=req.timeout, progress=progress,
                    on_submitted=on_submitted, on_started=on_started)


def night(manifest: str | os.PathLike[str], *, batch: str | None = None, force: bool = False,
          broker: str | None = None, store: str | None = None) -> tuple[Night, Settings, Store]:
    """One night of a nightly manifest, prepared as a new batch of its series (to `dispatch`)."""
    from portq.tasks.execution.night import submit_night

    resolved = settings(broker, store)
    st = Store(resolved.store)
    prepared = submit_night(Path(manifest), st, max_bytes=resolved.max_model_bytes,
                            max_sample_bytes=resolved.max_sample_bytes, force=force, batch=batch)
    return prepared, resolved, st


def compare(baseline: str | None = None, new: str | None = None, *, series: str | None = None,
            latency_threshold: float = 0.10, error_factor: float = 10.0, store: str | None = None) -> Comparison:
    """What changed between two batches (ids, or batch report .json files), or between a series' last two
    nights, per model x target x artifact. Raises UsageError for batches that cannot be compared."""
    from portq.client.comparison import compared

    return compared(baseline, new, series=series, latency_threshold=latency_threshold, error_factor=error_factor,
                    store=store)[0]


def package(batch: str, request: PackageRequest | None = None, *, store: str | None = None,
            **options: Any) -> Packaged:
    """Write a batch's servable artifacts as a Triton model repository: one model per succeeded job, from its best
    artifact (or `artifact`), with config.pbtxt, a README of its parity and latency, and its provenance record.
    Options: `PackageRequest`'s fields (`triton`, the repository folder, is required). Jobs that failed or have no
    servable artifact are skipped (`Packaged.skipped` says why); when none is packaged, nothing is written."""
    from portq.tasks.reports.triton import package as package_batch

    req = PackageRequest.build(request, step="package", **options)
    st = Store(settings(store=store).store)
    return package_batch(st, batch, Path(req.triton), artifact_id=req.artifact, max_batch_size=req.max_batch_size)


def verify(target: str | os.PathLike[str], *, store: str | None = None) -> Verification:
    """Recompute the sha256 of every file that the provenance records in scope name, against the records.

    `target`: a batch id (in the store), a folder (a result folder, a packaged Triton repository, a whole store:
    every provenance record under it), an fsspec URL of such a folder, or a file (a provenance record, or an
    artifact file with its record beside it). `Verification.ok` only when every file matched; `problems` names
    each changed or missing file."""
    from portq.tasks.reports import provenance

    text = os.fspath(target)
    if "://" in text:
        return provenance.verify_tree(Store(text))
    path = Path(text)
    if path.is_file():
        return provenance.verify_file(path)
    if path.is_dir():
        return provenance.verify_tree(Store(str(path.resolve())))
    if os.sep in text or "/" in text:
        raise InputError(f"{text}: no such file or folder", step="verify",
                         hint="give a batch id, a result folder, a Triton repository or a provenance file")
    return provenance.verify_batch(Store(settings(store=store).store), text)


def _waiting(request: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The API follows a batch by default (`wait=True`), where the command line waits only with --wait."""
    return options if request is not None else {"wait": True, **options}


class Jobs(Protocol):
    """What `dispatch` takes: a batch's prepared jobs (a Submission, a fusion, a manifest's night)."""

    batch: str
    specs: list[JobSpec]
    rejected: list[JobRecord]


def dispatch(sub: Jobs, resolved: Settings, st: Store, *, wait: bool = True, timeout: float = 0,
             progress: OnProgress | None = None,
             on_submitted: Callable[[Any, Settings, Store], None] | None = None,
             on_started: Callable[[Any, Settings, Store], None] | None = None) -> BatchReport:
    """Run prepared jobs: here (the embedded default, followed to the end) or onto the queue (followed with
    `wait`); the batch report. Every command that makes jobs (submit, fuse, a manifest's night) ends here."""
    if on_submitted is not None:
        on_submitted(sub, resolved, st)
    watcher = BatchWatcher(st, sub.batch)
    if resolved.embedded:
        if on_started is not None:
            on_started(sub, resolved, st)
        _run_here(sub, st, resolved, progress, watcher)
        return _follow(watcher, 0, progress)
    from portq.client.dispatch import enqueue

    enqueue(sub.specs, resolved, st)
    if on_started is not None:
        on_started(sub, resolved, st)
    if not wait:
        return batches.batch_report(st, sub.batch)
    return _follow(watcher, timeout, progress, refusals=_refusals(resolved, st, sub.batch))


def status(batch: str, *, store: str | None = None) -> list[JobRecord]:
    """Each job's record: queued, running (and the step it runs now), succeeded, failed or cancelled."""
    resolved = settings(store=store)
    st = Store(resolved.store)
    refusals = _refusals(resolved, st, batch)
    if refusals is not None:  # what workers that could not reach this store said about its jobs
        refusals()
    return batches.require_batch(st, batch, "status")


def report(batch: str, *, store: str | None = None) -> BatchReport:
    """The batch report (the contract `portq report BATCH --json` prints): every job, artifact, parity, latency."""
    resolved = settings(store=store)
    st = Store(resolved.store)
    refusals = _refusals(resolved, st, batch)
    if refusals is not None:
        refusals()
    return batches.batch_report(st, batch)


def summary_pages(batch: str, *, store: str | None = None) -> dict[str, str]:
    """Where the batch's summary pages are in the store (`html`, `md`): written when a client saw it finish."""
    from portq.tasks.reports.batch_pages import page_urls

    return page_urls(Store(settings(store=store).store), batch)


def wait(batch: str, *, timeout: float = 0, store: str | None = None,
         progress: OnProgress | None = None) -> BatchReport:
    """Follow a batch until every job has finished (from any process: it reads the store), then its report.

    Raises WaitTimeout after `timeout` seconds (0: no limit); the jobs carry on regardless.
    """
    resolved = settings(store=store)
    st = Store(resolved.store)
    batches.require_batch(st, batch, "wait")
    return _follow(BatchWatcher(st, batch), timeout, progress, refusals=_refusals(resolved, st, batch))


# ----------------------------------------------------------------------------------------------- the parts


def job_options(request: JobRequest, step: str = "submit") -> tuple[dict[str, Any], dict[str, Any]]:
    """The request as JobOptions fields and the convert source's load fields, checked (a ConfigError names the
    problem)."""
    r = request
    options: dict[str, Any] = {
        "target": r.target, "artifacts": artifact_requests(list(r.formats) or ["onnx"], {"onnx": {"opset": r.opset}}),
        "inputs": [_input_spec(s) for s in r.inputs], "dynamic": list(r.dynamic),
        "parity": {"seed": r.seed, "localise": r.localise},
    }
    tol: dict[str, Any] = {k: v for k, v in (("atol", r.atol), ("rtol", r.rtol), ("mode", r.tolerance_mode),
                                             ("quantile", r.quantile), ("precision", r.tolerance_precision))
                           if v is not None}
    if r.output_tol:
        tol["outputs"] = {name: dict(fields) for name, fields in r.output_tol.items()}
    if tol:
        options["tolerance"] = tol
    latency: dict[str, Any] = {k: v for k, v in (("runs", r.runs), ("warmup", r.warmup)) if v is not None}
    if r.batch_sizes:
        latency["batch_sizes"] = list(r.batch_sizes)
    if latency:
        options["latency"] = latency
    if r.optimize or r.precision:
        options["optimize"] = optimize_options(r.optimize, r.precision, options["artifacts"], r.target, step)
    load = {"arch": r.arch, "arch_kwargs": dict(r.arch_kwargs), "trust_pickle": r.trust_pickle}
    load.update({name: getattr(r, name) for name in HF_LOAD_FIELDS if name in type(r).model_fields})
    return options, load


def _names(value: str | Sequence[Any] | None) -> list[str]:
    """"a,b" or ["a", "b"] -> ["a", "b"]."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [getattr(v, "value", v) for v in value]
    return [str(v).strip() for v in items if str(v).strip()]


def optimize_options(candidates: str | Sequence[str] | None, precisions: str | Sequence[Any] | None,
                     artifacts: list[ArtifactRequest], target: Target, step: str = "submit") -> dict[str, Any]:
    """`optimize` and `precision` as the job's optimize options, refused here when no requested format has such a
    variant or no variant computes in such a precision on the target."""
    from portq.tasks.core.contract import OptimizeOptions
    from portq.tasks.formats.selection import check_optimize

    allowed = []
    for text in _names(precisions):
        try:
            allowed.append(Precision(text))
        except ValueError:
            raise ConfigError(f"--precision {text!r} is not one of fp16, bf16, int8", step=step) from None
    options = OptimizeOptions(candidates=_names(candidates) or ["auto"], precisions=allowed)
    check_optimize(options, list(dict.fromkeys(a.format for a in artifacts)), target.value)
    return options.model_dump(mode="json", exclude={"calibration"})


def calibration_files(paths: Sequence[str | os.PathLike[str]], step: str = "submit") -> list[Path]:
    """--calibration: files, or every .npz in a directory (name order)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.glob("*.npz"))
            if not found:
                raise ConfigError(f"--calibration {path}: the directory holds no .npz file", step=step)
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"--calibration {path}: no such file or directory", step=step)
    return files


def _input_spec(spec: str | InputSpec) -> InputSpec:
    if isinstance(spec, InputSpec):
        return spec
    try:
        return InputSpec.parse(spec)
    except ValueError as e:  # pydantic's ValidationError is a ValueError too: one message either way
        from portq.tasks.core.errors import validation_problems

        raise ConfigError(validation_problems(e) if hasattr(e, "errors") else str(e), step="submit") from None


def _files(sources: list[Any], example_inputs: Any, directory: Path,
           dynamic: list[str]) -> tuple[list[str], dict[str, str]]:
    """Paths to submit: the user's files as given, modules saved under `directory` (and what to call them)."""
    paths: list[str] = []
    displays: dict[str, str] = {}
    taken: set[str] = set()
    for source in sources:
        if is_module(source):
            saved = save_module(source, example_inputs, directory, module_name(source, taken), dynamic)
            paths.append(str(saved.path))
            displays[str(saved.path)] = saved.display
        elif isinstance(source, (str, os.PathLike)):
            paths.append(os.fspath(source))
        else:
            raise InputError(f"cannot submit a {type(source).__name__}: give model file paths or nn.Module "
                             "objects", step="submit")
    return paths, displays


def _run_here(sub: Submission, st: Store, resolved: Settings, progress: OnProgress | None,
              watcher: BatchWatcher) -> None:
    """The embedded default: the jobs run in this thread while another follows their records for `progress`."""
    from portq.client.dispatch import run_here

    if progress is None:
        run_here(sub.specs, st, resolved)
        return
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(POLL_S):
            progress(watcher.poll())

    thread = threading.Thread(target=follow, name="portq-progress", daemon=True)
    thread.start()
    try:
        run_here(sub.specs, st, resolved)
    finally:
        stop.set()
        thread.join()


def _refusals(resolved: Settings, st: Store, batch: str) -> Callable[[], object] | None:
    """With a broker: what records the jobs a worker refused without reaching this store (`_follow` calls it)."""
    if resolved.embedded:
        return None
    from portq.client.dispatch import collect_refusals

    return lambda: collect_refusals(resolved, st, batch)


def _follow(watcher: BatchWatcher, timeout: float, progress: OnProgress | None,
            poll_s: float = POLL_S, refusals: Callable[[], object] | None = None) -> BatchReport:
    """Poll the batch's records until every job has finished; its report then. `refusals`, every few seconds:
    record what workers that could not reach this store said about its jobs."""
    import time

    checked = 0.0
    while True:
        if refusals is not None and time.monotonic() - checked > 2:
            refusals()
            checked = time.monotonic()
        state: BatchProgress = watcher.poll()
        if progress is not None:
            progress(state)
        if state.complete:
            from portq.tasks.reports.batch_pages import publish_summary

            finished = batches.batch_report(watcher.store, watcher.batch, state.records)  # no second read
            publish_summary(watcher.store, finished)
            return finished
        if timeout and state.elapsed_s > timeout:
            raise WaitTimeout(f"gave up following batch {watcher.batch} after {timeout:g}s; "
                              f"{state.total - state.done} job(s) still unfinished", step="wait",
                              hint=f"they carry on: `portq wait {watcher.batch}` or `portq status {watcher.batch}` "
                                   "later")
        time.sleep(poll_s)


__all__ = ["BatchProgress", "ConvertRequest", "FuseRequest", "ModelSource", "OptimizeRequest", "artifact_requests",
           "compare", "dispatch", "fuse", "job_options", "night", "optimize", "package", "report", "settings", "status",
           "submit", "summary_pages", "verify", "wait"]
