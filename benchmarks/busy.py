"""Latency on a quiet machine against a busy one: the example models' speedups, each with its interval and
verdict, measured quiet and then while busy processes hold every core.

    python benchmarks/busy.py [--busy N] [--runs 2]

Each run converts the three example models (`portq examples`) on the embedded default, as the quick start does
(`--force`: no cache hits), once quiet and once with N busy processes (default: one per core), `--runs` times
alternating. Printed: a Markdown table per model and artifact (quiet and busy speedup with the interval, the
threads the comparison ran with, and the verdict), and the batches' wall times. Nothing is asserted here: the
test `tests/tasks/checks/test_latency_under_load.py` asserts the rule (within 2x of quiet, or inconclusive).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def portq(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "portq.client", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=1800)


def run_batch(name: str, env: dict[str, str], cwd: Path) -> tuple[float, dict]:
    models = sorted(str(p) for p in (cwd / "models").glob("*.pt*"))
    start = time.monotonic()
    done = portq("submit", *models, "--batch", name, "--force", env=env, cwd=cwd)
    took = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"batch {name} failed:\n{done.stderr}")
    report = json.loads(portq("report", name, "--json", env=env, cwd=cwd).stdout)
    rows = {(job["model"], art["id"]): art["latency"] for job in report["jobs"] for art in job["artifacts"]
            if art.get("latency")}
    return took, rows


def cell(lat: dict) -> str:
    low, high = lat.get("speedup_interval") or (lat["speedup"], lat["speedup"])
    threads = (lat.get("comparison") or {}).get("threads", "?")
    verdict = "inconclusive" if lat.get("inconclusive") else "conclusive"
    return f"{lat['speedup']:.2f}x ({low:.2f}-{high:.2f}), {threads} thr, {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes while loaded")
    parser.add_argument("--runs", type=int, default=2, help="quiet/busy pairs of batches")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")}
        env["PORTQ_STORE"] = str(cwd / "store")
        portq("examples", "models", env=env, cwd=cwd)
        results: list[tuple[str, float, dict]] = []
        for i in range(args.runs):
            results.append(("quiet", *run_batch(f"quiet{i}", env, cwd)))
            spin = "import time\nend = time.time() + 1800\nwhile time.time() < end: pass"
            busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(args.busy)]
            try:
                results.append(("busy", *run_batch(f"busy{i}", env, cwd)))
            finally:
                for proc in busy:
                    proc.kill()
                    proc.wait()
    print(f"# {os.cpu_count()} cores, {args.busy} busy processes while loaded\n")
    print("| model / artifact | run | quiet | busy | busy / quiet |")
    print("|---|---|---|---|---|")
    for i in range(args.runs):
        quiet, busy = results[2 * i][2], results[2 * i + 1][2]
        for key in sorted(quiet):
            ratio = busy[key]["speedup"] / quiet[key]["speedup"]
            print(f"| {key[0]} / {key[1]} | {i + 1} | {cell(quiet[key])} | {cell(busy[key])} | {ratio:.2f} |")
    print()
    for label, took, _ in results:
        print(f"{label} batch: {took:.1f} s")


if __name__ == "__main__":
    main()
