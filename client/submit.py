"""`portq submit`: one job per model file, onto the queue or run here; `--wait` follows the batch."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from portq.client.cli import BrokerOpt, StoreOpt, app, err, error, out, resolve
from portq.client.render import summary_table
from portq.tasks import batches
from portq.tasks.contract import Format, InputSpec, JobRecord, Target
from portq.tasks.errors import ConfigError
from portq.tasks.store import Store
from portq.tasks.submission import prepare


def _parse_inputs(specs: list[str]) -> list[InputSpec]:
    parsed = []
    for text in specs:
        try:
            parsed.append(InputSpec.parse(text))
        except ValueError as e:
            raise ConfigError(str(e), step="submit") from None
    return parsed


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
    formats: Annotated[list[Format] | None, typer.Option("--format", "-f", help="Artifact format; repeat for "
                                                             "several. [default: onnx]")] = None,
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
    atol: Annotated[float | None, typer.Option(help="Parity: absolute tolerance. [default: 1e-4]")] = None,
    rtol: Annotated[float | None, typer.Option(help="Parity: relative tolerance. [default: 1e-3]")] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset. [default: 18]")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random parity inputs.")] = 0,
    runs: Annotated[int | None, typer.Option(help="Timed latency runs per model and artifact.")] = None,
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
        "target": target, "formats": formats or [Format.onnx], "inputs": _parse_inputs(inputs or []),
        "dynamic": dynamic or [], "opset": opset, "arch": arch,
        "arch_kwargs": _json_object(arch_kwargs, "--arch-kwargs"),
        "trust_pickle": trust_pickle, "force": force, "parity": {"seed": seed},
    }
    tol = {k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None}
    if tol:
        options["tolerance"] = tol
    if runs is not None:
        options["latency"] = {"runs": runs}
    st = Store(settings.store)
    try:
        sub = prepare(models, st, batch=batch, options=options, max_bytes=settings.max_model_bytes,
                      max_sample_bytes=settings.max_sample_bytes)
    except ValueError as e:  # pydantic validation of the options
        raise ConfigError(str(e), step="submit") from None
    out.print(f"batch {sub.batch}")
    for rec in sub.rejected:
        error(rec.error or "")
    if settings.embedded:
        err.print(f"running {len(sub.specs)} job(s) here (no broker configured); store: {st.root}")
        _run_embedded(sub.specs, st, settings)
        wait = True
    else:
        from portq.client.dispatch import enqueue

        enqueue(sub.specs, settings, st)
        err.print(f"queued {len(sub.specs)} job(s) on {settings.broker_display}; store: {st.root}")
    if not wait:
        return
    if not settings.embedded:
        follow(st, sub.batch, timeout=timeout)
    raise typer.Exit(finish(st, sub.batch))


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
        while True:
            records = batches.list_records(st, batch)
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


def finish(st: Store, batch: str) -> int:
    """Print the batch summary; 1 if any job failed."""
    report = batches.batch_report(st, batch)
    out.print(summary_table(report))
    failed = report.counts.get("failed", 0)
    if failed:
        total = report.counts["total"]
        err.print(f"[bold red]{failed} of {total} job(s) failed[/]: `portq report {batch}` for details")
        return 1
    return 0

