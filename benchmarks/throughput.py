"""Throughput, side by side in one run: a hand-written sequential loop, portq's embedded default, and two
workers on Redis, on the same batch of small models of diverse architectures; plus step isolation's cost
(each of the embedded default and the pool against itself with its steps in-process), a cached resubmit, and
where each job's time goes (the `timings` every job report carries).

    python benchmarks/throughput.py [--quick] [--models N]

The loop is what a user would write: load the ExportedProgram, `torch.onnx.export` it, open it in
onnxruntime, compare one output with eager PyTorch. portq does more per model (parity on several samples,
latency of the source and the artifact until stable, a reproduce script, reports), so the comparison is
the cost of that evidence. Each mode gets its own store (no cache hits between modes). The two workers (one
`portq worker` with a pool of two processes, as `portq worker --queue cpu` starts on a 2-core machine)
are started, warm, before their clock starts, as a pool is. `--quick` runs 3 models to check the
benchmark works (CI runs it so); the ratios mean little then.
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
sys.path.insert(0, str(ROOT))

#: zoo cases that need nothing beyond torch (no transformers), of different families
CASES = ["resnet", "depthwise_cnn", "unet", "lstm_tagger", "gru_regressor", "audio_conv1d", "mlp_mixer",
         "torch_transformer", "causal_decoder", "masked_mha", "topk_head", "dict_outputs", "two_inputs",
         "nested_outputs", "convnext"]


def build_models(directory: Path, n: int) -> list[Path]:
    """n ExportedPrograms (with their example inputs inside) from the zoo's torch-only cases."""
    import torch

    from tests.zoo.models import ZOO, build

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in [c for c in CASES if c in ZOO][:n]:
        module, args = build(name)
        try:
            program = torch.export.export(module.eval(), tuple(args))
        except Exception:  # a case torch.export cannot take: the loop could not either
            continue
        path = directory / f"{name}.pt2"
        torch.export.save(program, path)
        paths.append(path)
    return paths


def sequential_loop(paths: list[Path], out: Path) -> tuple[float, int]:
    """The loop a user writes: export each to ONNX and check it once against eager PyTorch."""
    code = r'''
import sys, time, numpy as np, torch, onnxruntime as ort
out = sys.argv[1]
ok = 0
start = time.perf_counter()
for i, path in enumerate(sys.argv[2:]):
    program = torch.export.load(path)
    args = program.example_inputs[0]
    onnx_path = f"{out}/m{i}.onnx"
    torch.onnx.export(program, args, onnx_path, dynamo=True, external_data=False)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feed = {x.name: a.numpy() for x, a in zip(session.get_inputs(), args)}
    got = session.run(None, feed)[0]
    ref = program.module()(*args)
    ref = ref if isinstance(ref, torch.Tensor) else torch.utils._pytree.tree_leaves(ref)[0]
    ok += bool(np.allclose(got, ref.detach().numpy(), atol=1e-4, rtol=1e-3))
print(ok, time.perf_counter() - start)
'''
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, str(out), *map(str, paths)], capture_output=True, text=True,
                         check=True)
    ok = int(res.stdout.split()[-2])
    return time.perf_counter() - start, ok


def portq(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """The real CLI, as a user runs it (a fresh process: its imports are part of the time)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")} | env
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "portq.client", *args], capture_output=True, text=True, env=full)
    return time.perf_counter() - start, res


def _wait_warm(worker: object, processes: int, timeout: float = 180) -> None:
    """Until each pool process has logged that it is warm (imports and its step forkserver's, done)."""
    deadline = time.monotonic() + timeout
    while worker.output().count("pool process warm") < processes:  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            raise TimeoutError("the pool did not warm up:\n" + worker.output())  # type: ignore[attr-defined]
        time.sleep(0.2)


def stage_breakdown(store: Path, batch: str) -> dict[str, float]:
    """Mean seconds per stage over the batch's job reports (artifact stages summed per job)."""
    totals: dict[str, list[float]] = {}
    for report_file in store.glob("results/*/report.json"):
        report = json.loads(report_file.read_text())
        if report.get("batch") != batch:
            continue
        stages = dict(report.get("timings") or {})
        stages.pop("artifacts", None)
        for a in report.get("artifacts", []):
            for k, v in (a.get("timings") or {}).items():
                if k != "step":
                    stages[f"artifact {k}"] = stages.get(f"artifact {k}", 0.0) + v
        stages["queue wait"] = report.get("queued_s") or 0.0
        stages["job total"] = report.get("duration_s") or 0.0
        for k, v in stages.items():
            totals.setdefault(k, []).append(v)
    return {k: statistics.mean(v) for k, v in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 models: checks the benchmark works")
    ap.add_argument("--models", type=int, default=12)
    args = ap.parse_args()
    from portq.tasks.checks.fingerprint import environment
    from portq.tasks.reports.content import environment_line

    from tests.conftest import WorkerProcess
    from tests.redis_server import RedisServer

    n = 3 if args.quick else args.models
    tmp = Path(tempfile.mkdtemp(prefix="portq-throughput-"))
    paths = build_models(tmp / "models", n)
    files = list(map(str, paths))
    light = ["--runs", "10"] if args.quick else []
    print(f"machine: {environment_line(environment('cpu'))}")
    print(f"{len(paths)} models: {', '.join(p.stem for p in paths)}")
    rows: list[tuple[str, float, str]] = []

    loop_s, ok = sequential_loop(paths, tmp / "loop")
    rows.append(("sequential loop (torch.onnx.export + one onnxruntime check)", loop_s, f"{ok}/{len(paths)} close"))

    embedded_store = tmp / "embedded"
    t, res = portq(["submit", *files, "--batch", "emb", *light], {"PORTQ_STORE": str(embedded_store)})
    rows.append(("portq embedded (one process, isolated steps)", t, f"exit {res.returncode}"))
    t, res = portq(["submit", *files, "--batch", "emb-in", *light],
                   {"PORTQ_STORE": str(tmp / "embedded-inprocess"), "PORTQ_ISOLATE": "0"})
    rows.append(("portq embedded, steps in-process (PORTQ_ISOLATE=0)", t, f"exit {res.returncode}"))
    t, res = portq(["submit", *files, "--batch", "emb-again", *light], {"PORTQ_STORE": str(embedded_store)})
    rows.append(("portq embedded, the same batch again (cache hits)", t, f"exit {res.returncode}"))

    server = RedisServer(tmp / "redis").start()
    try:
        queue_store = tmp / "queue"
        pools = [("portq, two workers on Redis (warm pool)", "q", queue_store, {})]
        if not args.quick:  # step isolation's cost on the pool too: the same pool with its steps in-process
            pools.append(("portq, two workers on Redis, steps in-process (PORTQ_ISOLATE=0)", "q-in",
                          tmp / "queue-inprocess", {"PORTQ_ISOLATE": "0"}))
        for name, batch, store, extra in pools:
            # one `portq worker` with a pool of two processes: each computes on one core (portq.tasks.checks.threads)
            worker = WorkerProcess(server.url(), store, "cpu", tmp / f"w-{batch}.log", concurrency=2, env=extra)
            try:
                worker.wait_ready()
                _wait_warm(worker, processes=2)
                t, res = portq(["submit", *files, "--batch", batch, "--wait", *light],
                               {"PORTQ_STORE": str(store), "PORTQ_BROKER_URL": server.url()})
                rows.append((name, t, f"exit {res.returncode}"))
            finally:
                worker.stop()
    finally:
        server.stop()

    print()
    width = max(len(r[0]) for r in rows)
    for name, seconds, note in rows:
        print(f"{name:{width}}  {seconds:7.1f} s  {seconds / loop_s:5.2f}x the loop  ({note})")
    seconds = {name: t for name, t, _ in rows}
    for isolated, in_process in ((rows[1][0], rows[2][0]), (pools[0][0], pools[-1][0])):
        if isolated != in_process:
            print(f"step isolation's cost: {seconds[isolated] / seconds[in_process] - 1:+.0%} "
                  f"({isolated} against {in_process.split(', ')[-1]})")
    print("\nwhere a job's time goes (mean seconds per job, embedded, isolated):")
    for stage, seconds in sorted(stage_breakdown(embedded_store, "emb").items(), key=lambda kv: -kv[1]):
        print(f"  {stage:22} {seconds:7.2f}")
    print("\nwhere a job's time goes (mean seconds per job, two workers):")
    for stage, seconds in sorted(stage_breakdown(queue_store, "q").items(), key=lambda kv: -kv[1]):
        print(f"  {stage:22} {seconds:7.2f}")


if __name__ == "__main__":
    main()
