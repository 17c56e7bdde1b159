"""The store on a real S3-compatible server (moto, on the loopback) through s3fs: publishing by conditional
commit, what a reader can see, sweeping what dead writers left, and the failures a user can act on."""

import json
import threading
import time
from pathlib import Path

import pytest
from portq.tasks.core.errors import ConfigError, StoreError
from portq.tasks.state.store import COMMIT, STAGING, Store

from tests.conftest import forget_s3_clients
from tests.s3_server import SECRET, S3Server, isolated_aws_env


def result_dir(tmp_path: Path, name: str, n: int) -> Path:
    d = tmp_path / name
    (d / "onnx").mkdir(parents=True)
    (d / "onnx/model.onnx").write_bytes(f"model {n}".encode())
    (d / "onnx/model.onnx.data").write_bytes(f"weights {n}".encode() * 100)
    (d / "job.log").write_text(f"log {n}")
    (d / "report.json").write_text(json.dumps({"n": n}))
    return d


def test_reads_writes_listings_and_versions(s3_store):
    store = Store(s3_store)
    assert not store.local and store.url("a/b.json") == f"{s3_store}/a/b.json"
    store.write_json("batches/b/jobs/j1.json", {"v": 1})
    store.write_json("batches/b/jobs/j2.json", {"v": 2})
    assert store.read_json("batches/b/jobs/j1.json") == {"v": 1}
    assert store.list("batches/b/jobs") == ["j1.json", "j2.json"]
    before = store.versions("batches/b/jobs")
    store.write_json("batches/b/jobs/j2.json", {"v": 3})
    after = store.versions("batches/b/jobs")
    assert before["j1.json"] == after["j1.json"] and before["j2.json"] != after["j2.json"]
    assert store.read_many(["batches/b/jobs/j1.json", "batches/b/jobs/nope.json"]) == \
        {"batches/b/jobs/j1.json": b'{\n  "v": 1\n}\n'}
    assert store.list("batches/none") == [] and store.versions("batches/none") == {}
    assert store.create("x/once", b"1") and not store.create("x/once", b"2")
    assert store.read_bytes("x/once") == b"1"


def test_the_first_complete_delivery_wins_and_a_second_leaves_nothing(s3_store, tmp_path):
    store = Store(s3_store)
    first = store.publish_dir(result_dir(tmp_path, "a", 1), "results/k")
    assert first.won and first.folder.startswith("results/k/d-")
    second = store.publish_dir(result_dir(tmp_path, "b", 2), "results/k")
    assert second.folder == first.folder and not second.won
    assert store.committed("results/k") == first.folder
    assert json.loads(store.read_bytes(f"{first.folder}/report.json")) == {"n": 1}
    assert store.read_bytes(f"{first.folder}/onnx/model.onnx.data") == b"weights 1" * 100
    assert store.list("results/k") == sorted([COMMIT, first.folder.rsplit("/", 1)[-1]])
    assert store.list(STAGING) == []  # markers go once a delivery is settled


def test_racing_deliveries_commit_exactly_one_folder_and_the_others_remove_theirs(s3_store, tmp_path):
    store = Store(s3_store)
    dirs = [result_dir(tmp_path, f"r{i}", i) for i in range(4)]
    outcomes = []
    start = threading.Barrier(len(dirs))

    def deliver(d: Path) -> None:
        pub = store.publication("results/race")
        start.wait()
        outcomes.append(store.publish_dir(d, pub))

    threads = [threading.Thread(target=deliver, args=(d,)) for d in dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(o.won for o in outcomes) == 1
    winner = next(o.folder for o in outcomes if o.won)
    assert {o.folder for o in outcomes} == {winner}
    assert store.list("results/race") == sorted([COMMIT, winner.rsplit("/", 1)[-1]])
    n = json.loads(store.read_bytes(f"{winner}/report.json"))["n"]
    assert store.read_bytes(f"{winner}/onnx/model.onnx") == f"model {n}".encode()  # one delivery's files only


def test_a_delivery_killed_half_way_is_invisible_and_swept_later(s3_store, tmp_path):
    store = Store(s3_store)
    pub = store.publication("results/half")
    # what a writer killed before its commit leaves: its marker and some of its files, no commit
    store.write_json(f"{STAGING}/{pub.folder.rsplit('/', 1)[-1]}.json",
                     {"key": pub.key, "folder": pub.folder, "at": time.time() - 3600})
    store.write_bytes(f"{pub.folder}/onnx/model.onnx", b"half")
    assert store.committed("results/half") is None  # a reader finds no result, not a partial one
    live = store.publication("results/live")  # a writer still at work: its marker is fresh
    store.write_json(f"{STAGING}/{live.folder.rsplit('/', 1)[-1]}.json",
                     {"key": live.key, "folder": live.folder, "at": time.time()})
    store.write_bytes(f"{live.folder}/onnx/model.onnx", b"in progress")
    assert store.sweep_staging(older_than_s=600) == 1
    assert not store.exists(f"{pub.folder}/onnx/model.onnx")
    assert store.exists(f"{live.folder}/onnx/model.onnx") and len(store.list(STAGING)) == 1
    done = store.publish_dir(result_dir(tmp_path, "whole", 7), "results/half")
    assert done.won and store.committed("results/half") == done.folder


def test_an_unknown_scheme_or_a_missing_package_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot open store nosuch://bucket/x: Protocol not known"):
        Store("nosuch://bucket/x")


def test_a_missing_bucket_says_so(s3_server, s3_env):
    store = Store("s3://no-such-bucket-here/portq")
    with pytest.raises(StoreError, match="does not exist") as e:
        store.check()
    assert "create the bucket" in e.value.message and "s3://no-such-bucket-here/portq/tmp/probe-" in e.value.message


def test_an_unreachable_endpoint_names_it(s3_server, monkeypatch):
    from tests.redis_server import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for k, v in isolated_aws_env(endpoint).items():
        monkeypatch.setenv(k, v)
    forget_s3_clients()
    with pytest.raises(StoreError) as e:
        Store("s3://bucket/portq").check()
    assert f"the store's endpoint {endpoint} does not answer" in e.value.message
    assert "AWS_ENDPOINT_URL" in e.value.message and SECRET not in e.value.message
    forget_s3_clients()


def test_missing_credentials_say_what_to_set(s3_server, s3_store, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    forget_s3_clients()
    with pytest.raises(StoreError, match="no credentials for the object store") as e:
        Store(s3_store).check()
    assert "AWS_ACCESS_KEY_ID" in e.value.message
    forget_s3_clients()


@pytest.fixture(scope="module")
def iam_server(tmp_path_factory):
    """A server that enforces IAM policies (after the requests that set it up): a reader and a writer."""
    setup_requests = 7  # the bucket, then a user, its policy and its access key, twice
    server = S3Server(tmp_path_factory.mktemp("iam"), env={"INITIAL_NO_AUTH_ACTION_COUNT": str(setup_requests)})
    server.start()
    bucket = server.bucket()
    iam = server.client("iam")
    keys = {}
    for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:GetObject", "s3:ListBucket"])):
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="portq", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        k = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
    yield server, bucket, keys
    server.stop()


def test_credentials_without_write_permission_are_refused_with_the_reason(iam_server, monkeypatch):
    server, bucket, keys = iam_server

    def as_user(user: str) -> Store:
        for k, v in isolated_aws_env(server.endpoint, key=keys[user][0], secret=keys[user][1]).items():
            monkeypatch.setenv(k, v)
        forget_s3_clients()
        return Store(f"s3://{bucket}/portq")

    as_user("writer").check()
    with pytest.raises(StoreError, match="permission denied") as e:
        as_user("reader").check()
    assert "need read and write access" in e.value.message and keys["reader"][1] not in e.value.message
    forget_s3_clients()
