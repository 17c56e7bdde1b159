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
from functools import partial
from pathlib import Path
from typing import Any

from portq.tasks.checks.evidence import SourceEvidence
from portq.tasks.core.contract import (
    ArtifactReport,
    ArtifactRequest,
    JobSpec,
    OptimizationReport,
    Precision,
    StepStatus,
)
from portq.tasks.core.errors import PortqError, first_line
from portq.tasks.execution.timings import Stopwatch
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
    # not sent to a step's child process, which uses the source its job's source stage (or a previous step) built
    # there, else builds it again (`step_process._source`)
    source: LoadedModel | None = None
    base_file: Path | None = None  # for an optimization: its base artifact's file, when the job made it
    base_route: str | None = None  # ... and the export route that made it
    requested_by: str = "request"  # request | optimize | base of <id> | repair of <id>
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
    from portq.tasks.checks.runners import TorchRunner, call, to_tensors
    from portq.tasks.formats import FORMATS, ExportRequest, attempt_reports
    from portq.tasks.formats.reproduce import ScriptInputs, write_for_artifact

    assert ctx.source is not None, "the step's source model is built before the step runs"
    handler = FORMATS.get(ctx.request.format.value)
    handler.setup()
    ev, tolerance = ctx.evidence, ctx.spec.options.tolerance
    artifact = new_report(ctx.request, options=ctx.options)
    variant = handler.variants.get(ctx.request.variant)
    clock = Stopwatch()
    artifact.timings = clock.stages
    step = ctx.enter("export")
    try:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        req = ExportRequest(model=ctx.source, args=to_tensors(ev.export_sample, ev.device),
                            input_names=ev.input_names, output_names=ev.output_names, dynamic=ev.dynamic,
                            out_dir=ctx.out_dir, device=ev.device, options=ctx.options, display=ctx.display)
        precision = Precision(tolerance.precision or variant.precision
                              or (handler.precision if handler.precision != "fp32" else ev.precision))
        artifact.precision = precision
        transform = None
        if variant.transform is None:
            try:
                with clock.stage("export"):
                    result = handler.export(req, only=list(variant.routes) or None)  # a route variant: its routes
            finally:
                artifact.attempts = attempt_reports(req)
        else:
            step = ctx.enter("optimize")
            try:
                with clock.stage("optimize"):
                    made = optimize(ctx, handler, variant, req, precision)
            finally:
                artifact.attempts = attempt_reports(req)
            artifact.optimization = made.report
            if made.result is None:  # the recipe does not apply to this model: skipped, with the reason it gave
                artifact.status, artifact.error = StepStatus.skipped, made.skip
                import shutil

                shutil.rmtree(ctx.out_dir, ignore_errors=True)
                return artifact
            result, ctx.options, transform = made.result, made.options, (variant.transform, made.recipe_options)
            artifact.options = made.options
        artifact.route, artifact.opset, artifact.notes = result.route, result.opset, result.notes
        step = ctx.step("export")
        with clock.stage("script"):
            script = write_for_artifact(
                ScriptInputs(spec=ctx.spec, artifact_id=ctx.artifact_id, variant=variant, options=ctx.options,
                             evidence=ctx.evidence, source=ctx.source, store=ctx.store),
                handler, result, req, precision.value, transform=transform)
        artifact.reproduce = f"{ctx.artifact_id}/{script.name}"
        artifact.path = f"{ctx.artifact_id}/{result.path.name}"
        artifact.size_bytes = result.size_bytes
        artifact.data = [f"{ctx.artifact_id}/{p.name}" for p in result.data]
        step = ctx.enter("session")
        probe = MemoryProbe(ev.device).start()
        start = time.perf_counter()
        runner = handler.open_runner(result.path, ev.device, ctx.options)
        load_ms = (time.perf_counter() - start) * 1e3
        clock.add("session", load_ms / 1e3)
        step = ctx.enter("parity")
        with clock.stage("parity"):
            actual = [call(runner, s) for s in ev.samples]
            artifact.parity = compare(ev.reference, actual, tolerance, seed=ctx.spec.options.parity.seed,
                                      device=ev.device, precision=precision, user_samples=ev.user_samples,
                                      sample_shapes=ev.sample_shapes())
        step = ctx.enter("latency")
        with clock.stage("latency"):
            artifact.latency = time_artifact(runner, ev, ctx.spec.options.latency, probe=probe, load_ms=load_ms,
                                             host_copies=handler.host_copies,
                                             source=TorchRunner(ctx.source.module, ev.device),
                                             reopen=partial(handler.open_runner, result.path, ev.device, ctx.options),
                                             seed=ctx.spec.options.parity.seed)
        if not artifact.parity.passed and ctx.spec.options.parity.localise:
            step = ctx.enter("localise")
            with clock.stage("localise"):
                artifact.parity.first_divergence, artifact.parity.localisation = localise(
                    handler, ctx, result.path, runner, artifact)
        artifact.status = StepStatus.succeeded
    except PortqError as e:
        artifact.error = e.at(step=step, file=ctx.display).message
    except Exception as e:
        artifact.error = PortqError(f"{type(e).__name__}: {first_line(e)}", step=step, file=ctx.display).message
    if artifact.path is None:  # nothing to keep: no folder of leftovers in the results
        import shutil

        shutil.rmtree(ctx.out_dir, ignore_errors=True)
    return artifact


@dataclass
class Optimized:
    """What an optimization recipe made: the artifact (None when the recipe does not apply, with why), how it
    was made, and the options to open it with."""

    report: OptimizationReport
    options: dict[str, Any]
    result: Any = None  # ExportResult
    skip: str | None = None
    recipe_options: dict[str, Any] = field(default_factory=dict)


def optimize(ctx: StepContext, handler: Any, variant: Any, req: Any, precision: Precision) -> Optimized:
    """Make an optimization variant from its base artifact's file (exported again here when the job has none)
    with the variant's plain recipe."""
    import shutil

    from portq.tasks.formats import ExportResult
    from portq.tasks.formats.base import config_record
    from portq.tasks.formats.recipes import NotApplicable

    base_dir = ctx.out_dir / "base"
    base_dir.mkdir(exist_ok=True)
    if ctx.base_file is not None and ctx.base_file.exists():
        base = base_dir / ctx.base_file.name
        for f in ctx.base_file.parent.glob(ctx.base_file.name + "*"):  # the file and its external data
            shutil.copyfile(f, base_dir / f.name)
        route, opset = ctx.base_route or "", None
    else:  # exported again the way its base variant is (a route variant's routes)
        routes = handler.variants.get(variant.base).routes if variant.base else ()
        exported = handler.export(replace_out_dir(req, base_dir), only=list(routes) or None)
        base, route, opset = exported.path, exported.route, exported.opset
    report = OptimizationReport(transform=variant.transform.__name__, base=_base_id(ctx, variant),
                                lossless=variant.lossless)
    out = ctx.out_dir / handler.filename
    opts, notes = recipe_options(ctx, handler, variant, precision, base)
    try:
        try:
            facts = variant.transform(str(base), str(out), opts)
        except NotApplicable as e:
            return Optimized(report, ctx.options, skip=f"not applicable: {e}")
        config = config_record(variant.config)
        report.facts = {**_plain(facts), **({"notes": notes} if notes else {}),
                        **({"config": _plain(config)} if config else {})}
        options = handler.adopt(base, out, facts, ctx.options) if handler.adopt is not None else ctx.options
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    data = sorted(p for p in ctx.out_dir.iterdir() if p.name.startswith(out.name + "."))  # e.g. model.onnx.data
    result = ExportResult(path=out, route=route, opset=opset or handler.opset_of(out), data=data)
    return Optimized(report, options, result, recipe_options=opts)


def _base_id(ctx: StepContext, variant: Any) -> str:
    fmt = ctx.request.format.value
    return fmt if variant.base in (None, "default") else f"{fmt}.{variant.base}"


def replace_out_dir(req: Any, out_dir: Path) -> Any:
    from dataclasses import replace as dc_replace

    return dc_replace(req, out_dir=out_dir, attempts=req.attempts)


def recipe_options(ctx: StepContext, handler: Any, variant: Any, precision: Precision,
                   base: Path) -> tuple[dict[str, Any], list[str]]:
    """What the recipe reads: the artifact's options, the variant's config, the target, and what the variant needs
    (`variant.needs`) written as .npz files in the artifact's folder (so the reproduce script finds them too); and
    notes for the report."""
    from portq.tasks.formats.base import config_options

    notes: list[str] = []
    opts: dict[str, Any] = {**ctx.options, **config_options(variant.config), "target": ctx.spec.target.value}
    for need in sorted(variant.needs):
        opts.update(_NEEDS[need](ctx, handler, precision, base, notes))
    return opts, notes


def _parity_samples(ctx: StepContext, handler: Any, precision: Precision, base: Path,
                    notes: list[str]) -> dict[str, Any]:
    """The job's parity samples and the tolerance they are held to (a repair checks itself against them)."""
    from portq.tasks.checks.tolerances import resolve

    tol = resolve(ctx.spec.options.tolerance.model_copy(update={"outputs": {}}), precision, "")
    path = write_samples(ctx.out_dir / "samples.npz", ctx.evidence.samples, ctx.evidence.input_names,
                         handler.graph_inputs(base))
    return {"samples": str(path), "atol": tol.atol, "rtol": tol.rtol}


def _calibration(ctx: StepContext, handler: Any, precision: Precision, base: Path,
                 notes: list[str]) -> dict[str, Any]:
    """Calibration samples: the user's (--calibration), else the job's parity samples, with a note."""
    samples = calibration_samples(ctx)
    if samples is None:
        samples = list(ctx.evidence.samples)
        notes.append(f"calibrated on the job's own {len(samples)} parity samples (no --calibration given): "
                     "ranges from real data calibrate better")
    path = write_samples(ctx.out_dir / "calibration.npz", samples, ctx.evidence.input_names,
                         handler.graph_inputs(base))
    return {"calibration": str(path)}


#: how the step provides each of `portq.tasks.formats.base.NEEDS`
_NEEDS: dict[str, Callable[[StepContext, Any, Precision, Path, list[str]], dict[str, Any]]] = {
    "samples": _parity_samples, "calibration": _calibration}


def calibration_samples(ctx: StepContext) -> list[list[Any]] | None:
    """The user's calibration samples (--calibration), else None; checked against the inputs at job start."""
    from portq.tasks.sources.calibration import read_calibration
    from portq.tasks.sources.inputs import InputSignature

    refs = ctx.spec.options.optimize.calibration if ctx.spec.options.optimize else []
    if not refs:
        return None
    return read_calibration(refs, ctx.store, InputSignature(specs=ctx.evidence.input_specs))


def write_samples(path: Path, samples: list[list[Any]], names: list[str], kept: set[str] | None) -> Path:
    """Samples in the recipes' layout (s<i>_<j> and input_names), keeping only the inputs in `kept` (the inputs the
    base file's graph takes, as its format reads them: an exporter drops unused inputs; None: all)."""
    import numpy as np

    index = [j for j, n in enumerate(names) if kept is None or n in kept]
    arrays = {f"s{i}_{k}": sample[j] for i, sample in enumerate(samples) for k, j in enumerate(index)}
    np.savez(path, input_names=np.array([names[j] for j in index]), **arrays)  # type: ignore[arg-type]
    return path


def _plain(facts: dict[str, Any]) -> dict[str, Any]:
    """Facts as JSON can hold them (recipes return plain values; anything else becomes its text)."""
    import json

    return json.loads(json.dumps(facts, default=str))


def localise(handler: Any, ctx: StepContext, path: Path, runner: Any, artifact: ArtifactReport) -> tuple[Any, str]:
    """The format's localisation hook, or why the format cannot be localised."""
    from portq.tasks.formats import FORMATS

    assert artifact.parity is not None
    if handler.localise is None:
        covered = ", ".join(name for name, h in FORMATS if h.localise is not None)
        return None, (f"not localised: {handler.format.value} artifacts expose no intermediate values "
                      f"(localisation covers {covered})")
    return handler.localise(ctx.source, path, runner, ctx.evidence, artifact.parity, ctx.spec.options.tolerance)
