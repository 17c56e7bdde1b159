"""The environment fingerprint, checked against what other tools say about the machine, not the calls it makes."""

import json
import shutil
import subprocess
import sys

import numpy
import onnxruntime
import pytest
import torch
from portq.tasks.checks.fingerprint import cpu_model, environment

FINGERPRINT = "import json, sys; from portq.tasks.checks.fingerprint import environment; " \
              "print(json.dumps(environment('cpu')))"


def _fingerprint_in(cmd_prefix: list[str], env: dict[str, str] | None = None) -> dict:
    import os

    out = subprocess.run([*cmd_prefix, sys.executable, "-c", FINGERPRINT], capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {})}).stdout
    return json.loads(out)


def test_versions_are_the_packages_own():
    env = environment("cpu")
    assert env["device"] == "cpu"
    assert env["versions"]["torch"] == torch.__version__
    assert env["versions"]["onnxruntime"] == onnxruntime.__version__
    assert env["versions"]["numpy"] == numpy.__version__
    assert "gpu" not in env or torch.cuda.is_available()
    assert "CPUExecutionProvider" in env["onnxruntime_providers_available"]


@pytest.mark.skipif(shutil.which("nproc") is None or shutil.which("taskset") is None, reason="needs coreutils/taskset")
def test_cores_affinity_and_threads_follow_the_process():
    cores = int(subprocess.run(["nproc", "--all"], capture_output=True, text=True, check=True).stdout)
    pinned = _fingerprint_in(["taskset", "-c", "0"], env={"OMP_NUM_THREADS": "1"})
    assert pinned["cpu"]["logical_cores"] == cores
    assert pinned["cpu"]["affinity"] == 1  # taskset gave it one CPU
    assert pinned["threads"]["torch_intra_op"] == 1 and pinned["threads"]["OMP_NUM_THREADS"] == "1"


def test_cpu_model_reads_the_kernels_name(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n"
                   "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n")
    assert cpu_model(x86) == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n\nHardware\t: BCM2835\n")
    assert cpu_model(arm) == "BCM2835"


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="needs lscpu")
def test_cpu_model_agrees_with_lscpu():
    out = subprocess.run(["lscpu"], capture_output=True, text=True, env={"LC_ALL": "C"}).stdout
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")]
    if not names:
        pytest.skip("lscpu names no model on this machine")
    assert cpu_model() == names[0]
