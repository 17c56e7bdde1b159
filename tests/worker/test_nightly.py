"""Nightly batches across the real queue: a manifest submitted three nights running, through a real Redis and a
real worker; the third night is submitted by the beat task (`portq.nightly`) on the worker itself."""

import json
import time
from pathlib import Path

import pytest
from portq.tasks.core.settings import Settings

from tests.conftest import run_cli

pytestmark = pytest.mark.queue

MANIFEST = """\
series: nightly
batch: "nightly-{date}"
defaults:
  latency: {runs: 10, warmup: 2, max_seconds: 3, max_windows: 6}
groups:
  - name: mlps
    models: ["models/*.pt", "retired/*.pt"]
"""


def build(directory: Path, name: str, width: int, depth: int = 1) -> None:
    """A TorchScript MLP with a sidecar sample. Width 8 runs in microseconds; 1024 x 4 layers in a millisecond."""
    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 4)).eval()
    x = torch.randn(8, 16)
    torch.jit.save(torch.jit.trace(model, x), str(directory / f"{name}.pt"))
    np.savez(directory / f"{name}.npz", x=x.numpy())


def submit(env: dict[str, str], manifest: Path) -> str:
    res = run_cli("submit", "--manifest", str(manifest), "--wait", "--timeout", "240", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[warning]" in res.stderr and "glob 'retired/*.pt' of group mlps matches no model file" in res.stderr
    return res.stdout.splitlines()[0].removeprefix("batch ")


def cached(env: dict[str, str], batch: str) -> dict[str, bool]:
    doc = json.loads(run_cli("report", batch, "--json", env=env).stdout)
    return {job["model"]: job["cached"] for job in doc["jobs"]}


def test_a_slower_model_regresses_alone_and_an_identical_night_compares_clean(start_worker, queue_db, store_dir,
                                                                             tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a", "b", "c"):
        build(models, name, width=8)
    manifest = tmp_path / "nightly.yaml"
    manifest.write_text(MANIFEST)
    worker = start_worker("cpu", env={"PORTQ_ISOLATE": "0"})
    env = {"PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": str(store_dir)}

    night1 = submit(env, manifest)
    assert cached(env, night1) == {"a": False, "b": False, "c": False}

    # night 2: b replaced, under the same name, by a model hundreds of times slower (it still passes parity)
    build(models, "b", width=1024, depth=4)
    night2 = submit(env, manifest)
    assert cached(env, night2) == {"a": True, "b": False, "c": True}  # only b converted again
    res = run_cli("compare", "--series", "nightly", "--format", "json", env=env)
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["baseline"], doc["new"]) == (night1, night2)
    assert [(r["model"], r["verdict"]) for r in doc["rows"]] == [
        ("a", "unchanged"), ("b", "regression"), ("c", "unchanged")]
    assert doc["rows"][1]["latency"]["change"] > 5
    assert "regression b/cpu/onnx" in res.stderr and "a/cpu" not in res.stderr and "c/cpu" not in res.stderr

    # night 3, identical, from the beat task on the worker: every job a cache hit, nothing regressed
    from portq.client.dispatch import producer

    producer(Settings.resolve(env={}, broker_url=queue_db)).send_task(
        "portq.nightly", kwargs={"manifest": str(manifest)}, queue="cpu")
    deadline = time.monotonic() + 120
    while True:
        nights = json.loads(run_cli("history", "nightly", "--format", "json", env=env).stdout)["nights"]
        if len(nights) == 3 and not nights[2]["counts"]["queued"] + nights[2]["counts"]["running"]:
            break
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.5)
    night3 = nights[2]["batch"]
    assert night3 not in (night1, night2)  # a third batch name on the same date: nightly-DATE-3
    assert [(n["cache_hits"], n["converted"], n["counts"]["failed"]) for n in nights] == [(0, 3, 0), (2, 1, 0),
                                                                                         (3, 0, 0)]
    assert "glob 'retired/*.pt'" in nights[2]["warnings"][0]
    res = run_cli("compare", "--series", "nightly", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"no regression between {night2} and {night3}" in res.stderr
    assert "Task portq.nightly[" in worker.output()
