"""One night of a manifest: its jobs prepared as one batch of its series, and the night added to the index.

`submit_night` checks everything it can before it uploads anything (the manifest, every group's artifact ids
against the format registry, every group's options), then prepares one job per model and target, like
`portq submit` does for files, and records the night (`portq.tasks.state.series`). The caller sends the jobs:
`portq submit --manifest` onto the queue or runs them here, the beat task (`portq.worker.beat`) onto the
queue from a worker. Unchanged models come back from the content cache when the jobs run. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from portq.tasks.core.contract import SAFE_ID, JobOptions, JobRecord, JobSpec, SeriesEntry, Target
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.manifest import ManifestPlan, load_manifest
from portq.tasks.state import keys
from portq.tasks.state import series as series_index
from portq.tasks.state.store import Store
from portq.tasks.state.submission import prepare
from pydantic import ValidationError


@dataclass
class Night:
    series: str
    batch: str
    specs: list[JobSpec] = field(default_factory=list)
    rejected: list[JobRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def unused_batch_name(store: Store, name: str) -> str:
    """`name`, or `name-2`, `name-3`... when a batch of that name exists (a second night on one date)."""
    candidate, n = name, 1
    while store.exists(keys.batch_key(candidate)):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _group_options(plan: ManifestPlan) -> list[list[dict[str, Any]]]:
    """Per group, per target: the JobOptions fields, checked against the registries and the contract."""
    from portq.tasks.formats import artifact_requests

    checked = []
    for group in plan.groups:
        try:
            requests = artifact_requests(group.formats, group.format_options, step="manifest")
        except ConfigError as e:
            key = "format_options" if "option" in e.cause else "formats"
            raise plan.error(group, key, e.cause, e.hint) from None
        per_target = []
        for target in group.targets:
            options = {**group.options, "target": target,
                       "artifacts": [r.model_dump(mode="json") for r in requests]}
            if "optimize" in options:
                from portq.tasks.core.contract import OptimizeOptions
                from portq.tasks.formats.selection import check_optimize

                try:
                    check_optimize(OptimizeOptions.model_validate(options["optimize"]),
                                   list(dict.fromkeys(r.format for r in requests)), Target(target).value)
                except ConfigError as e:
                    key = "precision" if "--precision" in e.cause else "optimize"
                    raise plan.error(group, key, e.cause, e.hint) from None
            try:
                JobOptions.model_validate(options)
            except ValidationError as e:
                first = e.errors()[0]
                key = str(first["loc"][0]) if first["loc"] else "formats"
                raise plan.error(group, key, f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
            per_target.append(options)
        checked.append(per_target)
    return checked


def submit_night(manifest: str | Path | ManifestPlan, store: Store, *, max_bytes: int,
                 max_sample_bytes: int | None = None, force: bool = False, batch: str | None = None,
                 now: datetime | None = None) -> Night:
    """Prepare the manifest's jobs as one new batch of its series and record the night. Raises ConfigError for a
    manifest that cannot work (nothing is uploaded then); files that cannot become jobs are failed records."""
    plan = manifest if isinstance(manifest, ManifestPlan) else load_manifest(manifest)
    checked = _group_options(plan)
    if batch is not None and not SAFE_ID.match(batch):
        raise ConfigError(f"{batch!r} is not a valid batch name (letters, digits, '.', '_', '-')", step="manifest")
    if batch is not None and store.exists(keys.batch_key(batch)):
        raise ConfigError(f"batch {batch!r} exists: a night is a new batch of its series, and the series keeps its "
                          "nights", step="manifest", hint="leave out --batch (nights are named by date) or choose "
                                                          "another name")
    night = Night(series=plan.series, batch=batch or unused_batch_name(store, plan.batch_name(now)),
                  warnings=list(plan.warnings))
    for group, per_target in zip(plan.groups, checked):
        if not group.paths:
            continue
        for options in per_target:
            sub = prepare([str(p) for p in group.paths], store, batch=night.batch, options=options, load=group.load,
                          force=force, max_bytes=max_bytes, max_sample_bytes=max_sample_bytes)
            night.specs += sub.specs
            night.rejected += sub.rejected
    series_index.record_night(store, SeriesEntry(
        series=night.series, batch=night.batch, manifest=str(plan.path.resolve()), manifest_sha256=plan.sha256,
        jobs=len(night.specs), rejected=len(night.rejected), warnings=night.warnings))
    return night
