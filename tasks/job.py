"""Running one job: load, inputs, then each format (export -> parity -> latency); the one error boundary.

`run_job` never raises for a job's own failure: whatever goes wrong is recorded, with its step, file and
cause, in the job's report and state record, and the caller (a Celery task, or the embedded runner)
carries on. Only `TransientError` (storage trouble) escapes, so the queue can retry it.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portq.tasks import batches
from portq.tasks.capture import captured
from portq.tasks.contract import (
    ArtifactReport,
    Failure,
    Format,
    JobRecord,
    JobReport,
    JobSpec,
    JobStatus,
    LatencyReport,
    StepStatus,
    utcnow,
)
from portq.tasks.environment import toolchain, worker_name
from portq.tasks.errors import InputError, PortqError, StoreError, TransientError, first_line
from portq.tasks.store import Store, result_key

REPORT_FILE = "report.json"
LOG_FILE = "job.log"


def failed_key(job_id: str) -> str:
    return f"failed/{job_id}"


@dataclass
class SourceEvidence:
    """What the source model did on the job's samples: the reference every artifact is held to."""

    device: str
    samples: list[Any]
    reference: list[Any]
    latency: Any  # LatencyStats
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[int, dict[int, str]]


def run_job(spec: JobSpec, store: Store, *, worker: str | None = None, isolation: Any = None) -> JobReport:
    """Run (or reuse) one job and record its outcome. Idempotent: a finished job is not run twice.

    `isolation` (a `portq.tasks.isolation.Isolation`) runs each format step; the default runs them here.
    """
    worker = worker or worker_name()
    try:
        record = batches.read_record(store, spec.batch_id, spec.job_id)
    except StoreError as e:
        raise TransientError(e.cause, step="store") from e
    if record is not None and record.status.finished and record.result:
        existing = batches.read_report(store, record)
        if existing is not None:  # a second delivery of a finished job
            return existing
    if record is not None and record.status is JobStatus.cancelled:
        return JobReport(job_id=spec.job_id, batch=spec.batch_id, model=spec.model, source=spec.source.name,
                         target=spec.target, status=JobStatus.cancelled, error="cancelled before it started")
    record = record or JobRecord(job_id=spec.job_id, batch=spec.batch_id, model=spec.model, source=spec.source.name,
                                 target=spec.target, status=JobStatus.queued)
    tools = toolchain()
    key = spec.job_key(tools)
    cache = result_key(key)

    if not spec.force and store.exists(f"{cache}/{REPORT_FILE}"):
        report = JobReport.model_validate(store.read_json(f"{cache}/{REPORT_FILE}"))
        if report.status is JobStatus.succeeded:
            _finish(store, record, report, cache, cached=True)
            return report.model_copy(update={"cached": True, "job_id": spec.job_id, "batch": spec.batch_id,
                                             "model": spec.model})

    record.status, record.attempts, record.error = JobStatus.running, record.attempts + 1, None
    record.worker = worker
    batches.write_record(store, record)

    report = JobReport(job_id=spec.job_id, job_key=key, batch=spec.batch_id, model=spec.model,
                       source=spec.source.name, target=spec.target, status=JobStatus.running, toolchain=tools,
                       worker=worker, started_at=utcnow(), trust_pickle=spec.trust_pickle)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"portq-{spec.job_id}-") as tmp:
        workdir = Path(tmp)
        final = cache if not spec.force else f"{cache}-{spec.job_id}"
        try:
            with captured(workdir / LOG_FILE):
                _convert(spec, store, workdir, report, final, isolation)
        except TransientError:
            raise
        except PortqError as e:
            _fail(report, e.at(file=spec.source.name))
        except Exception as e:  # a bug in portq or a library: still a recorded failure, never a dead worker
            _fail(report, PortqError(f"internal error: {type(e).__name__}: {first_line(e)}", step="job",
                                     file=spec.source.name, hint="please report this with the job's report.json"))
            report.inputs.append({"traceback": traceback.format_exc(limit=8)})
        if report.status is JobStatus.running:
            bad = [a for a in report.artifacts if a.status is StepStatus.failed or (a.parity and not a.parity.passed)]
            report.status = JobStatus.failed if bad else JobStatus.succeeded
            if bad:
                report.error = "; ".join(_artifact_problem(a) for a in bad)
        if report.status is not JobStatus.succeeded:
            final = failed_key(spec.job_id)
            report.artifacts = [_relocate(a, store, cache, final) for a in report.artifacts]
        report.finished_at = utcnow()
        report.duration_s = round(time.perf_counter() - start, 3)
        _write_reports(workdir, report)
        try:
            store.publish_dir(workdir, final, commit_file=REPORT_FILE)
        except (StoreError, OSError) as e:
            raise TransientError(f"cannot publish results: {e}", step="publish") from e
    _finish(store, record, report, final, cached=False)
    return report


def _artifact_problem(a: ArtifactReport) -> str:
    if a.status is StepStatus.failed:
        return f"{a.format.value}: {a.error}"
    assert a.parity is not None
    worst = max(a.parity.outputs, key=lambda o: o.max_abs_err, default=None)
    where = ""
    if worst:
        where = f" (output {worst.name}: max abs err {worst.max_abs_err:.3g}, max rel err {worst.max_rel_err:.3g})"
    return (f"{a.format.value}: parity failed at atol {a.parity.atol:g} / rtol {a.parity.rtol:g}{where}")


def _relocate(a: ArtifactReport, store: Store, old: str, new: str) -> ArtifactReport:
    if a.path and a.path.startswith(store.url(old)):
        a.path = store.url(new) + a.path[len(store.url(old)):]
    return a


def _fail(report: JobReport, e: PortqError) -> None:
    report.status = JobStatus.failed
    report.error = e.message
    report.failure = Failure(**e.to_dict())  # type: ignore[arg-type]


def _finish(store: Store, record: JobRecord, report: JobReport, result: str, *, cached: bool) -> None:
    record.status, record.error, record.result, record.cached = report.status, report.error, result, cached
    batches.write_record(store, record)


def _write_reports(workdir: Path, report: JobReport) -> None:
    from portq.tasks.reporting import job_markdown

    (workdir / "report.md").write_text(job_markdown(report))
    (workdir / REPORT_FILE).write_text(report.model_dump_json(indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- the work


def _convert(spec: JobSpec, store: Store, workdir: Path, report: JobReport, final: str,
             isolation: Any = None) -> None:
    from portq.tasks.inputs import InputSignature, apply_dynamic, load_npz, resolve_signature
    from portq.tasks.loading import LoadRequest, load_model
    from portq.tasks.runners import torch_device

    display = spec.source.name
    device = torch_device(spec.target)
    with store.local_file(spec.source.key) as path:
        model = load_model(LoadRequest(path=path, display=display, arch=spec.arch, arch_kwargs=spec.arch_kwargs,
                                       trust_pickle=spec.trust_pickle))
    npz = None
    if spec.sample is not None:
        with store.local_file(spec.sample.key) as sample_path:
            npz = load_npz(sample_path, spec.sample.name)
    sig: InputSignature = resolve_signature(spec.inputs, npz, model.example_inputs, model.input_names, display)
    apply_dynamic(sig, spec.dynamic)
    report.inputs = sig.describe()
    evidence = _run_source(spec, model, sig, device, display)
    if isolation is None:
        from portq.tasks.isolation import InProcess

        isolation = InProcess()
    for fmt in spec.formats:
        # wrapped at the call site: the isolation may run the step in a child process (a crash costs one format)
        report.artifacts.append(isolation.run_format(_run_format, fmt, spec, model, evidence, workdir, store, final))


def _run_source(spec: JobSpec, model: Any, sig: Any, device: str, display: str) -> SourceEvidence:
    from portq.tasks.inputs import parity_samples
    from portq.tasks.latency import measure
    from portq.tasks.runners import TorchRunner, call

    samples = parity_samples(sig, spec.parity.random_samples, spec.parity.seed)
    runner = TorchRunner(model.module, device)
    reference = []
    for i, sample in enumerate(samples):
        try:
            reference.append(call(runner, sample))
        except Exception as e:
            shapes = ", ".join(f"{s.name}:{a.dtype}{list(a.shape)}" for s, a in zip(sig.specs, sample))
            which = "the example inputs" if i < len(sig.samples) or i == 0 else f"random sample {i}"
            raise InputError(f"the model rejected {which} ({shapes}): {type(e).__name__}: {first_line(e)}",
                             step="inputs", file=display,
                             hint="check the sidecar .npz or --input specs against the model's forward()") from e
    latency = measure(runner, samples[0], warmup=spec.latency.warmup, runs=spec.latency.runs)
    dynamic = {i: dict(s.dynamic) for i, s in enumerate(sig.specs) if s.dynamic}
    return SourceEvidence(device=device, samples=samples, reference=reference, latency=latency,
                          input_names=sig.names, output_names=[n for n, _ in reference[0]], dynamic=dynamic)


def _run_format(fmt: Format, spec: JobSpec, model: Any, ev: SourceEvidence, workdir: Path, store: Store,
                final: str) -> ArtifactReport:
    from portq.tasks.formats import FORMATS, ExportRequest
    from portq.tasks.latency import measure
    from portq.tasks.parity import compare
    from portq.tasks.runners import call, to_tensors

    handler = FORMATS.get(fmt.value)
    reason = handler.unsupported(spec.target)
    if reason:
        return ArtifactReport(format=fmt, status=StepStatus.skipped, error=reason)
    step = f"export:{fmt.value}"
    artifact = ArtifactReport(format=fmt, status=StepStatus.failed)
    try:
        req = ExportRequest(model=model, args=to_tensors(ev.samples[0], ev.device), input_names=ev.input_names,
                            output_names=ev.output_names, dynamic=ev.dynamic, out_dir=workdir, device=ev.device,
                            opset=spec.opset, display=spec.source.name)
        result = handler.export(req)
        artifact.route, artifact.opset = result.route, result.opset
        artifact.path = store.url(f"{final}/{result.path.name}")
        artifact.size_bytes = result.path.stat().st_size
        step = f"session:{fmt.value}"
        runner = handler.open_runner(result.path, ev.device)
        step = f"parity:{fmt.value}"
        actual = [call(runner, s) for s in ev.samples]
        artifact.parity = compare(ev.reference, actual, spec.tolerance, seed=spec.parity.seed, device=ev.device)
        step = f"latency:{fmt.value}"
        stats = measure(runner, ev.samples[0], warmup=spec.latency.warmup, runs=spec.latency.runs)
        src = ev.latency
        artifact.latency = LatencyReport(
            device=ev.device, warmup=stats.warmup, runs=stats.runs, p50_ms=stats.p50_ms,
            p90_ms=stats.percentile(90), p99_ms=stats.percentile(99), mean_ms=stats.mean_ms,
            source_p50_ms=src.p50_ms, source_p90_ms=src.percentile(90), source_p99_ms=src.percentile(99),
            source_mean_ms=src.mean_ms, speedup=src.p50_ms / stats.p50_ms if stats.p50_ms > 0 else 0.0,
        )
        artifact.status = StepStatus.succeeded
    except PortqError as e:
        artifact.error = e.at(step=step, file=spec.source.name).message
    except Exception as e:
        artifact.error = PortqError(f"{type(e).__name__}: {first_line(e)}", step=step, file=spec.source.name).message
    return artifact
