"""What paired latency costs a job: the quick start's batch timed with this tree's portq and with an older one,
alternating, on the same machine.

    python benchmarks/paired_cost.py OLD_COMMIT [--runs 3] [--cnn]

OLD_COMMIT is checked out (`git worktree`) into a temporary folder and laid out as an installed package (portq,
portq.client, portq.worker, portq.tasks, as pyproject's package-dir maps them), then imported through
PYTHONPATH ahead of this tree's editable install. Each run converts the three example models (`portq examples`;
with `--cnn`, one larger model instead) on the embedded default with `--force` (no cache hits), old then new,
then new then old on the next run (ABBA), each into a store of its own. Printed: each batch's wall time, its
jobs' own time (each report's `duration_s`) and its timing stages (each job's `source` stage, its parity runs and,
before this tree, its timing alone, plus each artifact's `latency` stage), and the medians. Nothing is asserted:
the claim it measures is "paired measurement does not make jobs slower than before".
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


def run_batch(label: str, env: dict[str, str], cwd: Path) -> tuple[float, float, float]:
    """(the batch's wall time, its jobs' timing stages, its jobs' own time): the timing stages are the source stage
    (its parity runs and, before this tree, its timing alone) and each artifact's latency stage."""
    models = sorted(str(p) for p in (cwd / "models").glob("*.pt*"))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "portq.client", "submit", *models, "--batch", label, "--force"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    took = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"batch {label} failed:\n{done.stderr}")
    report = json.loads(subprocess.run([sys.executable, "-m", "portq.client", "report", label, "--json"], env=env,
                                       cwd=cwd, capture_output=True, text=True, check=True).stdout)
    timing = jobs = 0.0
    for job in report["jobs"]:
        full = json.loads(Path(job["report"]).read_text()) if job.get("report") else {}
        timing += float((full.get("timings") or {}).get("source") or 0.0)
        jobs += float(full.get("duration_s") or 0.0)
        for art in job.get("artifacts", []):
            timing += float(((art.get("timings") or {}).get("latency")) or 0.0)
    return took, timing, jobs


def write_cnn(into: Path) -> None:
    """The optimization benchmark's CNN as a user submits it: a TorchScript trace and its sample."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.models_optimize import benchmark_cnn

    into.mkdir(parents=True)
    model, x = benchmark_cnn()
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, (x,)), into / "cnn.pt")
    np.savez(into / "cnn.npz", x=x.numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="the commit to compare against (e.g. the one before paired latency)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cnn", action="store_true", help="instead of the example models, one larger model: the "
                        "optimization benchmark's ResNet-style CNN (3 blocks, width 32, 8x3x64x64), traced")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        site = lay_out(args.old, base)
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")}
            if args.cnn:
                write_cnn(base / "models")
            else:
                subprocess.run([sys.executable, "-m", "portq.client", "examples", str(base / "models")], env=env,
                               check=True, capture_output=True)
            sides = {"old": {**env, "PYTHONPATH": str(site), "PORTQ_STORE": str(base / "store-old")},
                     "new": {**env, "PORTQ_STORE": str(base / "store-new")}}
            times: dict[str, list[tuple[float, float, float]]] = {"old": [], "new": []}
            for i in range(args.runs):
                order = ["old", "new"] if i % 2 == 0 else ["new", "old"]
                for side in order:
                    times[side].append(run_batch(f"{side}{i}", sides[side], base))
                    wall, timing, jobs = times[side][-1]
                    print(f"run {i + 1} {side}: batch {wall:.2f} s, jobs {jobs:.2f} s, timing stages {timing:.2f} s",
                          flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base / "tree")], check=False)
    print(f"\n| side | batch wall s (median of {args.runs}) | timing stages s (source + latency) | jobs' own time s |"
          "\n|---|---|---|---|")
    for side in ("old", "new"):
        print(f"| {side} ({args.old if side == 'old' else 'this tree'}) | "
              + " | ".join(f"{statistics.median(t[k] for t in times[side]):.2f}" for k in range(3)) + " |")


if __name__ == "__main__":
    main()
