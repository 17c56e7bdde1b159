"""ONNX models over 2 GB, from each source kind: the artifact is model.onnx with its weights in model.onnx.data,
its reported size is both files, parity and latency run on it, and its reproduce script rebuilds it.

    python benchmarks/onnx_large.py [--gib 2.2] [--kinds torchscript exported_program state_dict]
                                    [--store DIR_OR_URL] [--isolate] [--reproduce]

One model at a time (a stack of square Linear layers, `--gib` of fp32 weights, random): written, submitted
as a job through `run_job` (in this process unless `--isolate`), checked, and deleted with its results before
the next. Needs about 4x the model's size in free disk and about 5x in free memory. Prints one row per kind:
the route that converted it, the sizes of model.onnx and model.onnx.data against the report's `size_bytes`,
parity, the job's seconds and its peak resident memory (this process; with --isolate the step's child is apart).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
WIDTH = 8192  # one layer: 8192 x 8192 fp32 = 256 MiB


class Wide(nn.Module):
    """`layers` square Linear layers with a ReLU between them (the arch of the state-dict source)."""

    def __init__(self, layers: int = 9, width: int = WIDTH) -> None:
        super().__init__()
        self.net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())][:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) / 1000.0


class PeakRss:
    """This process's peak resident memory while the block runs (sampled every 0.1 s), in bytes."""

    def __enter__(self) -> PeakRss:
        import psutil

        self.peak, self._proc, self._stop = 0, psutil.Process(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def layers_for(gib: float) -> int:
    per_layer = (WIDTH * WIDTH + WIDTH) * 4
    return max(1, int(-(-gib * 2**30 // per_layer)))


def write_source(kind: str, directory: Path, layers: int) -> tuple[Path, dict]:
    """The model file of one kind, a sidecar sample, and the load options its job needs."""
    import numpy as np

    torch.manual_seed(0)
    with torch.no_grad():
        model = Wide(layers).eval()
        for p in model.parameters():  # small weights keep the activations (and parity) well scaled
            p.mul_(0.01)
    x = torch.randn(2, WIDTH)
    load: dict = {}
    if kind == "torchscript":
        path = directory / "wide.pt"
        with torch.no_grad():
            torch.jit.save(torch.jit.trace(model, (x,)), str(path))
    elif kind == "exported_program":
        path = directory / "wide.pt2"
        torch.export.save(torch.export.export(model, (x,)), str(path))
    else:
        path = directory / "wide_state.pt"
        torch.save(model.state_dict(), path)
        load = {"arch": "onnx_large:Wide", "arch_kwargs": {"layers": layers}}
    np.savez(path.with_suffix(".npz"), x=x.numpy())
    return path, load


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.2, help="fp32 weights per model, GiB (default 2.2)")
    ap.add_argument("--kinds", nargs="+", default=["torchscript", "exported_program", "state_dict"])
    ap.add_argument("--store", default=None, help="a directory or an fsspec URL (default: a temp directory)")
    ap.add_argument("--isolate", action="store_true", help="run the ONNX step in a child process (more memory)")
    ap.add_argument("--reproduce", action="store_true", help="also run each artifact's reproduce script")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))  # the state dict's --arch (onnx_large:Wide), importable in this process

    from portq.tasks.execution.isolation import ChildProcess, InProcess
    from portq.tasks.execution.run import run_job
    from portq.tasks.state import records
    from portq.tasks.state.store import Store
    from portq.tasks.state.submission import prepare

    layers = layers_for(args.gib)
    print(f"{layers} layers of {WIDTH}x{WIDTH} fp32: {layers * (WIDTH * WIDTH + WIDTH) * 4 / 2**30:.2f} GiB; "
          f"torch {torch.__version__}")
    header = (f"{'source kind':17} {'model GB':>8} {'route':12} {'model.onnx':>11} {'.onnx.data GB':>13} "
              f"{'size_bytes GB':>13} {'=files':>6} {'parity':>6} {'job s':>6} {'job RSS GiB':>11}"
              + (" reproduce" if args.reproduce else ""))
    print(header)
    failures = 0
    for kind in args.kinds:
        work = Path(tempfile.mkdtemp(prefix=f"portq-large-{kind}-"))
        store = Store(args.store or str(work / "store"))
        folder = None
        try:
            path, load = write_source(kind, work, layers)
            (spec,) = prepare([str(path)], store, batch=f"large-{kind}", max_bytes=16 << 30, force=True,
                              options={"artifacts": [{"format": "onnx"}], "latency": {"warmup": 1, "runs": 3}},
                              load=load).specs
            start = time.perf_counter()
            with PeakRss() as rss:
                report = run_job(spec, store, isolation=ChildProcess() if args.isolate else InProcess())
            seconds = time.perf_counter() - start
            art = report.artifacts[0]
            record = records.read_record(store, spec.batch_id, spec.job_id)
            folder = record.result if record else None
            sizes = {p: store.size(f"{folder}/{p}") for p in [art.path, *art.data]} if folder and art.path else {}
            onnx_bytes = sizes.get(art.path or "", 0)
            data_bytes = sum(v for k, v in sizes.items() if k != art.path)
            ok = (report.status.value == "succeeded" and art.data == ["onnx/model.onnx.data"]
                  and art.size_bytes == onnx_bytes + data_bytes)
            reproduced = ""
            if args.reproduce and ok and store.local and folder:
                script = Path(store.url(folder)) / (art.reproduce or "")
                ran = subprocess.run([sys.executable, str(script), "--model", str(path),
                                      "--out", str(work / "reproduced.onnx")], capture_output=True, text=True,
                                     env={"PYTHONPATH": str(HERE), "PATH": "/usr/bin:/bin"})
                reproduced = " passed" if ran.returncode == 0 and "parity passed" in ran.stdout else " FAILED"
                ok &= ran.returncode == 0
            peak = rss.peak / 2**30
            print(f"{kind:17} {path.stat().st_size / 1e9:8.2f} {art.route or '-':12} {onnx_bytes:11d} "
                  f"{data_bytes / 1e9:13.2f} {(art.size_bytes or 0) / 1e9:13.2f} {str(ok):>6} "
                  f"{'pass' if art.parity and art.parity.passed else 'FAIL':>6} {seconds:6.0f} {peak:11.1f}"
                  + reproduced, flush=True)
            if not ok:
                failures += 1
                print(f"  {kind}: {report.error or art.error}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if args.store:  # a store of the caller's: remove what this run put there
                for key in (f"batches/large-{kind}", folder and folder.rsplit("/d-", 1)[0]):
                    if key:
                        store.delete(key)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
