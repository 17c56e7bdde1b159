"""Series: the nights submitted from one manifest, indexed in the store.

    series/<series>/<batch>.json    one `SeriesEntry` per night, written once (atomically) when it is submitted

One small file per night: two writers of different nights never touch the same file, so no entry is lost, and
listing a series is listing one folder. What a night's jobs came to (status, cache hits) is read from its
batch's records when asked, so the index never goes stale.
"""

from __future__ import annotations

from portq.tasks.core.contract import SAFE_ID, JobStatus, NightSummary, SeriesEntry, SeriesHistory, read_versioned
from portq.tasks.core.errors import UsageError
from portq.tasks.state import keys, records
from portq.tasks.state.store import Store

SERIES_ROOT = keys.SERIES


def entry_key(series: str, batch: str) -> str:
    return keys.series_entry_key(series, batch)


def record_night(store: Store, entry: SeriesEntry) -> None:
    store.write_json(entry_key(entry.series, entry.batch), entry.model_dump(mode="json"))


def list_series(store: Store) -> list[str]:
    return [s for s in store.list(SERIES_ROOT) if SAFE_ID.match(s)]


def nights(store: Store, series: str) -> list[SeriesEntry]:
    """The series' nights, oldest first; a UsageError (exit 2) for a series the store does not have."""
    if not SAFE_ID.match(series):
        raise UsageError(f"{series!r} is not a series name", step="history")
    names = [n for n in store.list(keys.series_folder(series)) if n.endswith(".json")]
    if not names:
        known = list_series(store)
        raise UsageError(f"no series {series!r} in store {store.root}", step="history",
                         hint=f"known series: {', '.join(known) or '(none; `portq submit --manifest` starts one)'}")
    entries = []
    for name in names:
        key = f"{SERIES_ROOT}/{series}/{name}"
        entries.append(read_versioned(SeriesEntry, store.read_json(key), store.url(key)))
    return sorted(entries, key=lambda e: (e.submitted_at, e.batch))


def series_of(store: Store, batch: str) -> str | None:
    """The series a batch is a night of (None when it was submitted without a manifest)."""
    for series in list_series(store):
        if store.exists(entry_key(series, batch)):
            return series
    return None


def summarize(store: Store, entry: SeriesEntry) -> NightSummary:
    """A night's entry with what its jobs came to, read from its batch's records now."""
    recs = records.list_records(store, entry.batch)
    return NightSummary(
        batch=entry.batch, submitted_at=entry.submitted_at, manifest=entry.manifest, counts=records.counts(recs),
        cache_hits=sum(r.cached for r in recs),
        converted=sum(r.attempts > 0 and r.status in (JobStatus.succeeded, JobStatus.failed) and not r.cached
                      for r in recs),
        warnings=entry.warnings)


def history(store: Store, series: str, last: int | None = None) -> SeriesHistory:
    """The series' nights (the last `last` of them), oldest first, with their counts and cache hits."""
    entries = nights(store, series)
    if last:
        entries = entries[-last:]
    return SeriesHistory(series=series, store=store.root, nights=[summarize(store, e) for e in entries])
