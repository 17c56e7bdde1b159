"""Two batches compared (`portq.compare`, `portq compare`): by id in the store, or as saved batch reports."""

from __future__ import annotations

import json
from pathlib import Path

from portq.tasks.core.contract import BatchReport, CompareRules, Comparison, read_versioned
from portq.tasks.core.errors import UsageError
from portq.tasks.core.settings import Settings
from portq.tasks.reports.compare import compare as compare_batches
from portq.tasks.state import records
from portq.tasks.state import series as series_index
from portq.tasks.state.store import Store
from pydantic import ValidationError


def load_batch(st: Store, ref: str) -> BatchReport:
    """A batch of the store by id, or a batch report saved with `portq report BATCH --json` (a .json file)."""
    path = Path(ref)
    if ref.endswith(".json") and path.is_file():
        try:
            return read_versioned(BatchReport, json.loads(path.read_text()), ref)
        except (ValueError, ValidationError) as e:
            raise UsageError(f"{ref} is not a batch report: {str(e).splitlines()[0]}", step="compare",
                             hint="save one with `portq report BATCH --json > FILE.json`") from None
    if not records.list_records(st, ref):
        known = records.list_batches(st)
        raise UsageError(f"no batch {ref!r} in store {st.root}", step="compare",
                         hint=f"known batches: {', '.join(known[-10:]) or '(none)'}")
    return records.batch_report(st, ref)


def compared(baseline: str | None, new: str | None, *, series: str | None, latency_threshold: float,
             error_factor: float, store: str | None) -> tuple[Comparison, BatchReport, BatchReport, Store]:
    """The comparison, with the two batch reports it read and the store."""
    st = Store(Settings.resolve(store=store).store)
    if series is not None:
        if baseline or new:
            raise UsageError("give either two batches or --series, not both", step="compare")
        nights = series_index.nights(st, series)
        if len(nights) < 2:
            raise UsageError(f"series {series} has {len(nights)} night(s); compare needs two", step="compare",
                             hint="submit the manifest again for a second night")
        baseline, new = nights[-2].batch, nights[-1].batch
    elif not (baseline and new):
        raise UsageError("give two batches (BASELINE NEW), or --series S for a series' last two nights",
                         step="compare")
    try:
        rules = CompareRules(latency_threshold=latency_threshold, error_factor=error_factor)
    except ValidationError as e:
        raise UsageError("; ".join(f"--{str(x['loc'][0]).replace('_', '-')}: {x['msg']}" for x in e.errors()),
                         step="compare") from None
    base_report, new_report = load_batch(st, baseline), load_batch(st, new)
    in_store = base_report.store == st.root
    series = series or (series_index.series_of(st, new_report.batch) if in_store else None)
    return compare_batches(base_report, new_report, rules, series=series), base_report, new_report, st
