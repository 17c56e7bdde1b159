"""How many CPU threads a job's process computes with: its share of the cores, not all of them.

torch and onnxruntime each size their thread pools to every core they can see. One process per host is
then right, but two worker processes on a 2-core host run four compute threads on two cores, and
OpenMP's spinning threads make that far slower than two processes of one thread each (measured with
`benchmarks/throughput.py`: two workers took 3.1x the sequential loop, the source model's timing alone
5.8 s a job instead of 0.2 s). So a job's process limits torch's intra-op pool, and the onnxruntime
sessions it opens, to `job_threads`: `PORTQ_THREADS` when set, else the cores this process may use
(CPU affinity and a container's CPU quota) divided by the job processes on the host (a worker's
concurrency; 1 for the embedded default). An isolated step's child applies the same number.

Latency evidence says which thread count it was measured with (the environment fingerprint).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: set by the worker's main process from its concurrency, inherited by its pool processes
POOL_PROCESSES_ENV = "PORTQ_POOL_PROCESSES"


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, bounded by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """CPUs granted by a cgroup quota (v2 `cpu.max`, v1 `cfs_quota_us / cfs_period_us`), None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def job_threads(configured: int | None = None) -> int:
    """The threads one job's process computes with: `configured` (PORTQ_THREADS), or its share of the cores."""
    if configured:
        return configured
    try:
        processes = max(1, int(os.environ.get(POOL_PROCESSES_ENV, "1")))
    except ValueError:
        processes = 1
    return max(1, usable_cores() // processes)


def apply(threads: int | None) -> None:
    """Limit this process's torch intra-op pool (and the onnxruntime sessions it opens) to `threads`; None
    leaves the libraries' defaults."""
    if not threads:
        return
    import torch
    from portq.tasks.checks import runtimes

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    runtimes.JOB_THREADS = threads


def applied() -> int | None:
    """The limit `apply` set in this process (None: the libraries' defaults)."""
    from portq.tasks.checks import runtimes

    return runtimes.JOB_THREADS
