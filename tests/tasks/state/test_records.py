"""Reading a batch's records from an object store: only what changed is fetched again. The requests are counted
where they leave s3fs (botocore's own event hook on the real client), against moto's S3 server."""

import threading
import time
from collections import Counter

import pytest
from portq.tasks.core.contract import JobRecord, JobReport, JobStatus, Target
from portq.tasks.state import lifecycle, records
from portq.tasks.state.store import Store


def count_requests(store: Store) -> Counter:
    """S3 requests the store makes from now on, by operation (GetObject, ListObjectsV2, ...)."""
    seen: Counter = Counter()

    def on_call(model, **_):
        seen[model.name] += 1

    store.fs.s3.meta.events.register("before-call.s3", on_call)
    return seen


def finished_report(r: JobRecord) -> JobReport:
    return JobReport(job_id=r.job_id, batch=r.batch, model=r.model, source=r.source, target=r.target,
                     status=JobStatus.succeeded)


def queued_batch(store: Store, batch: str, n: int) -> list[JobRecord]:
    recs = [JobRecord(job_id=f"j{i:03d}", batch=batch, model=f"m{i}", source="?", target=Target.cpu,
                      status=JobStatus.queued) for i in range(n)]
    for r in recs:
        records.write_record(store, r)
    return recs


def test_a_reader_fetches_only_new_and_changed_records(s3_store):
    store = Store(s3_store)
    recs = queued_batch(store, "b", 30)
    reader = records.RecordReader(store, "b")
    requests = count_requests(store)
    assert len(reader.read()) == 30
    assert requests == Counter({"ListObjectsV2": 1, "GetObject": 30})
    requests.clear()
    for r in recs[:2]:
        lifecycle.started(store, r, "w")
    requests.clear()
    got = reader.read()
    assert requests == Counter({"ListObjectsV2": 1, "GetObject": 2})
    assert [r.status for r in got[:3]] == [JobStatus.running, JobStatus.running, JobStatus.queued]
    requests.clear()
    reader.read()
    assert requests == Counter({"ListObjectsV2": 1})


@pytest.mark.parametrize("n", [20])
def test_following_a_batch_reads_each_change_once_not_every_record_each_poll(s3_store, n):
    from portq.client.api import _follow
    from portq.client.progress import BatchWatcher

    store = Store(s3_store)
    recs = queued_batch(store, "f", n)
    requests = count_requests(store)

    def work() -> None:  # a worker finishing one job every 0.1 s
        for r in recs:
            time.sleep(0.1)
            lifecycle.started(store, r, "w")
            lifecycle.finished(store, r, finished_report(r), None)

    writer = threading.Thread(target=work)
    writer.start()
    done = _follow(BatchWatcher(store, "f"), 60, None, poll_s=0.05)  # what portq wait / --wait run
    writer.join()
    assert [j.status for j in done.jobs] == [JobStatus.succeeded] * n
    polls = requests["ListObjectsV2"]
    reads = requests["GetObject"]
    assert polls >= 20  # re-reading every record on each poll would have cost polls * n reads
    # each record read when first seen and after each of its two changes, at most (a poll may fall between them)
    assert reads <= 3 * n, (reads, polls)
    assert requests["HeadObject"] == 0
