"""What a delivery does, decided from the store: run, skip, or dead-letter; what a lost worker leaves."""

import pytest
from portq.tasks.core.contract import JobStatus
from portq.tasks.core.settings import Settings
from portq.tasks.state import delivery
from portq.tasks.state import records as batches
from portq.tasks.state.store import Store

from tests.jobs import prepare


@pytest.fixture
def job(example_models, tmp_path):
    store = Store(str(tmp_path / "store"))
    (spec,) = prepare([str(example_models["mlp"])], store, batch="d", options={}, max_bytes=1 << 30).specs
    return store, spec


def set_record(store, spec, **changes):
    record = batches.read_record(store, spec.batch_id, spec.job_id)
    for k, v in changes.items():
        setattr(record, k, v)
    batches.write_record(store, record)


def test_a_new_job_runs_and_a_finished_or_cancelled_one_is_skipped(job):
    store, spec = job
    assert delivery.admit(store, spec, max_attempts=3).run
    for status in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled):
        set_record(store, spec, status=status)
        verdict = delivery.admit(store, spec, max_attempts=3)
        assert not verdict.run and verdict.reason == f"already {status.value}"


def test_a_job_whose_worker_vanished_on_every_attempt_is_dead_lettered(job):
    store, spec = job
    set_record(store, spec, status=JobStatus.running, attempts=2, worker="w1@host")
    assert delivery.admit(store, spec, max_attempts=3).run  # a third attempt is still allowed
    set_record(store, spec, attempts=3)
    verdict = delivery.admit(store, spec, max_attempts=3)
    assert not verdict.run
    record = batches.read_record(store, spec.batch_id, spec.job_id)
    assert record.status is JobStatus.failed and record.dead_letter == f"batches/d/dead/{spec.job_id}.json"
    assert "its worker died during each of its 3 attempts" in record.error and "w1@host" in record.error
    (dead,) = delivery.dead_letters(store, "d")
    assert dead["spec"] == spec.model_dump(mode="json") and dead["attempts"] == 3
    assert delivery.read_spec(store, "d", spec.job_id) == spec


def test_a_lost_worker_requeues_then_dead_letters(job):
    store, spec = job
    raw = spec.model_dump(mode="json")
    set_record(store, spec, status=JobStatus.running, attempts=1)
    rec = delivery.worker_lost(store, raw, "Worker exited prematurely: signal 9 (SIGKILL) Job: 4.", max_attempts=2)
    assert rec.status is JobStatus.queued
    assert rec.error == "attempt 1 of 2 ended when its process died with SIGKILL (often the out-of-memory killer); " \
                        "requeued"
    set_record(store, spec, status=JobStatus.running, attempts=2)
    rec = delivery.worker_lost(store, raw, "Worker exited prematurely: signal 11 (SIGSEGV) Job: 5.", max_attempts=2)
    assert rec.status is JobStatus.failed and rec.dead_letter
    assert "died on each of its 2 attempts; the last time: its process died with SIGSEGV" in rec.error
    # the requeued message then finds the job finished
    assert not delivery.admit(store, spec, max_attempts=2).run


def test_a_fuse_job_is_requeued_dead_lettered_and_resubmitted_like_any_other(tmp_path):
    """Delivery does not look at the kind: a fuse job whose worker dies comes back, then becomes a dead letter
    whose spec (members, method, data) is what `portq retry` sends again."""
    import torch

    from tests.tasks.fusion.helpers import SmallNet, fuse_spec, save_state_dicts

    store = Store(str(tmp_path / "store"))
    paths = save_state_dicts(tmp_path / "m", [SmallNet(), SmallNet(), SmallNet()])
    spec = fuse_spec(store, paths[:2], "ties", base=paths[2], params={"density": 0.5}, batch="fd")
    raw = spec.model_dump(mode="json")
    set_record(store, spec, status=JobStatus.running, attempts=1)
    rec = delivery.worker_lost(store, raw, "Worker exited prematurely: signal 9 (SIGKILL) Job: 1.", max_attempts=2)
    assert rec.status is JobStatus.queued and rec.kind.value == "fuse" and rec.source == spec.display
    assert delivery.admit(store, spec, max_attempts=2).run
    set_record(store, spec, status=JobStatus.running, attempts=2)
    rec = delivery.worker_lost(store, raw, "Worker exited prematurely: signal 9 (SIGKILL) Job: 2.", max_attempts=2)
    assert rec.status is JobStatus.failed and rec.dead_letter
    (dead,) = delivery.dead_letters(store, "fd")
    assert dead["spec"] == raw and delivery.read_spec(store, "fd", spec.job_id) == spec
    assert torch.load(store.url(spec.source.base.model.key), weights_only=True)  # the files stay in the store


def test_time_limit_is_recorded_with_the_knob_to_turn(job):
    store, spec = job
    set_record(store, spec, status=JobStatus.running, attempts=1)
    rec = delivery.time_limit_exceeded(store, spec.model_dump(mode="json"), 600)
    assert rec.status is JobStatus.failed and rec.dead_letter
    assert "exceeded the job time limit of 600s (PORTQ_TASK_TIME_LIMIT)" in rec.error


def test_a_message_that_is_not_a_job_is_recorded_only_under_safe_ids(tmp_path):
    store = Store(str(tmp_path / "store"))
    assert delivery.reject_message(store, {"batch_id": "../x", "job_id": "j1"}, "bad") is None
    assert delivery.reject_message(store, ["not", "a", "dict"], "bad") is None
    rec = delivery.reject_message(store, {"batch_id": "b", "job_id": "j1", "model": "../../m"}, "model: unsafe")
    assert rec.model == "m" and "refused this job's message: model: unsafe" in rec.error
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["batches", "tmp"]


@pytest.mark.parametrize("cause, said", [
    ("Worker exited prematurely: signal 11 (SIGSEGV) Job: 3.", "its process died with SIGSEGV"),
    ("Worker exited prematurely: exitcode 70 Job: 2.", "its process exited with code 70"),
    ("something else Job: 1.", "something else"),
])
def test_describe_loss(cause, said):
    assert delivery.describe_loss(cause) == said


def test_retry_backoff_stays_well_below_the_visibility_timeout():
    from portq.worker.task import retry_countdown

    s = Settings.resolve(env={"PORTQ_TASK_TIME_LIMIT": "10", "PORTQ_VISIBILITY_TIMEOUT": "20"})
    assert [retry_countdown(r, s) for r in range(5)] == [1, 2, 4, 5, 5]
    assert [retry_countdown(r, Settings.resolve(env={})) for r in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
