"""Which artifacts a job makes: the requested ones, the optimization candidates `--optimize` adds, and
the bases those are made from, in an order where every base comes before the variants made from it.

`--optimize auto` searches what the user could serve instead of the source model on the job's target: every
format that runs there (`FormatHandler.auto_for`: ONNX, TorchScript, AOTInductor), whether the job asked for it
or not, since the user asked for the fastest artifact; each with its default artifact and every variant registered
as a candidate for the target (the lossless ones always, the lossy ones (fp16, bf16, int8) only for the precisions
the user allows, `--precision`), and the route variants that apply to the source's kind (`Variant.source_kinds`:
the export route as a dimension, e.g. a TorchScript source's `onnx.ts2ep`). A format that cannot be made from the
source (an ONNX file only becomes ONNX) is left out. A candidate that cannot run here is planned as skipped with
its reason (AOTInductor without a C++ compiler), so the report says what was not tried and why; one whose family
cannot win is pruned while the job runs (`portq.tasks.formats.search`). Named candidates (`--optimize ort-all`)
are tried for the requested formats only. Decided on the worker, which knows its hardware and the source.
"""

from __future__ import annotations

from dataclasses import dataclass

from portq.tasks.core.contract import DEFAULT_VARIANT, ArtifactRequest, Format, JobOptions, OptimizeOptions
from portq.tasks.core.errors import ConfigError
from portq.tasks.formats.base import FORMATS, Variant

AUTO = "auto"


@dataclass(frozen=True)
class Planned:
    """One artifact the job will make (or report as skipped), and why it is in the job."""

    request: ArtifactRequest
    requested_by: str = "request"  # request | optimize | base of <id> | repair of <id>
    skip: str | None = None

    @property
    def id(self) -> str:
        return self.request.id


def variant_of(request: ArtifactRequest) -> Variant:
    return FORMATS.get(request.format.value).variants.get(request.variant)


def optimization_variants(fmt: Format) -> list[Variant]:
    """The variants `--optimize` can try: those made by a recipe from a base artifact, and those an
    optimization setting defines (a candidate for some target)."""
    return [v for name, v in FORMATS.get(fmt.value).variants
            if name != DEFAULT_VARIANT and (v.transform is not None or v.candidate_for or v.routes)]


def plan(options: JobOptions, target: str, source_kind: str | None = None) -> list[Planned]:
    """Every artifact of the job, bases first (each variant made from a base follows it). `source_kind` (the
    loaded source's `kind`; None: unknown) decides which formats and route variants auto adds."""
    planned: dict[str, Planned] = {}
    for request in options.artifacts:
        planned.setdefault(request.id, Planned(request))
    if options.optimize is not None:
        formats = list(dict.fromkeys(r.format for r in options.artifacts))
        for candidate in candidates(options.optimize, formats, target, source_kind):
            planned.setdefault(candidate.id, candidate)
    ordered: dict[str, Planned] = {}
    for item in planned.values():
        _add_with_base(item, planned, ordered)
    return list(ordered.values())


def _add_with_base(item: Planned, planned: dict[str, Planned], ordered: dict[str, Planned]) -> None:
    if item.id in ordered:
        return
    variant = variant_of(item.request)
    if variant.base is not None and item.skip is None:
        base = ArtifactRequest.parse(f"{item.request.format.value}.{variant.base}" if variant.base != DEFAULT_VARIANT
                                     else item.request.format.value)
        _add_with_base(planned.get(base.id) or Planned(base, requested_by=f"base of {item.id}"), planned, ordered)
    ordered[item.id] = item


def auto_formats(formats: list[Format], target: str, source_kind: str | None) -> list[Format]:
    """The formats auto searches: the requested ones, then every other that runs on the target and can be made from
    the source (cheapest first, `FormatHandler.search_cost`)."""
    added = [(handler.search_cost, Format(name)) for name, handler in FORMATS
             if Format(name) not in formats and target in handler.auto_for
             and (source_kind is None or handler.takes(source_kind))]
    return list(formats) + [fmt for _, fmt in sorted(added, key=lambda pair: pair[0])]


def candidates(optimize: OptimizeOptions, formats: list[Format], target: str,
               source_kind: str | None = None) -> list[Planned]:
    """The artifacts `--optimize` adds: auto's search space (module docstring), or the named variants of the
    requested formats."""
    auto = AUTO in optimize.candidates
    allowed = {p.value for p in optimize.precisions}
    out = []
    searched = auto_formats(formats, target, source_kind) if auto else formats
    for fmt in searched:
        if fmt not in formats:  # a format auto adds: its default artifact is a candidate too
            out.append(Planned(ArtifactRequest(format=fmt), requested_by="optimize"))
        for variant in optimization_variants(fmt):
            if not auto and variant.name not in optimize.candidates:
                continue
            if auto and target not in variant.candidate_for:
                continue
            if auto and variant.source_kinds and source_kind not in variant.source_kinds:
                continue
            request = ArtifactRequest(format=fmt, variant=variant.name)
            reason = None
            if not variant.lossless and variant.precision not in allowed:
                reason = (f"not tried: lossy ({variant.precision}); allow it with --precision {variant.precision}")
            elif auto:
                reason = variant.auto_skip(target)
            out.append(Planned(request, requested_by="optimize", skip=reason))
    return out


def check_optimize(optimize: OptimizeOptions, formats: list[Format], target: str) -> None:
    """Refuse, before anything is uploaded, names no requested format has and precisions nothing can use."""
    names = {v.name for fmt in formats for v in optimization_variants(fmt)}
    unknown = [c for c in optimize.candidates if c != AUTO and c not in names]
    if unknown:
        known = ", ".join(sorted(names)) or "(none for these formats)"
        raise ConfigError(f"--optimize {','.join(unknown)}: no such optimization variant for "
                          f"{', '.join(f.value for f in formats)}; known: auto, {known}", step="submit")
    for precision in optimize.precisions:
        usable = [f"{fmt.value}.{v.name}" for fmt in formats for v in optimization_variants(fmt)
                  if v.precision == precision.value and target in v.candidate_for]
        if not usable:
            lossy = sorted({f"{v.name} ({v.precision})" for fmt in formats for v in optimization_variants(fmt)
                            if not v.lossless and target in v.candidate_for})
            raise ConfigError(f"--precision {precision.value}: no optimization variant of "
                              f"{', '.join(f.value for f in formats)} computes in {precision.value} on {target}",
                              step="submit", hint="lossy variants for this target: " + (", ".join(lossy) or "none"))
