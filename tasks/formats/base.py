"""What a format step is: export routes tried in order, and a way to run the artifact.

A format registers a `FormatHandler` in `FORMATS`. Export tries the handler's routes in order (the
fallback ladder) and records every attempt; when all fail, the error names each route and its cause.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portq.tasks.contract import Format, Target
from portq.tasks.errors import ConversionError, PortqError, first_line
from portq.tasks.loading import LoadedModel
from portq.tasks.registry import Registry
from portq.tasks.runners import Runner


@dataclass
class ExportRequest:
    model: LoadedModel
    args: tuple[Any, ...]  # example inputs as torch tensors, on the export device
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[int, dict[int, str]]  # input position -> {axis: dim name}
    out_dir: Path
    device: str
    opset: int | None = None
    display: str = ""


@dataclass
class RouteAttempt:
    route: str
    error: str | None = None
    seconds: float = 0.0


@dataclass
class ExportResult:
    path: Path
    route: str
    opset: int | None = None
    attempts: list[RouteAttempt] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class RouteNotApplicable(Exception):
    """A route that does not apply to this kind of source model (skipped, not counted as a failure)."""


Route = Callable[[ExportRequest], ExportResult]


@dataclass
class FormatHandler:
    format: Format
    filename: str
    routes: list[tuple[str, Route]]
    open_runner: Callable[[Path, str], Runner]
    # Returns why this format cannot serve a target here (None when it can).
    unsupported: Callable[[Target], str | None] = lambda target: None
    precision: str = "fp32"

    def export(self, req: ExportRequest) -> ExportResult:
        import time

        attempts: list[RouteAttempt] = []
        for name, route in self.routes:
            start = time.perf_counter()
            try:
                result = route(req)
            except RouteNotApplicable as e:
                attempts.append(RouteAttempt(name, f"not applicable: {e}", time.perf_counter() - start))
                continue
            except PortqError as e:
                attempts.append(RouteAttempt(name, e.cause, time.perf_counter() - start))
                continue
            except Exception as e:  # exporters raise anything; each failure is a data point, not a crash
                attempts.append(RouteAttempt(name, f"{type(e).__name__}: {first_line(e)}", time.perf_counter() - start))
                continue
            attempts.append(RouteAttempt(name, None, time.perf_counter() - start))
            result.attempts = attempts
            return result
        tried = "; ".join(f"{a.route}: {a.error}" for a in attempts) or "no route applies"
        raise ConversionError(
            f"could not convert {req.display or 'the model'} to {self.format.value}: every route failed ({tried})",
            step=f"export:{self.format.value}",
            file=req.display,
            hint="the first unsupported operator is named above; rewrite it, or pick another --format",
        )


FORMATS: Registry[FormatHandler] = Registry("format")
