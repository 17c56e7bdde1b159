"""`portq submit`: one job per model file, onto the queue or run here; `--wait` follows the batch.

Parsing, printing and exit codes only: the work is `portq.client.api.submit`, the same function `import portq`
offers, so the command and the Python API take one path.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from portq.client import api
from portq.client.cli import BrokerOpt, StoreOpt, app, err, error, out
from portq.client.render import ProgressView, summary_table
from portq.tasks.core.contract import BatchReport, Precision, Target, ToleranceMode
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.settings import Settings
from portq.tasks.state.store import Store
from portq.tasks.state.submission import Submission


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
    with ProgressView(err) as view:
        report = api.submit(
            models, target=target, formats=formats or ["onnx"], batch=batch, wait=wait, timeout=timeout,
            inputs=inputs or [], dynamic=dynamic or [], atol=atol, rtol=rtol,
            tolerance_mode=tolerance_mode, quantile=quantile, precision=precision,
            output_tol=_output_tolerances(output_tol or []), localise=localise, opset=opset, seed=seed, runs=runs,
            warmup=warmup, batch_sizes=_batch_sizes(batch_sizes), arch=arch,
            arch_kwargs=_json_object(arch_kwargs, "--arch-kwargs"), trust_pickle=trust_pickle, force=force,
            broker=broker, store=store, progress=view, on_submitted=_submitted, on_started=_started)
    if not all(job.status.finished for job in report.jobs):
        return  # queued, and not followed (no --wait)
    raise typer.Exit(finish(report))


def _submitted(sub: Submission, settings: Settings, st: Store) -> None:
    out.print(f"batch {sub.batch}")
    for rec in sub.rejected:
        error(rec.error or "")


def _started(sub: Submission, settings: Settings, st: Store) -> None:
    if settings.embedded:
        err.print(f"running {len(sub.specs)} job(s) here (no broker configured); store: {st.root}")
    else:
        err.print(f"queued {len(sub.specs)} job(s) on {settings.broker_display}; store: {st.root}")


def finish(report: BatchReport) -> int:
    """Print the batch's summary and where its reports are; 1 if any job failed."""
    out.print(summary_table(report))
    pages = api.summary_pages(report.batch, store=report.store)
    err.print(f"reports: summary page {pages['html']} (Markdown: {pages['md']}); each job's report.html and "
              f"report.md are in its result folder, linked from the summary page")
    err.print(f"summary page elsewhere: portq report {report.batch} --format html -o summary.html")
    failed = report.counts.get("failed", 0)
    if failed:
        err.print(f"[bold red]{failed} of {report.counts['total']} job(s) failed[/]: `portq report {report.batch}` "
                  "for details")
        return 1
    return 0


def see_through(batch: str, timeout: float = 0, store: str | None = None) -> int:
    """Follow the batch to its end (at once when it has already finished), print its summary; 1 if a job failed."""
    with ProgressView(err) as view:
        report = api.wait(batch, timeout=timeout, store=store, progress=view)
    return finish(report)
