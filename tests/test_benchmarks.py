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
    for mode in ("sequential loop", "portq embedded (one process", "portq, two workers on Redis", "cache hits"):
        line = next((x for x in res.stdout.splitlines() if x.startswith(mode)), None)
        assert line is not None and "x the loop" in line and "(exit 0)" in line or "close)" in line, res.stdout
    assert "where a job's time goes" in res.stdout and "artifact export" in res.stdout
