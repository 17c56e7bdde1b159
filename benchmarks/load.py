"""The queue under load, on a Redis server of its own: step isolation's cost on small jobs, the queue's own
cost per job, and a worker's memory over many jobs.

    python benchmarks/load.py [--jobs 200] [--workers 2] [--queue-jobs 1000] [--memory-jobs 500] [--only PART]
    python benchmarks/load.py --quick     # 20 queue jobs and 10 memory jobs: checks the benchmark works (CI)

Parts (`--only isolation|queue|memory`; all by default):

- **isolation**: `--jobs` distinct tiny TorchScript models (no cache hits), converted to TorchScript with one
  latency run, on `--workers` fresh workers with a pool of `--concurrency` each (one worker with a pool of two,
  as `portq worker` runs on 2 cores), with step isolation on (the default: a step process kept for the next
  steps), on with a fresh process for every step (`PORTQ_STEP_REUSE=1`), and off, side by side, with where a job's
  time goes.
- **queue**: the queue's own cost per job, measured over `--queue-jobs` trivial jobs: copies of one tiny model
  under different names, so the first job converts it and every other one is served from the cache. What such a
  job costs is the queue's machinery and nothing else: the client writing the job's record and enqueueing it,
  the worker taking it from Redis, admitting it (the attempt counter), reading its records, finding its result,
  recording the outcome and acknowledging. Printed: the client's enqueue time per job, the worker's time per
  job (the median gap between successive jobs finishing on one worker process, and the task's own time as
  Celery logs it), and the whole batch's time per job.
- **memory**: a worker's memory over `--memory-jobs` distinct tiny jobs (one worker, a pool of two, recycling at
  its defaults: `PORTQ_MAX_TASKS_PER_CHILD` for the pool processes, `PORTQ_STEP_REUSE` for their step
  processes): the proportional set size (PSS: shared pages split between the
  processes sharing them, so the sum is honest) of the worker's whole process tree (main process, pool
  processes, their step forkservers and steps), sampled as the jobs complete.

Figures are printed, never asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def isolation(tmp: Path, server, jobs: int, workers: int, concurrency: int) -> None:
    from tests.conftest import WorkerProcess, run_cli
    from tests.worker.test_load import tiny_models

    paths = tiny_models(tmp / "models", jobs)
    from benchmarks.throughput import stage_breakdown

    print(f"isolation: {jobs} jobs, {workers} worker(s) with a pool of {concurrency}")
    modes = {"isolated (default)": {}, "isolated, fresh": {"PORTQ_STEP_REUSE": "1"},
             "in-process": {"PORTQ_ISOLATE": "0"}}
    for db, (name, env) in enumerate(modes.items()):
        store = tmp / f"store{db}"
        broker = server.url(db)
        procs = [WorkerProcess(broker, store, "cpu", tmp / f"{db}-w{i}.log", concurrency=concurrency, env=env)
                 for i in range(workers)]
        for w in procs:
            w.wait_ready()
        start = time.monotonic()
        res = run_cli("submit", *map(str, paths), "--batch", "load", "--format", "torchscript", "--runs", "1",
                      "--wait", env={"PORTQ_BROKER_URL": broker, "PORTQ_STORE": str(store), **env}, timeout=3600)
        elapsed = time.monotonic() - start
        for w in procs:
            w.stop()
        status = "ok" if res.returncode == 0 else f"exit {res.returncode}"
        stages = stage_breakdown(store, "load")
        where = ", ".join(f"{k} {v:.3f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])
                          if k not in ("queue wait", "job total") and v >= 0.005)
        print(f"  {name:20} {elapsed:7.1f}s  {jobs / elapsed:5.1f} jobs/s  ({status}); a job "
              f"{stages.get('job total', 0):.3f}s: {where}")


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def _wait_for(store, batch: str, total: int, timeout: float, on_poll=None) -> list:
    from portq.tasks.state import records

    deadline = time.monotonic() + timeout
    while True:
        recs = records.list_records(store, batch)
        done = [r for r in recs if r.status.finished]
        if on_poll is not None:
            on_poll(len(done))
        if len(done) >= total:
            return recs
        if time.monotonic() > deadline:
            raise TimeoutError(f"{batch}: {len(done)} of {total} jobs finished after {timeout:.0f}s")
        time.sleep(0.5)


def queue_cost(tmp: Path, server, jobs: int) -> None:
    import re

    from portq.tasks.state.store import Store

    from tests.conftest import WorkerProcess, run_cli
    from tests.worker.test_load import tiny_models

    models = tmp / "queue-models"
    first = tiny_models(models, 1)[0]
    for i in range(1, jobs):  # the same content under another name: the same job key, a cache hit
        shutil.copy(first, models / f"copy{i:04d}.pt")
        shutil.copy(first.with_suffix(".npz"), models / f"copy{i:04d}.npz")
    paths = [first, *sorted(models.glob("copy*.pt"))]
    store_dir, broker = tmp / "queue-store", server.url(5)
    env = {"PORTQ_BROKER_URL": broker, "PORTQ_STORE": str(store_dir)}
    worker = WorkerProcess(broker, store_dir, "cpu", tmp / "queue-w.log", concurrency=1)
    worker.wait_ready()
    try:
        start = time.monotonic()
        res = run_cli("submit", *map(str, paths), "--batch", "queue", "--format", "torchscript", "--runs", "1",
                      env=env, timeout=3600)
        enqueued = time.monotonic() - start
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-2000:])
        recs = _wait_for(Store(str(store_dir)), "queue", jobs, timeout=3600)
        elapsed = time.monotonic() - start
    finally:
        worker.stop()
    cached = sorted(_when(r.updated_at) for r in recs if r.cached)
    gaps = [b - a for a, b in zip(cached, cached[1:])]
    celery = [float(s) for s in re.findall(r"succeeded in ([0-9.]+)s", worker.output())]
    celery_cached = celery[1:]  # the first task converted the model
    ok = sum(r.status.value == "succeeded" for r in recs)
    print(f"queue: {jobs} trivial jobs (one conversion, then {len(cached)} cache hits), one worker process")
    print(f"  client: {enqueued:.1f}s to record and enqueue {jobs} jobs, {enqueued / jobs * 1000:.1f} ms a job "
          "(the command's start included)")
    if gaps:
        print(f"  worker: {statistics.median(gaps) * 1000:.1f} ms a job at the median between successive jobs "
              f"finishing (p90 {statistics.quantiles(gaps, n=10)[-1] * 1000:.1f} ms; clock resolution 1 ms)")
    if celery_cached:
        print(f"          {statistics.median(celery_cached) * 1000:.1f} ms a job at the median of the task's own "
              "time, as Celery logs it")
    if len(cached) > 1:
        print(f"  cache hits: {(cached[-1] - cached[0]) / (len(cached) - 1) * 1000:.1f} ms a job from the first to the "
              "last finishing")
    print(f"  whole batch: {elapsed:.1f}s from the submit command's start to the last job's record (the first "
          f"job's conversion included); {ok} of {jobs} succeeded")


def memory(tmp: Path, server, jobs: int) -> None:
    import psutil
    from portq.tasks.state.store import Store

    from tests.conftest import WorkerProcess, run_cli
    from tests.worker.test_load import tiny_models

    paths = tiny_models(tmp / "memory-models", jobs)
    store_dir, broker = tmp / "memory-store", server.url(6)
    env = {"PORTQ_BROKER_URL": broker, "PORTQ_STORE": str(store_dir)}
    worker = WorkerProcess(broker, store_dir, "cpu", tmp / "memory-w.log", concurrency=2)
    worker.wait_ready()
    samples: list[tuple[int, float, int]] = []  # (jobs done, MiB, processes)
    done_now = [0]
    stop = threading.Event()

    def tree_pss() -> tuple[float, int]:
        try:
            procs = [psutil.Process(worker.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            return 0.0, 0
        total = 0
        for p in procs:
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                continue
        return total / 2**20, len(procs)

    def sample() -> None:
        while not stop.is_set():
            mib, n = tree_pss()
            samples.append((done_now[0], mib, n))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        idle, _ = tree_pss()
        sampler.start()
        start = time.monotonic()
        res = run_cli("submit", *map(str, paths), "--batch", "memory", "--format", "torchscript", "--runs", "1",
                      env=env, timeout=3600)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-2000:])
        _wait_for(Store(str(store_dir)), "memory", jobs, timeout=3600,
                  on_poll=lambda n: done_now.__setitem__(0, n))
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        worker.stop()
    from portq.tasks.core.settings import Settings

    defaults = Settings.resolve(env={})
    print(f"memory: {jobs} jobs on one worker (a pool of 2, each recycled every {defaults.tasks_per_child} jobs, its "
          f"step process every {defaults.step_reuse} steps: the defaults) in {elapsed:.0f}s; "
          f"PSS of the worker's process tree, MiB (idle, before the batch: {idle:.0f})")
    print("  jobs done      mean    max   processes")
    step = max(1, jobs // 10)
    for lo in range(0, jobs, step):
        window = [(m, n) for d, m, n in samples if lo <= d < lo + step and m > 0]
        if window:
            print(f"  {lo:4d}-{min(lo + step, jobs) - 1:<4d}  {statistics.mean(m for m, _ in window):8.0f} "
                  f"{max(m for m, _ in window):6.0f}   {max(n for _, n in window):3d}")


def main() -> None:
    from tests.redis_server import RedisServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200, help="jobs of the isolation comparison")
    ap.add_argument("--workers", type=int, default=1, help="workers of the isolation comparison")
    ap.add_argument("--concurrency", type=int, default=2, help="each worker's pool size, isolation comparison")
    ap.add_argument("--queue-jobs", type=int, default=1000)
    ap.add_argument("--memory-jobs", type=int, default=500)
    ap.add_argument("--only", choices=["isolation", "queue", "memory"])
    ap.add_argument("--quick", action="store_true", help="the queue and memory parts, small: checks they work")
    args = ap.parse_args()
    if args.quick:
        args.queue_jobs, args.memory_jobs = 20, 10
    tmp = Path(tempfile.mkdtemp(prefix="portq-load-"))
    server = RedisServer(tmp / "redis").start()
    try:
        if args.only in (None, "queue"):
            queue_cost(tmp, server, args.queue_jobs)
        if args.only in (None, "memory"):
            memory(tmp, server, args.memory_jobs)
        if args.only in (None, "isolation") and not args.quick:
            isolation(tmp, server, args.jobs, args.workers, args.concurrency)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
