"""A job's life: intents pick the status, and every write is conditional on the version read, so two writers that
disagree are detected instead of the last one silently winning."""

import json

import pytest
from portq.tasks.core.contract import JobStatus
from portq.tasks.state import keys, lifecycle, records
from portq.tasks.state.store import Store

from tests.jobs import prepare


@pytest.fixture
def job(example_models, tmp_path):
    store = Store(str(tmp_path / "store"))
    (spec,) = prepare([str(example_models["mlp"])], store, batch="lc", options={}, max_bytes=1 << 30).specs
    return store, spec


def read(store, spec):
    return records.read_record(store, spec.batch_id, spec.job_id)


def test_each_write_is_a_new_version_claimed_once(job):
    store, spec = job
    record = read(store, spec)
    assert record.status is JobStatus.queued and record.version == 1
    lifecycle.started(store, record, "w1")
    assert read(store, spec).version == record.version == 2
    assert store.exists(keys.version_key(spec.batch_id, spec.job_id, 2))


def test_a_writer_that_lost_the_race_does_not_overwrite_a_cancel(job):
    """The worker read the job queued; `portq cancel` wrote it cancelled; the worker's start must not win."""
    store, spec = job
    worker_copy, client_copy = read(store, spec), read(store, spec)
    lifecycle.cancelled(store, client_copy, "cancelled by the user")
    got = lifecycle.started(store, worker_copy, "w1")
    assert got.status is JobStatus.cancelled and got.error == "cancelled by the user"
    stored = read(store, spec)
    assert stored.status is JobStatus.cancelled and stored.attempts == 0 and stored.version == 2


def test_a_lost_race_retries_the_intent_against_the_fresh_record(job):
    store, spec = job
    first, second = read(store, spec), read(store, spec)
    lifecycle.started(store, first, "w1")  # version 2: running, attempt 1
    lifecycle.refused(store, second, "over this worker's limit")  # read at version 1: re-read, then applied
    stored = read(store, spec)
    assert stored.status is JobStatus.failed and stored.error == "over this worker's limit"
    assert stored.attempts == 1 and stored.worker == "w1" and stored.version == 3


def test_two_writers_that_disagree_raise(job):
    store, spec = job
    first, second = read(store, spec), read(store, spec)
    lifecycle.served_from_cache(store, first, "results/k")
    with pytest.raises(lifecycle.IllegalTransition, match="succeeded to running .another writer changed it"):
        lifecycle._move(store, second, JobStatus.running)
    assert read(store, spec).status is JobStatus.succeeded


def test_a_claim_whose_writer_died_before_the_record_is_not_lost(job):
    store, spec = job
    record = read(store, spec)
    claimed = record.model_copy(update={"status": JobStatus.cancelled, "error": "cancelled", "version": 2})
    store.write_bytes(keys.version_key(spec.batch_id, spec.job_id, 2), json.dumps(claimed.model_dump(mode="json"))
                      .encode())  # the claim made, the record file never updated
    assert read(store, spec).status is JobStatus.queued
    assert lifecycle.started(store, record, "w1").status is JobStatus.cancelled
    assert lifecycle.latest(store, spec.batch_id, spec.job_id).version == 2


def test_a_progress_note_that_lost_the_race_is_dropped(job):
    store, spec = job
    worker_copy = read(store, spec)
    lifecycle.started(store, worker_copy, "w1")
    lifecycle.cancelled(store, read(store, spec), "cancelled by the user")
    lifecycle.note_step(store, worker_copy, "export:onnx")
    stored = read(store, spec)
    assert stored.status is JobStatus.cancelled and stored.step is None
