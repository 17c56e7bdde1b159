import pickle

from portq.tasks.core.errors import PortqError, StoreError, TransientError


def test_store_trouble_becomes_a_retry_with_its_cause_and_hint() -> None:
    e = StoreError("cannot read s3://bucket/batches/b1/j1.json: permission denied", step="store",
                   hint="check the worker's credentials")
    retry = e.transient("publish")
    assert type(retry) is TransientError
    assert (retry.cause, retry.step, retry.hint) == (e.cause, "publish", e.hint)
    assert retry.message == ("[step publish] cannot read s3://bucket/batches/b1/j1.json: permission denied "
                             "(check the worker's credentials)")
    assert retry.to_dict()["kind"] == "transient"


def test_a_retry_travels_between_processes_whole() -> None:
    retry = StoreError("store unreachable", step="store").transient("store")
    back = pickle.loads(pickle.dumps(retry))
    assert isinstance(back, TransientError) and isinstance(back, PortqError)
    assert back.message == "[step store] store unreachable"
