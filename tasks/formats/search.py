"""What `--optimize auto` leaves out while the job runs: a candidate whose family cannot win is pruned, with why.

A variant made from a base artifact (`Variant.base`) runs at most `Variant.headroom` times faster than that base
(measured; None: unknown, so never pruned). Once the base has been timed, the variant's ceiling is the upper bound of
the base's speedup interval times that headroom. The variant is pruned when its ceiling cannot beat the source
(1.0x) or the lower bound of the best artifact so far (a good one: converted, parity passed), since the pick is the
fastest artifact that passed parity and beats the source. What depends on a pruned artifact is pruned with it, and a
route variant whose export the default artifact already made (its ladder took that route) is pruned as the same
artifact. Named candidates and requested artifacts are never pruned: only auto's own.
"""

from __future__ import annotations

from collections.abc import Mapping

from portq.tasks.core.contract import DEFAULT_VARIANT, ArtifactReport, ArtifactRequest
from portq.tasks.formats.base import FORMATS

#: how a pruned candidate's reason begins (reports and pages show the rest)
PRUNED = "pruned"


def _interval(a: ArtifactReport) -> tuple[float, float]:
    assert a.latency is not None
    lat = a.latency
    return (lat.speedup_interval[0], lat.speedup_interval[1]) if lat.speedup_interval else (lat.speedup, lat.speedup)


def prune_reason(request: ArtifactRequest, done: Mapping[str, ArtifactReport]) -> str | None:
    """Why auto should not make `request`, given the artifacts made so far (by id), or None to make it."""
    handler = FORMATS.get(request.format.value)
    variant = handler.variants.get(request.variant)
    fmt = request.format.value
    default = done.get(fmt)
    if variant.routes and default is not None and default.route in variant.routes:
        return (f"{PRUNED}: the same export as {fmt}, whose ladder took the {default.route} route already")
    if variant.base is None:
        return None
    base_id = fmt if variant.base == DEFAULT_VARIANT else f"{fmt}.{variant.base}"
    base = done.get(base_id)
    if base is None:
        return None
    if base.pruned:
        return f"{PRUNED}: it is made from {base_id}, which was pruned"
    if variant.headroom is None or base.latency is None or not base.good:
        return None
    ceiling = _interval(base)[1] * variant.headroom
    good = [a for a in done.values() if a.good and a.latency is not None]
    best = max(good, key=lambda a: _interval(a)[0], default=None)
    bar, against = 1.0, "the source (1.00x)"
    if best is not None and _interval(best)[0] > bar:
        bar, against = _interval(best)[0], f"{best.id} (at least {_interval(best)[0]:.2f}x)"
    if ceiling > bar:
        return None
    low, high = _interval(base)
    return (f"{PRUNED}: its base {base_id} runs at {base.latency.speedup:.2f}x ({low:.2f}-{high:.2f}) the source's "
            f"speed, and {variant.name} has run at most {variant.headroom:g}x faster than its base: at most "
            f"{ceiling:.2f}x, which cannot beat {against}")
