"""GPU workers without a GPU: what can be checked on CPU is that each pool process pins its own GPU."""

import re
from collections import defaultdict

import pytest

from tests.conftest import WorkerProcess, run_cli

pytestmark = pytest.mark.queue

PIN = re.compile(r"pool process (\d+) \(slot (\d+)\) pinned to GPU (\S+) \(CUDA_VISIBLE_DEVICES=(\S+)\)")


def test_each_pool_process_pins_its_own_gpu_and_keeps_it_when_recycled(example_models, queue_db, store_dir,
                                                                        tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the jobs would succeed; this test checks pinning where they fail")
    env = {"PORTQ_GPUS": "4,7", "PORTQ_MAX_TASKS_PER_CHILD": "1"}
    worker = WorkerProcess(queue_db, store_dir, "gpu", tmp_path / "w.log", concurrency=2, env=env).wait_ready()
    try:
        res = run_cli("submit", *[str(example_models["mlp"])] * 4, "--target", "cuda", "--batch", "pins", "--wait",
                      "--timeout", "180", env={"PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": str(store_dir)})
        assert res.returncode == 1  # no CUDA here: every job fails, in a pinned process
    finally:
        worker.stop()
    pins = PIN.findall(worker.output())
    by_slot = defaultdict(set)
    for _pid, slot, gpu, visible in pins:
        assert gpu == visible
        by_slot[slot].add(gpu)
    assert by_slot == {"0": {"4"}, "1": {"7"}}  # one GPU per slot, for the worker's lifetime
    assert len({pid for pid, *_ in pins}) >= 4  # processes were recycled after each job and re-pinned
    seen = set(re.findall(r"CUDA_VISIBLE_DEVICES='(\d+)'", worker.output()))
    assert seen <= {"4", "7"} and seen  # the jobs ran in processes that see only their own GPU


def test_a_cuda_job_runs_on_a_real_gpu_worker_through_redis(example_models, queue_db, store_dir, tmp_path):
    """Where CUDA is present, a cuda job goes through Redis to a `gpu` worker and runs on the GPU."""
    import json

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the pinning test above covers CPU-only machines)")
    from portq.tasks.core.contract import JobReport

    from tests.tasks.execution.test_cuda import assert_ran_on_the_gpu

    worker = WorkerProcess(queue_db, store_dir, "gpu", tmp_path / "w.log", concurrency=1,
                           env={"PORTQ_GPUS": "0"}).wait_ready()
    env = {"PORTQ_BROKER_URL": queue_db, "PORTQ_STORE": str(store_dir)}
    try:
        res = run_cli("submit", str(example_models["convnet"]), "--target", "cuda", "--batch", "gpuq", "--wait",
                      "--timeout", "600", *[a for f in ("onnx", "torchscript", "pt2", "aoti") for a in ("-f", f)],
                      env=env, timeout=700)
    finally:
        worker.stop()
    doc = json.loads(run_cli("report", "gpuq", "--json", env=env).stdout)
    (job,) = doc["jobs"]
    report = JobReport.model_validate(json.loads(open(job["report"]).read()))
    assert report.worker and report.worker.startswith("test-gpu-"), report.worker
    assert_ran_on_the_gpu(report)
    assert res.returncode in (0, 1), res.stderr  # 1 only where onnxruntime has no CUDA provider
