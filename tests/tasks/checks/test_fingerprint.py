"""The environment fingerprint, checked against what the machine itself says."""

import os
from importlib import metadata
from pathlib import Path

import torch
from portq.tasks.checks.fingerprint import cpu_model, environment


def test_fingerprint_on_cpu():
    env = environment("cpu")
    assert env["device"] == "cpu"
    assert env["cpu"]["logical_cores"] == os.cpu_count()
    assert env["cpu"]["affinity"] == len(os.sched_getaffinity(0))
    assert env["threads"]["torch_intra_op"] == torch.get_num_threads()
    assert env["threads"]["torch_inter_op"] == torch.get_num_interop_threads()
    for name in ("torch", "onnxruntime", "portq", "numpy"):
        assert env["versions"][name] == metadata.version(name)
    assert "gpu" not in env or torch.cuda.is_available()
    assert "CPUExecutionProvider" in env["onnxruntime_providers_available"]


def test_cpu_model_is_the_kernels_name():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")]
    if names:
        assert cpu_model() == names[0]
