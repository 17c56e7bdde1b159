"""Every key in the store, built in one place. The layout under the store's root:

    inputs/<sha256><suffix>                   uploaded model files and sample .npz, content-addressed
    results/<job_key>/                        one job's artifacts, report.json (written last) and report.md
    failed/<job_id>/                          a failed job's report and what it made
    batches/<batch>/jobs/<job_id>.json        each job's state record
    batches/<batch>/versions/<job_id>/<n>.json each version of the record, claimed once (`lifecycle`)
    batches/<batch>/specs/<job_id>.json       each job's spec, as sent (what `portq retry` resubmits)
    batches/<batch>/dead/<job_id>.json        dead letters: jobs that ended without a report
    batches/<batch>/summary.html|.md          the batch's summary pages
    series/<series>/<batch>.json              the nights of a manifest's series (`portq.tasks.state.series`)
    tmp/                                      staging for atomic writes; entries older than any job are swept
"""

from __future__ import annotations

BATCHES = "batches"
SERIES = "series"
#: staging area for atomic writes, on the same filesystem as everything it is renamed into
STAGING = "tmp"


def input_key(sha256: str, suffix: str) -> str:
    suffix = "".join(c for c in suffix.lower() if c.isalnum() or c == ".")[:12]
    return f"inputs/{sha256}{suffix}"


def result_key(job_key: str) -> str:
    return f"results/{job_key}"


def failed_key(job_id: str) -> str:
    return f"failed/{job_id}"


def batch_key(batch: str) -> str:
    return f"{BATCHES}/{batch}"


def records_folder(batch: str) -> str:
    return f"{BATCHES}/{batch}/jobs"


def record_key(batch: str, job_id: str) -> str:
    return f"{records_folder(batch)}/{job_id}.json"


def version_key(batch: str, job_id: str, version: int) -> str:
    return f"{BATCHES}/{batch}/versions/{job_id}/{version}.json"


def spec_key(batch: str, job_id: str) -> str:
    return f"{BATCHES}/{batch}/specs/{job_id}.json"


def dead_folder(batch: str) -> str:
    return f"{BATCHES}/{batch}/dead"


def dead_letter_key(batch: str, job_id: str) -> str:
    return f"{dead_folder(batch)}/{job_id}.json"


def page_key(batch: str, filename: str) -> str:
    return f"{BATCHES}/{batch}/{filename}"


def series_folder(series: str) -> str:
    return f"{SERIES}/{series}"


def series_entry_key(series: str, batch: str) -> str:
    return f"{series_folder(series)}/{batch}.json"
