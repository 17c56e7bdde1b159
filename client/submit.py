"""`portq submit`: one job per model file, onto the queue or run here; `--wait` follows the batch."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from portq.client.cli import BrokerOpt, StoreOpt, app, err, error, out, resolve
from portq.client.render import summary_table
from portq.tasks.core.contract import ArtifactRequest, InputSpec, JobRecord, Precision, Target, ToleranceMode
from portq.tasks.core.errors import ConfigError
from portq.tasks.state import records as batches
from portq.tasks.state.store import Store
from portq.tasks.state.submission import prepare
from pydantic import ValidationError


def _parse_inputs(specs: list[str]) -> list[InputSpec]:
    parsed = []
    for text in specs:
        try:
            parsed.append(InputSpec.parse(text))
        except ValueError as e:
            raise ConfigError(str(e), step="submit") from None
    return parsed


def _output_tolerances(specs: list[str]) -> dict[str, dict[str, Any]]:
    """`--output-tol 'NAME:atol=1e-3,rtol=1e-2,mode=max'` (NAME may be an fnmatch pattern) -> overrides."""
    keys = {"atol": float, "rtol": float, "quantile": float, "mode": str}
    overrides: dict[str, dict[str, Any]] = {}
    for text in specs:
        name, sep, rest = text.partition(":")
        fields: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or key not in keys:
                raise ConfigError(f"--output-tol {text!r}: {part!r} is not KEY=VALUE with KEY one of "
                                  f"{', '.join(keys)}", step="submit")
            try:
                fields[key] = keys[key](value.strip())
            except ValueError:
                raise ConfigError(f"--output-tol {text!r}: {key} needs a number, not {value!r}",
                                  step="submit") from None
        if not sep or not name.strip() or not fields:
            raise ConfigError(f"--output-tol {text!r} is not of the form NAME:atol=..,rtol=..,mode=..,quantile=..",
                              step="submit")
        overrides[name.strip()] = fields
    return overrides


def artifact_requests(ids: list[str], format_options: dict[str, dict[str, Any]]) -> list[ArtifactRequest]:
    """`--format` values (a format, or `format.variant`) as artifact requests, each checked against its format's
    registry of variants and options before anything is uploaded. `format_options` are flags such as --opset
    (None: not given); they apply to each request of that format whose variant does not fix them."""
    from portq.tasks.formats import FORMATS

    requests = []
    for text in ids:
        try:
            request = ArtifactRequest.parse(text)
        except ValueError as e:
            raise ConfigError(str(e), step="submit") from None
        handler = FORMATS.get(request.format.value)
        variant = handler.variants.get(request.variant) if request.variant in handler.variants else None
        flags = {k: v for k, v in format_options.get(request.format.value, {}).items()
                 if v is not None and not (variant and k in variant.fixed)}
        request = request.model_copy(update={"options": flags})
        handler.resolve(request)  # unknown variant or bad option: a ConfigError naming the known ones
        requests.append(request)
    return requests


def validation_problems(e: ValidationError) -> str:
    """pydantic's errors as one line of portq's: where, and what is wrong (no documentation URLs)."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in e.errors())


def _batch_sizes(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes {text!r} is not a comma-separated list of integers, e.g. 1,8,32",
                          step="submit") from None


def _json_object(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{flag} is not valid JSON: {e}", step="submit") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object", step="submit")
    return value


@app.command()
def submit(
    models: Annotated[list[str], typer.Argument(help="Model files: TorchScript archives, .pt2 ExportedPrograms, "
                                                     "state dicts or safetensors (with --arch).")],
    target: Annotated[Target, typer.Option(help="Serving device: cpu routes to the `cpu` queue, cuda to `gpu`.")]
    = Target.cpu,
    formats: Annotated[list[str] | None, typer.Option("--format", "-f", help="Artifact to produce: a format "
                                                       "(onnx, torchscript, pt2, aoti) or a variant of one by its id "
                                                       "(onnx.opset17); repeat for several. [default: onnx]")]
    = None,
    batch: Annotated[str | None, typer.Option(help="Batch name (a fresh id otherwise).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the batch with a progress bar; exit 1 if a job "
                                                      "failed.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds (exit 3).")] = 0,
    inputs: Annotated[list[str] | None, typer.Option("--input", "-i", help="Input spec "
                      "'name:dtype[d0,d1]' (integers need a range: 'ids:int64[2,16]{0,30000}'); repeat in "
                      "forward-argument order. Default: a sidecar <stem>.npz, or a .pt2's own example inputs.")]
    = None,
    dynamic: Annotated[list[str] | None, typer.Option("--dynamic", help="Export this dim as dynamic, e.g. "
                                                                            "'batch'; repeatable.")] = None,
    atol: Annotated[float | None, typer.Option(help="Parity: absolute tolerance. [default: 1e-4 for fp32]")]
    = None,
    rtol: Annotated[float | None, typer.Option(help="Parity: relative tolerance. [default: 1e-3 for fp32]")]
    = None,
    tolerance_mode: Annotated[ToleranceMode | None, typer.Option(
        help="Parity check: elementwise (an element fails when it exceeds atol and rtol), or the max, mean, "
             "median or quantile of the errors. [default: the precision's, see README]")] = None,
    quantile: Annotated[float | None, typer.Option(help="q for --tolerance-mode quantile. [default: 0.99]")]
    = None,
    precision: Annotated[Precision | None, typer.Option(help="Precision whose default tolerances apply. "
                                                             "[default: inferred from the model's weights]")]
    = None,
    output_tol: Annotated[list[str] | None, typer.Option("--output-tol", help="Per-output tolerance "
                          "'NAME:atol=1e-3,rtol=1e-2,mode=max' (NAME may be a pattern such as 'output.*'); "
                          "repeatable.")] = None,
    localise: Annotated[bool, typer.Option("--localise/--no-localise", help="When parity fails, find the first "
                                                                            "operator that diverges.")] = True,
    opset: Annotated[int | None, typer.Option(help="ONNX opset. [default: 18]")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random parity inputs.")] = 0,
    runs: Annotated[int | None, typer.Option(help="Latency: timed runs at least, per model and artifact. "
                                                  "[default: 30]")] = None,
    warmup: Annotated[int | None, typer.Option(help="Latency: warm-up runs before timing. [default: 5]")] = None,
    batch_sizes: Annotated[str | None, typer.Option(help="Latency: batch sizes to sweep when the batch dim is "
                                                         "dynamic, e.g. 1,8,32. [default: 1, the sample's, 8]")]
    = None,
    arch: Annotated[str | None, typer.Option(help="Model code for state dicts: package.module:Class.")] = None,
    arch_kwargs: Annotated[str | None, typer.Option(help="JSON keyword arguments for --arch.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow full unpickling of torch.save files "
                                                                      "(runs code from the file).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Convert again even if an identical job is cached.")]
    = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
) -> None:
    """Enqueue one conversion job per model file (or run them here when no broker is configured)."""
    settings = resolve(broker, store)
    options: dict[str, Any] = {
        "target": target, "artifacts": artifact_requests(formats or ["onnx"], {"onnx": {"opset": opset}}),
        "inputs": _parse_inputs(inputs or []), "dynamic": dynamic or [],
        "parity": {"seed": seed, "localise": localise},
    }
    load = {"arch": arch, "arch_kwargs": _json_object(arch_kwargs, "--arch-kwargs"), "trust_pickle": trust_pickle}
    tol: dict[str, Any] = {k: v for k, v in (("atol", atol), ("rtol", rtol), ("mode", tolerance_mode),
                                             ("quantile", quantile), ("precision", precision)) if v is not None}
    if output_tol:
        tol["outputs"] = _output_tolerances(output_tol)
    if tol:
        options["tolerance"] = tol
    latency: dict[str, Any] = {k: v for k, v in (("runs", runs), ("warmup", warmup)) if v is not None}
    if batch_sizes:
        latency["batch_sizes"] = _batch_sizes(batch_sizes)
    if latency:
        options["latency"] = latency
    st = Store(settings.store)
    st.check()  # unreachable, missing bucket, no credentials, read-only: said now, naming the store
    try:
        sub = prepare(models, st, batch=batch, options=options, load=load, force=force,
                      max_bytes=settings.max_model_bytes, max_sample_bytes=settings.max_sample_bytes)
    except ValidationError as e:  # pydantic validation of the options
        raise ConfigError(validation_problems(e), step="submit") from None
    out.print(f"batch {sub.batch}")
    for rec in sub.rejected:
        error(rec.error or "")
    if settings.embedded:
        err.print(f"running {len(sub.specs)} job(s) here (no broker configured); store: {st.display}")
        _run_embedded(sub.specs, st, settings)
        wait = True
    else:
        from portq.client.dispatch import enqueue

        enqueue(sub.specs, settings, st)
        err.print(f"queued {len(sub.specs)} job(s) on {settings.broker_display}; store: {st.display}")
    if not wait:
        return
    raise typer.Exit(see_through(st, sub.batch, timeout))


def _run_embedded(specs: list[Any], st: Store, settings: Any) -> None:
    from portq.client.dispatch import run_here
    from rich.progress import Progress

    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("converting", total=len(specs))
        run_here(specs, st, settings, on_done=lambda report: progress.advance(task))


def follow(st: Store, batch: str, timeout: float = 0, poll: float = 0.5) -> list[JobRecord]:
    """Poll the batch's records in the store until every job has finished (works across client restarts)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(f"batch {batch}", total=None)
        reader = batches.RecordReader(st, batch)  # each poll fetches only the records that changed
        while True:
            records = reader.read()
            done = sum(r.status.finished for r in records)
            failed = sum(r.status.value == "failed" for r in records)
            progress.update(task, total=len(records), completed=done,
                            description=f"batch {batch}" + (f" ([red]{failed} failed[/])" if failed else ""))
            if records and done == len(records):
                return records
            if timeout and time.monotonic() - start > timeout:
                err.print(f"[yellow]timed out after {timeout:g}s; {len(records) - done} job(s) still unfinished[/]")
                raise typer.Exit(3)
            time.sleep(poll)


def see_through(st: Store, batch: str, timeout: float = 0) -> int:
    """Follow the batch to its end (at once when it has already finished), print its summary; 1 if a job failed."""
    records = follow(st, batch, timeout=timeout)
    return finish(st, batch, records)


def finish(st: Store, batch: str, records: list[JobRecord] | None = None) -> int:
    """Print the batch summary; 1 if any job failed."""
    report = batches.batch_report(st, batch, records)
    out.print(summary_table(report))
    failed = report.counts.get("failed", 0)
    if failed:
        total = report.counts["total"]
        err.print(f"[bold red]{failed} of {total} job(s) failed[/]: `portq report {batch}` for details")
        return 1
    return 0

