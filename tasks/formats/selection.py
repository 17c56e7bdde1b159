"""Which artifacts a job makes: the requested ones, the optimization candidates `--optimize` adds, and
the bases those are made from, in an order where every base comes before the variants made from it.

`--optimize auto` tries each variant registered as a candidate for the job's target, for every format
the job asks for: the lossless ones always, the lossy ones (fp16, bf16, int8) only for the precisions
the user allows (`--precision`). A candidate that cannot run here is planned as skipped with its reason,
so the report says what was not tried and why. Decided on the worker, which knows its hardware.
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
            if name != DEFAULT_VARIANT and (v.transform is not None or v.candidate_for)]


def plan(options: JobOptions, target: str) -> list[Planned]:
    """Every artifact of the job, bases first (each variant made from a base follows it)."""
    planned: dict[str, Planned] = {}
    for request in options.artifacts:
        planned.setdefault(request.id, Planned(request))
    if options.optimize is not None:
        formats = list(dict.fromkeys(r.format for r in options.artifacts))
        for candidate in candidates(options.optimize, formats, target):
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


def candidates(optimize: OptimizeOptions, formats: list[Format], target: str) -> list[Planned]:
    """The optimization variants `--optimize` asks for, for each format the job makes."""
    auto = AUTO in optimize.candidates
    allowed = {p.value for p in optimize.precisions}
    out = []
    for fmt in formats:
        for variant in optimization_variants(fmt):
            if not auto and variant.name not in optimize.candidates:
                continue
            if auto and target not in variant.candidate_for:
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
