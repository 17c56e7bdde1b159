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
