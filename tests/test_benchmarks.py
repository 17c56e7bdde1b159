"""The benchmarks run (quick mode): CI checks they work; their numbers are read by people, never asserted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.queue]


def test_the_throughput_benchmark_runs_in_quick_mode(redis_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick"], capture_output=True,
                         text=True, env=env, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    modes = [("sequential loop", "3/3 close"), ("portq embedded (one process", "(exit 0)"),
             ("portq embedded, the same batch again", "(exit 0)"), ("portq, two workers on Redis", "(exit 0)")]
    for mode, outcome in modes:
        line = next((x for x in lines if x.startswith(mode)), "")
        assert "x the loop" in line and outcome in line, res.stdout
    assert "where a job's time goes" in res.stdout and "artifact export" in res.stdout


def test_the_load_benchmark_runs_in_quick_mode(redis_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load.py"), "--quick"], capture_output=True,
                         text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "queue: 20 trivial jobs (one conversion, then 19 cache hits)" in out, out
    assert "ms a job at the median between successive jobs finishing" in out and "20 of 20 succeeded" in out, out
    assert "memory: 10 jobs on one worker" in out and "jobs done" in out, out


def test_the_first_run_benchmark_runs_in_quick_mode():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "first_run.py"), "--quick", "--optimum", ""],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    # portq's two rows were measured (a failure prints its exit status instead of a time); the peers, not given
    for row in ("bert: portq (embedded, ONNX, parity and latency)", "cnn: portq (embedded, ONNX and TorchScript"):
        line = next((x for x in out.splitlines() if row in x), "")
        assert line.rstrip().endswith(" s") and "exit" not in line, out
    assert "not measured: no optimum-cli" in out and "not measured: no interpreter with model_navigator" in out, out


def test_the_heap_benchmark_runs_briefly():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "heap.py"), "--processes", "1",
                          "--seconds", "0.05"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 1 |")]
    assert [r.split("|")[2].strip() for r in rows] == [
        "eager, glibc's thresholds as they start", "eager, heap held steady", "onnxruntime (its own arena)"], res.stdout
