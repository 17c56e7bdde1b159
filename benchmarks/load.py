"""Queue throughput for small jobs, settings side by side in one run, on a Redis server of its own.

    python benchmarks/load.py [--jobs 200] [--workers 2]

Each variant submits the same number of distinct tiny TorchScript models (no cache hits) converted to
TorchScript with one latency run, to fresh workers and a fresh store, and waits for the batch.
Variants: step isolation on (the default) and off.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from tests.conftest import WorkerProcess, run_cli
    from tests.redis_server import RedisServer
    from tests.worker.test_load import tiny_models

    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="portq-load-"))
    paths = tiny_models(tmp / "models", args.jobs)
    server = RedisServer(tmp / "redis").start()
    print(f"{args.jobs} jobs, {args.workers} workers (concurrency 1 each)")
    try:
        for db, (name, env) in enumerate({"isolated (default)": {}, "in-process": {"PORTQ_ISOLATE": "0"}}.items()):
            store = tmp / f"store{db}"
            broker = server.url(db)
            workers = [WorkerProcess(broker, store, "cpu", tmp / f"{db}-w{i}.log", env=env)
                       for i in range(args.workers)]
            for w in workers:
                w.wait_ready()
            start = time.monotonic()
            res = run_cli("submit", *map(str, paths), "--batch", "load", "--format", "torchscript", "--runs", "1",
                          "--wait", env={"PORTQ_BROKER_URL": broker, "PORTQ_STORE": str(store), **env}, timeout=3600)
            elapsed = time.monotonic() - start
            for w in workers:
                w.stop()
            status = "ok" if res.returncode == 0 else f"exit {res.returncode}"
            print(f"  {name:20} {elapsed:7.1f}s  {args.jobs / elapsed:5.1f} jobs/s  ({status})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
