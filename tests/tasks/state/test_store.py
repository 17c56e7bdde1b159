import json

import pytest
from portq.tasks.core.errors import StoreError
from portq.tasks.state.store import Published, Store


def test_write_and_read_json_atomically(tmp_path):
    store = Store(str(tmp_path))
    store.write_json("a/b.json", {"x": 1})
    assert store.read_json("a/b.json") == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]  # no temp files left behind


def test_keys_cannot_leave_the_store(tmp_path):
    store = Store(str(tmp_path / "s"))
    for key in ["../x", "a/../../x", "/etc/passwd"]:
        with pytest.raises(StoreError, match="leaves the store"):
            store.write_json(key, {})
    assert not (tmp_path / "x").exists()


def test_publish_dir_is_all_or_nothing_and_only_once(tmp_path):
    store = Store(str(tmp_path / "s"))
    first = tmp_path / "first"
    first.mkdir()
    (first / "model.onnx").write_bytes(b"one")
    (first / "report.json").write_text(json.dumps({"n": 1}))
    assert store.publish_dir(first, "results/k").won
    second = tmp_path / "second"
    second.mkdir()
    (second / "model.onnx").write_bytes(b"two")
    (second / "report.json").write_text(json.dumps({"n": 2}))
    assert store.publish_dir(second, "results/k") == Published("results/k", won=False)
    assert store.read_bytes("results/k/model.onnx") == b"one"
    assert store.list("results") == ["k"]


def test_a_writer_killed_half_way_leaves_only_a_staging_entry_that_is_swept(tmp_path):
    import os
    import time

    store = Store(str(tmp_path / "s"))
    # what a writer killed inside publish_dir leaves: a half-copied folder under tmp/, nothing under results/
    half = tmp_path / "s/tmp/abc-k"
    half.mkdir(parents=True)
    (half / "model.onnx").write_bytes(b"ha")
    old = time.time() - 3600
    os.utime(half, (old, old))
    fresh = tmp_path / "s/tmp/def-k"
    fresh.mkdir()
    assert store.list("results") == []
    assert store.sweep_staging(older_than_s=600) == 1
    assert sorted(p.name for p in (tmp_path / "s/tmp").iterdir()) == ["def-k"]  # a live writer's entry stays


def test_size_of_a_stored_file(tmp_path):
    store = Store(str(tmp_path / "s"))
    store.write_bytes("inputs/x.pt", b"12345")
    assert store.size("inputs/x.pt") == 5


def test_publish_replaces_an_incomplete_folder(tmp_path):
    store = Store(str(tmp_path / "s"))
    (tmp_path / "s/results/k").mkdir(parents=True)
    (tmp_path / "s/results/k/model.onnx").write_bytes(b"half")  # a crashed writer, no report.json
    done = tmp_path / "done"
    done.mkdir()
    (done / "model.onnx").write_bytes(b"whole")
    (done / "report.json").write_text("{}")
    assert store.publish_dir(done, "results/k").won
    assert store.read_bytes("results/k/model.onnx") == b"whole"


def test_memory_filesystem_store_through_fsspec():
    store = Store("memory://portq-test")
    store.write_json("batches/b/jobs/j.json", {"ok": True})
    assert store.read_json("batches/b/jobs/j.json") == {"ok": True}
    assert store.list("batches/b/jobs") == ["j.json"]
    with store.local_file("batches/b/jobs/j.json") as p:
        assert json.loads(p.read_text()) == {"ok": True}
