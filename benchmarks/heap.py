"""Eager PyTorch against glibc's heap: one model timed in fresh processes, with glibc's thresholds as they start and
held steady (`portq.tasks.checks.heap`, what a job does while it times), beside its ONNX export in onnxruntime.

    python benchmarks/heap.py [--processes 3] [--seconds 1.5]

The model is the optimization benchmark's ResNet-style CNN (3 residual blocks, width 32) at 8x3x64x64. Each process
times each side alone, in four consecutive stretches (medians), so a drift within a process shows as well as the
difference between processes. Nothing is asserted; docs/benchmarks.md has a dated run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from portq.tasks.checks import heap
from tests.models_optimize import benchmark_cnn

mode, onnx_path, seconds = sys.argv[2], sys.argv[3], float(sys.argv[4])
model, x = benchmark_cnn()

def stretch(fn):
    for _ in range(3):
        fn()
    runs, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return round(statistics.median(runs) * 1e3, 2)

out = {}
with torch.inference_mode():
    if mode == "ort":
        import onnxruntime as ort
        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        out["ms"] = [stretch(lambda: session.run(None, feed)) for _ in range(4)]
    elif mode == "steady":
        with heap.steady():
            out["ms"] = [stretch(lambda: model(x)) for _ in range(4)]
    else:
        out["ms"] = [stretch(lambda: model(x)) for _ in range(4)]
print(json.dumps(out))
"""


#: what each child process times (its mode) and how the table names it
SIDES = {"default": "eager, glibc's thresholds as they start", "steady": "eager, heap held steady",
         "ort": "onnxruntime (its own arena)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.5, help="length of each timed stretch")
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(ROOT))
    from tests.models_optimize import benchmark_cnn

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = str(Path(tmp) / "cnn.onnx")
        model, x = benchmark_cnn()
        torch.onnx.export(model, (x,), onnx_path, dynamo=False)
        rows = []
        for i in range(args.processes):
            for mode, label in SIDES.items():
                done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), mode, onnx_path, str(args.seconds)],
                                      capture_output=True, text=True, check=True)
                ms = json.loads(done.stdout.strip().splitlines()[-1])["ms"]
                rows.append((i + 1, label, ms))
                print(f"process {i + 1}: {label}: " + ", ".join(f"{m:.2f}" for m in ms) + " ms", flush=True)
    print("\n| process | side | four stretches, median ms each |\n|---|---|---|")
    for i, label, ms in rows:
        print(f"| {i} | {label} | {', '.join(f'{m:.1f}' for m in ms)} |")


if __name__ == "__main__":
    main()
