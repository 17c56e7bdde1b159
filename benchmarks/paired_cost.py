"""What paired latency costs a job: the quick start's batch timed with this tree's portq and with an older one,
alternating, on the same machine.

    python benchmarks/paired_cost.py OLD_COMMIT [--runs 3]

OLD_COMMIT is checked out (`git worktree`) into a temporary folder and laid out as an installed package (portq,
portq.client, portq.worker, portq.tasks, as pyproject's package-dir maps them), then imported through
PYTHONPATH ahead of this tree's editable install. Each run converts the three example models (`portq examples`)
on the embedded default with `--force` (no cache hits), old then new, then new then old on the next run (ABBA),
each into a store of its own. Printed: each batch's wall time and its jobs' latency stage (the report's
`timings`), and the medians. Nothing is asserted: the claim it measures is "paired measurement does not make
jobs slower than before".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"portq": "client/top_level", "portq/client": "client", "portq/worker": "worker", "portq/tasks": "tasks"}


def lay_out(commit: str, into: Path) -> Path:
    """The commit's tree as an importable `portq` under `into/site` (symlinks into a worktree)."""
    tree = into / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), commit], check=True)
    site = into / "site"
    (site / "portq").mkdir(parents=True)
    for name in os.listdir(tree / LAYOUT["portq"]):
        (site / "portq" / name).symlink_to(tree / LAYOUT["portq"] / name)
    for dest, src in LAYOUT.items():
        if dest != "portq":
            (site / dest).symlink_to(tree / src)
    return site


def run_batch(label: str, env: dict[str, str], cwd: Path) -> tuple[float, float]:
    models = sorted(str(p) for p in (cwd / "models").glob("*.pt*"))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "portq.client", "submit", *models, "--batch", label, "--force"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    took = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"batch {label} failed:\n{done.stderr}")
    report = json.loads(subprocess.run([sys.executable, "-m", "portq.client", "report", label, "--json"], env=env,
                                       cwd=cwd, capture_output=True, text=True, check=True).stdout)
    latency = 0.0
    for job in report["jobs"]:
        for art in job.get("artifacts", []):
            latency += float(((art.get("timings") or {}).get("latency")) or 0.0)
    return took, latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="the commit to compare against (e.g. the one before paired latency)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        site = lay_out(args.old, base)
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")}
            subprocess.run([sys.executable, "-m", "portq.client", "examples", str(base / "models")], env=env,
                           check=True, capture_output=True)
            sides = {"old": {**env, "PYTHONPATH": str(site), "PORTQ_STORE": str(base / "store-old")},
                     "new": {**env, "PORTQ_STORE": str(base / "store-new")}}
            times: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
            for i in range(args.runs):
                order = ["old", "new"] if i % 2 == 0 else ["new", "old"]
                for side in order:
                    times[side].append(run_batch(f"{side}{i}", sides[side], base))
                    print(f"run {i + 1} {side}: batch {times[side][-1][0]:.1f} s, latency stages "
                          f"{times[side][-1][1]:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base / "tree")], check=False)
    print(f"\n| side | batch wall s (median of {args.runs}) | latency stages s (median) |\n|---|---|---|")
    for side in ("old", "new"):
        print(f"| {side} ({args.old if side == 'old' else 'this tree'}) | "
              f"{statistics.median(t for t, _ in times[side]):.1f} | "
              f"{statistics.median(lat for _, lat in times[side]):.1f} |")


if __name__ == "__main__":
    main()
