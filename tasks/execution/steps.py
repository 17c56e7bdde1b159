"""One artifact's step: export it, write its reproduce script, then parity, latency and (on failure)
localisation. What the step needs travels in one typed `StepContext`; the format-specific parts are
hooks on the format's handler (`portq.tasks.formats.base.FormatHandler`).

A step never raises for its own failure: the `ArtifactReport` it returns says which step failed and why,
so one artifact's failure costs only that artifact. The isolation (`portq.tasks.execution.isolation`)
may run it in a child process, which builds the source again through the job's source builder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from portq.tasks.checks.evidence import SourceEvidence
from portq.tasks.core.contract import ArtifactReport, ArtifactRequest, JobSpec, Precision, StepStatus
from portq.tasks.core.errors import PortqError, first_line
from portq.tasks.sources.loading import LoadedModel
from portq.tasks.state.store import Store


@dataclass
class StepContext:
    """Everything one artifact's step needs."""

    spec: JobSpec
    request: ArtifactRequest
    options: dict[str, Any]  # the request's options, resolved by its format (defaults filled in)
    evidence: SourceEvidence
    out_dir: Path  # the artifact's own folder, where the step writes its files
    store: Store
    source: LoadedModel | None = None  # not sent to a step's child process: it builds the source again
    # told the step's name (`parity:onnx`) whenever the step moves on: the job's record (progress displays read
    # it), or, in a step's child process, the parent; not sent to a child process
    on_phase: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    @property
    def artifact_id(self) -> str:
        return self.request.id

    @property
    def display(self) -> str:
        return self.spec.display

    def step(self, phase: str) -> str:
        """The step name errors carry: `export:onnx`, `parity:onnx.opset17`, ..."""
        return f"{phase}:{self.artifact_id}"

    def enter(self, phase: str) -> str:
        """The step name for `phase`, after telling whoever follows the step that it has begun."""
        step = self.step(phase)
        if self.on_phase is not None:
            self.on_phase(step)
        return step

    def without_source(self, out_dir: Path) -> StepContext:
        """What a step's child process receives: everything but the loaded model (and the parent's progress
        callback), writing into `out_dir`."""
        return replace(self, source=None, out_dir=out_dir, on_phase=None)


def new_report(request: ArtifactRequest, status: StepStatus = StepStatus.failed, error: str | None = None,
               options: dict[str, Any] | None = None) -> ArtifactReport:
    return ArtifactReport(id=request.id, format=request.format, variant=request.variant,
                          options=options if options is not None else dict(request.options), status=status,
                          error=error)


def run_artifact(ctx: StepContext) -> ArtifactReport:
    """Export, reproduce script, parity, latency, localisation: the artifact's report, failed or not."""
    from portq.tasks.checks.latency import time_artifact
    from portq.tasks.checks.memory import MemoryProbe
    from portq.tasks.checks.parity import compare
    from portq.tasks.checks.runners import call, to_tensors
    from portq.tasks.formats import FORMATS, ExportRequest, attempt_reports
    from portq.tasks.formats.reproduce import write_for_artifact

    assert ctx.source is not None, "the step's source model is built before the step runs"
    handler = FORMATS.get(ctx.request.format.value)
    ev, tolerance = ctx.evidence, ctx.spec.options.tolerance
    artifact = new_report(ctx.request, options=ctx.options)
    step = ctx.enter("export")
    try:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        req = ExportRequest(model=ctx.source, args=to_tensors(ev.export_sample, ev.device),
                            input_names=ev.input_names, output_names=ev.output_names, dynamic=ev.dynamic,
                            out_dir=ctx.out_dir, device=ev.device, options=ctx.options, display=ctx.display)
        try:
            result = handler.export(req)
        finally:
            artifact.attempts = attempt_reports(req)
        artifact.route, artifact.opset, artifact.notes = result.route, result.opset, result.notes
        precision = Precision(tolerance.precision or (handler.precision if handler.precision != "fp32"
                                                      else ev.precision))
        artifact.precision = precision
        script = write_for_artifact(ctx, handler, result, req, precision.value)
        artifact.reproduce = f"{ctx.artifact_id}/{script.name}"
        artifact.path = f"{ctx.artifact_id}/{result.path.name}"
        artifact.size_bytes = result.path.stat().st_size
        step = ctx.enter("session")
        probe = MemoryProbe(ev.device).start()
        start = time.perf_counter()
        runner = handler.open_runner(result.path, ev.device, ctx.options)
        load_ms = (time.perf_counter() - start) * 1e3
        step = ctx.enter("parity")
        actual = [call(runner, s) for s in ev.samples]
        artifact.parity = compare(ev.reference, actual, tolerance, seed=ctx.spec.options.parity.seed,
                                  device=ev.device, precision=precision, user_samples=ev.user_samples,
                                  sample_shapes=ev.sample_shapes())
        step = ctx.enter("latency")
        artifact.latency = time_artifact(runner, ev, ctx.spec.options.latency, probe=probe, load_ms=load_ms,
                                         host_copies=handler.format.value == "onnx")
        if not artifact.parity.passed and ctx.spec.options.parity.localise:
            step = ctx.enter("localise")
            artifact.parity.first_divergence, artifact.parity.localisation = localise(
                handler, ctx, result.path, runner, artifact)
        artifact.status = StepStatus.succeeded
    except PortqError as e:
        artifact.error = e.at(step=step, file=ctx.display).message
    except Exception as e:
        artifact.error = PortqError(f"{type(e).__name__}: {first_line(e)}", step=step, file=ctx.display).message
    return artifact


def localise(handler: Any, ctx: StepContext, path: Path, runner: Any, artifact: ArtifactReport) -> tuple[Any, str]:
    """The format's localisation hook, or why the format cannot be localised."""
    from portq.tasks.formats import FORMATS

    assert artifact.parity is not None
    if handler.localise is None:
        covered = ", ".join(name for name, h in FORMATS if h.localise is not None)
        return None, (f"not localised: {handler.format.value} artifacts expose no intermediate values "
                      f"(localisation covers {covered})")
    return handler.localise(ctx.source, path, runner, ctx.evidence, artifact.parity, ctx.spec.options.tolerance)
