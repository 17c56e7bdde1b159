"""A job's share of the cores: PORTQ_THREADS, else the usable cores divided among the host's pool processes."""

from __future__ import annotations

import os

import pytest
from portq.tasks.checks import threads


def test_the_cores_are_shared_among_the_pool_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.delenv(threads.POOL_PROCESSES_ENV, raising=False)
    assert threads.job_threads() == 8  # the embedded default: one process has them all
    monkeypatch.setenv(threads.POOL_PROCESSES_ENV, "3")
    assert threads.job_threads() == 2
    monkeypatch.setenv(threads.POOL_PROCESSES_ENV, "16")
    assert threads.job_threads() == 1  # never zero
    assert threads.job_threads(configured=5) == 5  # PORTQ_THREADS wins
    monkeypatch.setenv(threads.POOL_PROCESSES_ENV, "junk")
    assert threads.job_threads() == 8


def test_a_cgroup_quota_bounds_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(64)))
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)  # a container given 1.5 CPUs
    assert threads.usable_cores() == 2
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.usable_cores() == 64


def test_applied_threads_reach_torch_and_onnxruntime(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from portq.tasks.checks.runtimes import OrtRuntime

    before = torch.get_num_threads()
    from portq.tasks.checks import runtimes

    monkeypatch.setattr(runtimes, "JOB_THREADS", None)  # restored afterwards: other tests see the default
    try:
        threads.apply(1)
        assert torch.get_num_threads() == 1 and threads.applied() == 1
        model = torch.nn.Linear(4, 2)
        path = tmp_path / "m.onnx"
        torch.onnx.export(model, (torch.randn(1, 4),), str(path), dynamo=False)
        runtime = OrtRuntime(str(path), "cpu")
        assert runtime.session_options.intra_op_num_threads == 1
        assert OrtRuntime(str(path), "cpu", {"intra_op_threads": 2}).session_options.intra_op_num_threads == 2
    finally:
        threads.apply(before)
