"""GPU verification: the CUDA path end to end, embedded and through a real `gpu` worker on Redis.

    python benchmarks/gpu_verify.py [--quick] [--no-queue]

Converts and optimizes a ResNet-style CNN (batch 32) and a transformer encoder for target cuda, in this
process's embedded default and through Redis and one `portq worker --queue gpu` (skipped with --no-queue, or
where redis-server is missing), and prints one table: the card, the driver and torch's CUDA, then per model,
mode and artifact its p50, speedup over eager PyTorch on the GPU, parity and peak CUDA memory. Exit 0 when
every artifact that ran passed parity on the GPU, 1 otherwise, 2 where no CUDA device is visible (nothing
runs then). Formats: onnx (needs onnxruntime-gpu's CUDA provider; reported as failed with the reason where it
is missing), torchscript, pt2, aoti; optimization: `--optimize auto --precision fp16,bf16` (pt2 and aoti
fp16/bf16 through autocast, aoti max-autotune).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMATS = ["onnx", "torchscript", "pt2", "aoti"]


def models(directory: Path, quick: bool) -> list[Path]:
    import torch

    from tests.models_optimize import Encoder, ResidualCNN, randomize_batchnorm

    torch.manual_seed(0)
    built = [("cnn", randomize_batchnorm(ResidualCNN(width=16 if quick else 64, blocks=1 if quick else 3)),
              (8 if quick else 32, 3, 64, 64)),
             ("encoder", Encoder(d=128, heads=4, layers=2).eval(), (4 if quick else 16, 64, 128))]
    paths = []
    for name, model, shape in built:
        path = directory / f"{name}.pt2"
        torch.export.save(torch.export.export(model, (torch.randn(*shape),)), path)
        paths.append(path)
    return paths


def cli(args: list[str], env: dict[str, str], timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")} | env
    return subprocess.run([sys.executable, "-m", "portq.client", *args], capture_output=True, text=True, env=full,
                          timeout=timeout)


def rows(store: Path, batch: str, mode: str) -> list[list[str]]:
    out = []
    doc = json.loads(cli(["report", batch, "--json"], {"PORTQ_STORE": str(store)}).stdout)
    for job in doc["jobs"]:
        for a in job["artifacts"]:
            lat, parity = a.get("latency"), a.get("parity")
            memory = (lat or {}).get("memory") or {}
            out.append([job["model"], mode, a["id"], a["status"],
                        f"{lat['p50_ms']:.3f}" if lat else "-", f"{lat['speedup']:.2f}x" if lat else "-",
                        "-" if parity is None else ("pass" if parity["passed"] else "FAIL"),
                        f"{memory['cuda_peak_mb']:.0f}" if memory.get("cuda_peak_mb") is not None else "-",
                        ", ".join((lat or {}).get("providers") or []) or (a.get("error") or "")[:60]])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller models and measurements")
    ap.add_argument("--no-queue", action="store_true", help="only the embedded default")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device is visible: the GPU path cannot be verified on this machine")
        return 2
    from portq.tasks.checks.fingerprint import environment

    env = environment("cuda")
    gpu = env["gpu"]
    print(f"card: {gpu['name']} ({gpu['memory_gb']} GB, capability {gpu['capability']}); driver "
          f"{gpu['driver']}; CUDA {gpu['cuda_runtime']}; torch {env['versions'].get('torch')}; onnxruntime "
          f"{env['versions'].get('onnxruntime-gpu') or env['versions'].get('onnxruntime')} (providers: "
          f"{', '.join(env.get('onnxruntime_providers_available', []))})")
    tmp = Path(tempfile.mkdtemp(prefix="portq-gpu-"))
    paths = list(map(str, models(tmp / "models", args.quick)))
    job = ["--target", "cuda", *[x for f in FORMATS for x in ("-f", f)], "--optimize", "auto",
           "--precision", "fp16,bf16"]
    job += ["--runs", "10"] if args.quick else []
    table = [["model", "mode", "artifact", "status", "p50 ms", "speedup", "parity", "CUDA peak MB", "providers"]]
    start = time.perf_counter()
    embedded = tmp / "embedded"
    res = cli(["submit", *paths, "--batch", "gpu-embedded", *job], {"PORTQ_STORE": str(embedded)})
    print(f"embedded: exit {res.returncode}" + (f"\n{res.stderr[-2000:]}" if res.returncode not in (0, 1) else ""))
    table += rows(embedded, "gpu-embedded", "embedded")
    if not args.no_queue and shutil.which("redis-server"):
        from tests.conftest import WorkerProcess
        from tests.redis_server import RedisServer

        server = RedisServer(tmp / "redis").start()
        queued = tmp / "queue"
        worker = WorkerProcess(server.url(), queued, "gpu", tmp / "worker.log", concurrency=1,
                               env={"PORTQ_GPUS": os.environ.get("PORTQ_GPUS", "0")})
        try:
            worker.wait_ready(300)
            res = cli(["submit", *paths, "--batch", "gpu-queue", "--wait", *job],
                      {"PORTQ_STORE": str(queued), "PORTQ_BROKER_URL": server.url()})
            print(f"queue: exit {res.returncode}")
            table += rows(queued, "gpu-queue", "gpu worker")
        finally:
            worker.stop()
            server.stop()
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for i, r in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(f"({time.perf_counter() - start:.0f} s)")
    ran = [r for r in table[1:] if r[6] != "-"]
    return 0 if ran and all(r[6] == "pass" for r in ran if not r[2].startswith("onnx.fp16")) else 1


if __name__ == "__main__":
    sys.exit(main())
