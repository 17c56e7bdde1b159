"""Running one job: load, inputs, then each format (export -> parity -> latency); the one error boundary.

`run_job` never raises for a job's own failure: whatever goes wrong is recorded, with its step, file and
cause, in the job's report and state record, and the caller (a Celery task, or the embedded runner)
carries on. Only `TransientError` (storage trouble) escapes, so the queue can retry it.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portq.tasks.core.contract import (
    ArtifactReport,
    Failure,
    Format,
    JobRecord,
    JobReport,
    JobSpec,
    JobStatus,
    StepStatus,
    utcnow,
)
from portq.tasks.core.errors import InputError, PortqError, StoreError, TransientError, first_line
from portq.tasks.core.toolchain import toolchain, worker_name
from portq.tasks.execution.capture import captured
from portq.tasks.state import records as batches
from portq.tasks.state.store import Store, result_key

REPORT_FILE = "report.json"
LOG_FILE = "job.log"


def workdir_prefix(job_id: str) -> str:
    """A job's working folder (in the system temp dir) starts with this; `workdir_glob` finds leftovers."""
    return f"portq-job-{job_id}-"


def workdir_glob(job_id: str = "*") -> str:
    """Working folders of one job (or of all jobs) that a killed process could not remove."""
    return os.path.join(tempfile.gettempdir(), workdir_prefix(job_id) + "*")


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
    # Plain data only (numpy arrays, floats, dataclasses, dicts): evidence may cross a process boundary.
    precision: str = "fp32"  # inferred from the source's parameters
    user_samples: int = 0  # how many of `samples` are the user's own (the rest are seeded random draws)
    batch_size: int | None = None  # the size of the dynamic `batch` dim in samples[0], if there is one
    sweep: dict[int, Any] = field(default_factory=dict)  # batch size -> (inputs, source LatencyStats)
    memory: Any = None  # contract.Memory while timing the source
    environment: dict[str, Any] = field(default_factory=dict)
    export_index: int = 0  # the sample exporters trace with (dynamic dims at size 2 or more)


def run_job(spec: JobSpec, store: Store, *, worker: str | None = None, isolation: Any = None) -> JobReport:
    """Run (or reuse) one job and record its outcome. Idempotent: a finished job is not run twice.

    `isolation` (a `portq.tasks.execution.isolation.Isolation`) runs each format step; the default runs them here.
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
    with tempfile.TemporaryDirectory(prefix=workdir_prefix(spec.job_id)) as tmp:
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
    from portq.tasks.checks.parity import failure_summary

    return f"{a.format.value}: {failure_summary(a.parity)}"


def _relocate(a: ArtifactReport, store: Store, old: str, new: str) -> ArtifactReport:
    if a.path and a.path.startswith(store.url(old)):
        a.path = store.url(new) + a.path[len(store.url(old)):]
    if a.reproduce and a.reproduce.startswith(store.url(old)):
        a.reproduce = store.url(new) + a.reproduce[len(store.url(old)):]
    return a


def _fail(report: JobReport, e: PortqError) -> None:
    report.status = JobStatus.failed
    report.error = e.message
    report.failure = Failure(**e.to_dict())  # type: ignore[arg-type]


def _finish(store: Store, record: JobRecord, report: JobReport, result: str, *, cached: bool) -> None:
    record.status, record.error, record.result, record.cached = report.status, report.error, result, cached
    batches.write_record(store, record)


def _write_reports(workdir: Path, report: JobReport) -> None:
    from portq.tasks.reports.content import job_markdown
    from portq.tasks.reports.html import job_html

    (workdir / "report.md").write_text(job_markdown(report))
    (workdir / "report.html").write_text(job_html(report))
    (workdir / REPORT_FILE).write_text(report.model_dump_json(indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- the work


def _convert(spec: JobSpec, store: Store, workdir: Path, report: JobReport, final: str,
             isolation: Any = None) -> None:
    from portq.tasks.checks.runners import torch_device
    from portq.tasks.formats.reproduce import write_inputs
    from portq.tasks.sources.inputs import (
        InputSignature,
        apply_dynamic,
        check_dynamic_support,
        load_npz,
        resolve_signature,
    )
    from portq.tasks.sources.loading import LoadRequest, load_model

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
    check_dynamic_support(model.program, sig, display)
    report.inputs = sig.describe()
    evidence = _run_source(spec, model, sig, device, display)
    report.environment = evidence.environment
    # once per job, into the result folder: every format's reproduce script reads these samples (an isolated
    # step writes into its own folder, so a step must not write them)
    write_inputs(workdir, evidence.samples)
    if isolation is None:
        from portq.tasks.execution.isolation import InProcess

        isolation = InProcess()
    from portq.tasks.formats import FORMATS

    for fmt in spec.formats:
        reason = FORMATS.get(fmt.value).unsupported(spec.target)
        if reason:  # decided here: no child process, no model reload, for a format that cannot run
            report.artifacts.append(ArtifactReport(format=fmt, status=StepStatus.skipped, error=reason))
            continue
        # wrapped at the call site: the isolation may run the step in a child process (a crash costs one format)
        report.artifacts.append(isolation.run_format(_run_format, fmt, spec, model, evidence, workdir, store, final))
    from portq.tasks.reports.content import mark_best

    report.best = mark_best(report.artifacts)


def _run_source(spec: JobSpec, model: Any, sig: Any, device: str, display: str) -> SourceEvidence:
    from portq.tasks.checks.fingerprint import environment
    from portq.tasks.checks.latency import time_source
    from portq.tasks.checks.memory import MemoryProbe
    from portq.tasks.checks.runners import TorchRunner, call
    from portq.tasks.checks.tolerances import infer_precision
    from portq.tasks.sources.inputs import export_sample, export_sample_index, parity_samples

    samples = parity_samples(sig, spec.parity.random_samples, spec.parity.seed)
    export_index = export_sample_index(sig, samples)
    if export_index is None:  # every sample has a dynamic dim of size 1: export (and check) one more
        samples.append(export_sample(sig, spec.parity.seed))
        export_index = len(samples) - 1
    probe = MemoryProbe(device).start()
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
    env = environment(device)
    batch, latency, sweep = time_source(runner, sig, samples, spec.latency, seed=spec.parity.seed)
    probe.warm()
    memory = probe.stop()
    dynamic = {i: dict(s.dynamic) for i, s in enumerate(sig.specs) if s.dynamic}
    return SourceEvidence(device=device, samples=samples, reference=reference, latency=latency,
                          input_names=sig.names, output_names=[n for n, _ in reference[0]], dynamic=dynamic,
                          precision=infer_precision(model.module).value, user_samples=len(sig.samples),
                          batch_size=batch, sweep=sweep, memory=memory, environment=env,
                          export_index=export_index)


def _run_format(fmt: Format, spec: JobSpec, model: Any, ev: SourceEvidence, workdir: Path, store: Store,
                final: str) -> ArtifactReport:
    from portq.tasks.checks.latency import time_artifact
    from portq.tasks.checks.memory import MemoryProbe
    from portq.tasks.checks.parity import compare
    from portq.tasks.checks.runners import call, to_tensors
    from portq.tasks.formats import FORMATS, ExportRequest, attempt_reports
    from portq.tasks.formats.reproduce import write_for_artifact

    handler = FORMATS.get(fmt.value)
    step = f"export:{fmt.value}"
    artifact = ArtifactReport(format=fmt, status=StepStatus.failed)
    try:
        req = ExportRequest(model=model, args=to_tensors(ev.samples[ev.export_index], ev.device),
                            input_names=ev.input_names,
                            output_names=ev.output_names, dynamic=ev.dynamic, out_dir=workdir, device=ev.device,
                            opset=spec.opset, display=spec.source.name)
        try:
            result = handler.export(req)
        finally:
            artifact.attempts = attempt_reports(req)
        artifact.route, artifact.opset = result.route, result.opset
        precision = spec.tolerance.precision or (handler.precision if handler.precision != "fp32" else ev.precision)
        script = write_for_artifact(handler, result, req, spec, model, ev, store, precision)
        artifact.reproduce = store.url(f"{final}/{script.name}")
        artifact.path = store.url(f"{final}/{result.path.name}")
        artifact.size_bytes = result.path.stat().st_size
        step = f"session:{fmt.value}"
        probe = MemoryProbe(ev.device).start()
        start = time.perf_counter()
        runner = handler.open_runner(result.path, ev.device)
        load_ms = (time.perf_counter() - start) * 1e3
        step = f"parity:{fmt.value}"
        actual = [call(runner, s) for s in ev.samples]
        artifact.parity = compare(ev.reference, actual, spec.tolerance, seed=spec.parity.seed, device=ev.device,
                                  precision=precision, user_samples=ev.user_samples,
                                  sample_shapes=[[list(a.shape) for a in s] for s in ev.samples])
        step = f"latency:{fmt.value}"
        artifact.latency = time_artifact(runner, ev, spec.latency, probe=probe, load_ms=load_ms,
                                         host_copies=fmt is Format.onnx)
        if not artifact.parity.passed and spec.parity.localise:
            step = f"localise:{fmt.value}"
            from portq.tasks.checks.divergence import localise

            found = localise(fmt, model, result.path, runner, ev, artifact.parity, spec.tolerance)
            artifact.parity.first_divergence, artifact.parity.localisation = found
        artifact.status = StepStatus.succeeded
    except PortqError as e:
        artifact.error = e.at(step=step, file=spec.source.name).message
    except Exception as e:
        artifact.error = PortqError(f"{type(e).__name__}: {first_line(e)}", step=step, file=spec.source.name).message
    return artifact
