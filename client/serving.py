"""`portq package` and `portq verify`: a batch's artifacts into a Triton model repository, and their files checked
against their provenance records (no broker needed)."""

from __future__ import annotations

from typing import Annotated

import typer
from portq.client import api
from portq.client.console import err
from portq.client.options import StoreOpt, takes
from portq.tasks.core.requests import PackageRequest
from rich.markup import escape


@takes(PackageRequest, step="package")
def package(
    batch: Annotated[str, typer.Argument(help="Batch id, as printed by `portq submit`.")],
    store: StoreOpt = None,
    *,
    request: PackageRequest,
) -> None:
    """Write one Triton model per succeeded job (config.pbtxt, 1/model.onnx or 1/model.pt, README.md, the
    provenance record). Failed jobs are skipped and named; exit 1 if none is packaged (nothing is written then)."""
    done = api.package(batch, request, store=store)
    for label, why in done.skipped:
        err.print(escape(f"skipped {label}: {why}"))
    if not done.models:
        err.print(escape(f"[error] nothing packaged from batch {batch}: no job has a servable artifact; "
                         f"{request.triton} was not written"))
        raise typer.Exit(1)
    for model in done.models:  # plain lines (Rich would wrap a long path): one per model, for scripts
        typer.echo(f"{model.name}: {model.model} {model.artifact} ({model.platform}) -> {model.folder}")
    err.print(escape(f"packaged {len(done.models)} model(s) into {done.directory}; check them with "
                     f"`portq verify {done.directory}`"))


def verify(
    target: Annotated[str, typer.Argument(help="A batch id, a result folder, a packaged Triton repository, a "
                                               "store URL, or a file (a provenance record or an artifact file).")],
    store: StoreOpt = None,
) -> None:
    """Recompute the sha256 of every file the provenance records in scope name. Exit 0 only when every file
    matches; each changed or missing file is named on its own line, and the exit code is 1."""
    result = api.verify(target, store=store)
    for problem in result.problems:  # plain lines (Rich would wrap a long URL): one per file, for scripts
        typer.echo(problem.line())
    if not result.ok:
        err.print(escape(f"[error] {len(result.problems)} problem(s) in {len(result.records)} provenance "
                         f"record(s) checked"))
        raise typer.Exit(1)
    err.print(escape(f"verified {len(result.files)} file(s) against {len(result.records)} provenance record(s)"))
