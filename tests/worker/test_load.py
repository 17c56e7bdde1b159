"""Load: 500 small jobs on two workers complete, none twice.

What dominates a small job is fixed cost, not conversion: so each job is a distinct tiny TorchScript
model (distinct content, so no cache hits) converted to TorchScript (the passthrough route, a copy),
with one timed latency run. The run prints its timing (`pytest -s`); `benchmarks/load.py` compares
settings side by side.
"""

import re
import time
from collections import Counter

import pytest
from portq.tasks.core.contract import JobStatus
from portq.tasks.state import records as batches
from portq.tasks.state.store import Store

from tests.conftest import WorkerProcess, run_cli

pytestmark = [pytest.mark.queue, pytest.mark.slow]

N = 500


def tiny_models(directory, n):
    """n TorchScript models that differ in one weight: traced once, saved n times."""
    import numpy as np
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = torch.jit.trace(torch.nn.Linear(4, 2).eval(), torch.zeros(1, 4))
    paths = []
    with torch.no_grad():
        for i in range(n):
            module.bias[0] = float(i)
            path = directory / f"m{i:03d}.pt"
            torch.jit.save(module, str(path))
            np.savez(path.with_suffix(".npz"), x=np.ones((1, 4), dtype=np.float32))
            paths.append(path)
    return paths


def test_500_jobs_on_two_workers_complete_none_twice(tmp_path, queue_db, store_dir, record_property):
    paths = tiny_models(tmp_path / "models", N)
    env = {"PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": str(store_dir)}
    workers = [WorkerProcess(queue_db, store_dir, "cpu", tmp_path / f"w{i}.log") for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        start = time.monotonic()
        res = run_cli("submit", *map(str, paths), "--batch", "load", "--format", "torchscript", "--runs", "1",
                      "--wait", "--timeout", "900", env=env, timeout=1000)
        elapsed = time.monotonic() - start
        assert res.returncode == 0, res.stderr[-3000:]
    finally:
        for w in workers:
            w.stop()
    recs = batches.list_records(Store(str(store_dir)), "load")
    assert len(recs) == N and all(r.status is JobStatus.succeeded for r in recs)
    assert all(r.attempts == 1 for r in recs)
    done = Counter(re.findall(r"job (j[0-9a-f]+) \([^)]*\): succeeded", "".join(w.output() for w in workers)))
    assert done == Counter({r.job_id: 1 for r in recs})  # every job once, none twice
    per_worker = [len(re.findall(r": succeeded", w.output())) for w in workers]
    assert all(n > 0 for n in per_worker) and sum(per_worker) == N
    assert len(list((store_dir / "results").iterdir())) == N
    # the figure is recorded (junit property, and printed), never asserted: the machine is shared and noisy
    record_property("jobs_per_second", round(N / elapsed, 2))
    print(f"\nload: {N} jobs on 2 workers in {elapsed:.1f}s ({N / elapsed:.1f} jobs/s); per worker {per_worker}")
