"""What a format step is: export routes tried in order (the fallback ladder), variants, options, and hooks.

A format registers a `FormatHandler` in `FORMATS`. Export tries the handler's routes in order and records
every attempt (route, error, seconds); when all fail, the error names the file, the format, each route
and the first unsupported operator or failed guard. Each route is a plain recipe from its format package's
`export` module (on the shared `portq.tasks.formats.recipes`), which the artifact's reproduce script runs the
same way.

Each format has its own registry of **variants** (`handler.variants`; `default` always exists) and an
options model (`handler.options`, pydantic): an artifact request `onnx.opset17` resolves to the variant
`opset17` of `onnx` with the options it fixes, validated by the format. Each variant carries a frozen, versioned
config (a dataclass in the style of torchao's configs) whose defaults are visible where it is registered: its
fields are what the variant's recipe reads, the artifact's report records it and the reproduce script runs with it.
Adding a variant is one entry in its format package's `variants` module. The format-specific parts of the job's
steps are hooks on the handler:
`opener` (a runtime from `portq.tasks.checks.runtimes`, which reproduce scripts call by name),
`open_runner` (portq's checked version of it), `localise` (first-divergence search), `unsupported`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

from portq.tasks.checks.runners import Runner
from portq.tasks.core.contract import DEFAULT_VARIANT, ArtifactRequest, Format, RouteAttemptReport, Target
from portq.tasks.core.errors import ConfigError, ConversionError, PortqError, validation_problems
from portq.tasks.core.registry import Registry
from portq.tasks.formats.diagnose import Blocker, blocker
from portq.tasks.formats.recipes import NotApplicable
from portq.tasks.sources.loading import LoadedModel
from pydantic import BaseModel, ConfigDict, ValidationError

#: (source, example inputs, path, opts) -> notes on what the route had to rewrite (None: nothing)
Recipe = Callable[[Any, tuple[Any, ...], str, dict[str, Any]], "list[str] | None"]


@dataclass
class RouteAttempt:
    route: str
    error: str | None = None
    seconds: float = 0.0
    applicable: bool = True
    operator: str | None = None


@dataclass
class ExportRequest:
    model: LoadedModel
    args: tuple[Any, ...]  # example inputs as torch tensors, on the export device
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[int, dict[int, str]]  # input position -> {axis: dim name}
    out_dir: Path
    device: str
    options: dict[str, Any] = field(default_factory=dict)  # the artifact's resolved format options
    display: str = ""
    attempts: list[RouteAttempt] = field(default_factory=list)  # filled in by FormatHandler.export

    def opts(self) -> dict[str, Any]:
        """What every recipe reads besides the source and the example inputs (JSON-able): the names, the
        dynamic dims, the device and the artifact's format options (ONNX's `opset`, ...)."""
        return {**self.options, "input_names": list(self.input_names), "output_names": list(self.output_names),
                "dynamic": {i: dict(axes) for i, axes in self.dynamic.items()}, "device": self.device}


@dataclass
class ExportResult:
    path: Path
    route: str
    opset: int | None = None
    data: list[Path] = field(default_factory=list)  # files the artifact needs beside it (ONNX external data)
    notes: list[str] = field(default_factory=list)  # what the route had to rewrite, for the artifact's report

    @property
    def size_bytes(self) -> int:
        """The artifact's true size: the file and the data files that belong to it."""
        return sum(p.stat().st_size for p in [self.path, *self.data])


@dataclass(frozen=True)
class Route:
    """One way to produce a format: a name (as reports show it), its recipe, and the plain modules besides the
    shared `recipes` and the recipe's own module that the recipe calls (its reproduce script carries them)."""

    name: str
    recipe: Recipe
    modules: tuple[ModuleType, ...] = ()


def _plain_result(req: ExportRequest, path: Path, route: str) -> ExportResult:
    return ExportResult(path=path, route=route)


class NoOptions(BaseModel):
    """A format without options of its own."""

    model_config = ConfigDict(extra="forbid")


#: An optimization recipe: (the base artifact's file, the output file, options) -> facts
Transform = Callable[[str, str, dict[str, Any]], dict[str, Any]]

#: what a variant's recipe may need besides its base file, which the step writes into the artifact's folder:
#: "samples" (the job's parity samples, with the tolerance; the fp16 repair), "calibration" (int8 static)
NEEDS = frozenset({"samples", "calibration"})


#: A variant's config: a frozen dataclass (torchao's style) declaring each setting as a field with its default, and
#: `version: ClassVar[int]`, bumped when a setting's meaning changes. Plain (no portq base class), so the module that
#: defines it can be copied into a reproduce script.
VariantConfig = Any


def config_options(config: VariantConfig | None) -> dict[str, Any]:
    """A config's settings as its recipe reads them (a None setting: the recipe's own choice, left out)."""
    if config is None:
        return {}
    return {f.name: getattr(config, f.name) for f in fields(config) if getattr(config, f.name) is not None}


def config_record(config: VariantConfig | None) -> dict[str, Any] | None:
    """A config as reports and reproduce scripts record it: its name, version and every setting."""
    if config is None:
        return None
    return {"config": type(config).__name__, "version": config.version, **asdict(config)}


@dataclass(frozen=True)
class Variant:
    """A named way to make an artifact of a format: the options it fixes (which a request may not override),
    and for an optimization, the base artifact it is made from and the plain recipe that makes it.

    `precision` is what the artifact computes in (None: as its source), which picks its parity tolerance;
    `candidate_for` are the targets where `--optimize auto` tries it; `auto_skip(target)` says why auto does
    not try it on this worker (asked for by name, it runs anyway); `repair` names the variant to try when
    this one fails parity. `config` holds the variant's settings: an optimization's recipe reads them; for an
    export setting (no `transform`), they are the format options it fixes (`fixed`).

    `routes` restricts the export to those routes of the format's ladder (a route variant: the export route as a
    dimension of the search), and `source_kinds` says which sources (`LoadedModel.kind`) auto tries it for (empty:
    any). `headroom` is how many times faster than its base the variant can plausibly run (measured on 2 CPU cores;
    docs/optimization.md): auto prunes the variant when its base's measured speedup times this cannot beat the source
    or the best so far (None: never pruned).
    """

    name: str
    description: str
    config: VariantConfig | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    transform: Transform | None = None
    recipe_modules: tuple[ModuleType, ...] = ()  # what a reproduce script carries to run `transform`
    precision: str | None = None
    candidate_for: frozenset[str] = frozenset()
    auto_skip: Callable[[str], str | None] = lambda target: None
    repair: str | None = None
    needs: frozenset[str] = frozenset()  # of NEEDS: what the step writes for the recipe besides its base file
    routes: tuple[str, ...] = ()
    source_kinds: frozenset[str] = frozenset()
    headroom: float | None = None

    def __post_init__(self) -> None:
        if self.config is not None and not isinstance(getattr(type(self.config), "version", None), int):
            raise ValueError(f"variant {self.name}: its config {type(self.config).__name__} declares no version")
        unknown = sorted(self.needs - NEEDS)
        if unknown:
            raise ValueError(f"variant {self.name}: unknown needs {unknown}; known: {', '.join(sorted(NEEDS))}")
        if self.config is not None and self.transform is None and not self.fixed and not self.routes:
            object.__setattr__(self, "fixed", config_options(self.config))

    @property
    def lossless(self) -> bool:
        return self.precision in (None, "fp32")


DEFAULT = Variant(DEFAULT_VARIANT, "the format's standard conversion")


@dataclass(frozen=True)
class ResolvedArtifact:
    """An artifact request checked against its format: the variant, and every option with its default."""

    request: ArtifactRequest
    variant: Variant
    options: dict[str, Any]

    @property
    def id(self) -> str:
        return self.request.id


#: Localisation hook: (source, artifact path, runner, evidence, parity, tolerance) -> (divergence, how)
Localiser = Callable[[Any, Path, Any, Any, Any, Any], tuple[Any, str]]


@dataclass
class FormatHandler:
    format: Format
    filename: str
    routes: list[Route]
    # (path, device, options) -> a runtime; a plain function of portq.tasks.checks.runtimes, which the
    # reproduce scripts call by its name
    opener: Callable[[str, str, dict[str, Any]], Runner]
    options: type[BaseModel] = NoOptions
    # Returns why this format cannot serve a target here (None when it can).
    unsupported: Callable[[Target], str | None] = lambda target: None
    precision: str = "fp32"
    # Turns a written file into the result (ONNX reads back its opset and stamps input names).
    finish: Callable[[ExportRequest, Path, str], ExportResult] = _plain_result
    # portq's way to open the artifact (checks the device before trusting numbers); default: `opener`
    checked_open: Callable[[str, str, dict[str, Any]], Runner] | None = None
    # first-divergence localisation when parity fails; None: the format keeps no intermediate values
    localise: Localiser | None = None
    # after an optimization recipe wrote `out` from `base`: carry over what the format stamps on its files,
    # and return the options to open it with (the recipe's facts may say how it must be opened)
    adopt: Callable[[Path, Path, dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    # the inputs an artifact file's graph takes (an exporter drops unused ones); None: all of the source's
    graph_inputs: Callable[[Path], set[str] | None] = lambda path: None
    # the opset an artifact file holds (ONNX), for the report; None: the format has none
    opset_of: Callable[[Path], int | None] = lambda path: None
    # whether latency counts the copies of inputs and outputs between host and device (a runtime on numpy arrays)
    host_copies: bool = False
    # once per process before the format's first export (the dynamo exporter's translation table, for ONNX)
    setup: Callable[[], None] = lambda: None
    # proves the runtime loads what a route wrote (raises ArtifactUnloadable): a route whose artifact does not load
    # is left like one that failed, and the next route is tried; None: the format's export is its own check
    verify: Callable[[ExportRequest, ExportResult], None] | None = None
    # targets where `--optimize auto` adds this format (its default artifact and its candidates) to a job that did
    # not ask for it: the formats a user can serve in place of the source model
    auto_for: frozenset[str] = frozenset()
    # how costly one artifact is to make, relative to the others: auto tries the formats it adds cheapest first
    search_cost: int = 1
    # whether the format can be made from a source of this kind (`LoadedModel.kind`); an ONNX file only becomes ONNX
    takes: Callable[[str], bool] = lambda kind: kind != "onnx"
    variants: Registry[Variant] = field(init=False)

    def __post_init__(self) -> None:
        self.variants = Registry(f"{self.format.value} variant")
        self.variants.add(DEFAULT_VARIANT, DEFAULT)

    def resolve(self, request: ArtifactRequest) -> ResolvedArtifact:
        """The request's variant and options, validated (ConfigError names the artifact and what is wrong)."""
        if request.format is not self.format:
            raise ConfigError(f"artifact {request.id} is not a {self.format.value} artifact", step="options")
        try:
            variant = self.variants.get(request.variant)
        except PortqError as e:
            raise ConfigError(f"artifact {request.id}: {e.cause}", step="options",
                              hint=f"ask for {self.format.value} or one of: "
                                   + ", ".join(f"{self.format.value}.{n}" for n in self.variants.names()
                                               if n != DEFAULT_VARIANT)) from None
        clash = {k: v for k, v in request.options.items() if k in variant.fixed and variant.fixed[k] != v}
        if clash:
            fixed = ", ".join(f"{k}={variant.fixed[k]!r}" for k in clash)
            raise ConfigError(f"artifact {request.id} fixes {fixed}; it cannot be given "
                              + ", ".join(f"{k}={v!r}" for k, v in clash.items()), step="options",
                              hint=f"drop the option, or ask for plain {self.format.value}")
        try:
            options = self.options.model_validate({**request.options, **variant.fixed}).model_dump(mode="json")
        except ValidationError as e:
            problems = validation_problems(e, prefix="option ")
            raise ConfigError(f"artifact {request.id}: {problems}", step="options") from None
        return ResolvedArtifact(request=request, variant=variant, options=options)

    def open_runner(self, path: Path | str, device: str, options: dict[str, Any] | None = None) -> Runner:
        """Open the artifact for parity and latency, with the runner options it was requested with."""
        opener = self.checked_open or self.opener
        return opener(str(path), device, options or {})

    def route(self, name: str) -> Route:
        for r in self.routes:
            if r.name == name:
                return r
        known = ", ".join(r.name for r in self.routes)
        raise KeyError(f"{self.format.value} has no route {name!r}; known: {known}")

    def export(self, req: ExportRequest, only: list[str] | None = None) -> ExportResult:
        """Try the routes in order (or just `only`), keep the first that writes an artifact."""
        attempts: list[RouteAttempt] = req.attempts
        attempts.clear()
        blockers: list[Blocker] = []
        path = req.out_dir / self.filename
        for route in [self.route(n) for n in only] if only else self.routes:
            start = time.perf_counter()
            try:
                with native_output_to_log(f"{self.format.value} route {route.name}"):
                    notes = route.recipe(req.model, req.args, str(path), req.opts())
                    result = self.finish(req, path, route.name)
                    result.notes = list(notes or [])
                    if self.verify is not None:
                        self.verify(req, result)
            except NotApplicable as e:
                attempts.append(RouteAttempt(route.name, f"not applicable: {e}", time.perf_counter() - start,
                                             applicable=False))
                continue
            except Exception as e:  # exporters raise anything; each failure is a data point, not a crash
                found = Blocker(e.cause, hint=e.hint) if isinstance(e, PortqError) else blocker(e)
                blockers.append(found)
                attempts.append(RouteAttempt(route.name, found.reason, time.perf_counter() - start,
                                             operator=found.operator))
                _log_failure(self.format.value, route.name, e)
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)  # a half-written file must not pass for an artifact
                continue
            attempts.append(RouteAttempt(route.name, None, time.perf_counter() - start))
            return result
        raise RoutesExhausted(self.format, req.display, attempts, blockers)


class ArtifactUnloadable(ConversionError):
    """A route wrote an artifact that its runtime refuses to load (an invalid graph): the route is left, and the
    next one tried."""


class RoutesExhausted(ConversionError):
    """Every route failed: one sentence naming the file, the format, each route and what stopped it."""

    def __init__(self, fmt: Format, display: str, attempts: list[RouteAttempt], blockers: list[Blocker]):
        self.attempts = attempts
        tried = [a for a in attempts if a.applicable]
        what = display or "the model"
        if not tried:
            cause = f"no {fmt.value} route applies to {what} (" + "; ".join(
                f"{a.route}: {a.error}" for a in attempts) + ")"
            super().__init__(cause, step=f"export:{fmt.value}", file=display)
            return
        routes = "; ".join(f"{a.route}: {a.error}" for a in tried)
        cause = f"could not convert {what} to {fmt.value}: tried {len(tried)} route(s) ({routes})"
        operator = next((b.operator for b in blockers if b.operator), None)
        if operator:
            hint = (f"{operator} is the first operator no route could convert: rewrite that part of the model "
                    f"with other ops, or pick another --format")
        else:
            hint = next((b.hint for b in blockers if b.hint), None) or "the job log has each route's full error"
        super().__init__(cause, step=f"export:{fmt.value}", file=display, hint=hint)


def _log_failure(fmt: str, route: str, e: BaseException) -> None:
    # stdout is the job log while a job runs (portq.tasks.execution.capture); the report keeps only the short reason
    import traceback

    print(f"[portq] {fmt} route {route} failed:\n{''.join(traceback.format_exception(e, limit=4))}")


@contextlib.contextmanager
def native_output_to_log(label: str) -> Iterator[None]:
    """Send what C++ code writes to file descriptors 1 and 2 (exporters dump whole graphs there) to the job log.

    The bytes are read back and printed through Python's sys.stdout, which the job's capture collects.
    """
    try:
        out_fd, err_fd = sys.__stdout__.fileno(), sys.__stderr__.fileno()  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # no real descriptors (embedded in something else)
        yield
        return
    with tempfile.TemporaryFile() as sink:
        for stream in (sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()  # type: ignore[union-attr]
        saved = os.dup(out_fd), os.dup(err_fd)
        os.dup2(sink.fileno(), out_fd)
        os.dup2(sink.fileno(), err_fd)
        try:
            yield
        finally:
            for stream in (sys.__stdout__, sys.__stderr__):
                with contextlib.suppress(Exception):
                    stream.flush()  # type: ignore[union-attr]
            os.dup2(saved[0], out_fd)
            os.dup2(saved[1], err_fd)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            if text.strip():
                print(f"[portq] native output during {label}:\n{text}")


def attempt_reports(req: ExportRequest) -> list[RouteAttemptReport]:
    """The request's route attempts as the report records them."""
    return [RouteAttemptReport(route=a.route, error=a.error, seconds=round(a.seconds, 3)) for a in req.attempts]


FORMATS: Registry[FormatHandler] = Registry("format")


def artifact_requests(ids: list[str], format_options: dict[str, dict[str, Any]],
                      step: str = "submit") -> list[ArtifactRequest]:
    """Artifact ids (a format, or `format.variant`) as requests, each checked against its format's registry of
    variants and options before anything is uploaded. `format_options` (format -> options; a None value: not
    given) apply to each request of that format whose variant does not fix them. Raises ConfigError."""
    requests = []
    for text in ids:
        try:
            request = ArtifactRequest.parse(text)
        except ValueError as e:
            raise ConfigError(str(e), step=step) from None
        handler = FORMATS.get(request.format.value)
        variant = handler.variants.get(request.variant) if request.variant in handler.variants else None
        flags = {k: v for k, v in format_options.get(request.format.value, {}).items()
                 if v is not None and not (variant and k in variant.fixed)}
        request = request.model_copy(update={"options": flags})
        handler.resolve(request)  # unknown variant or bad option: a ConfigError naming the known ones
        requests.append(request)
    return requests
