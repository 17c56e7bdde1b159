"""Imported by a step forkserver started ahead of any job (a worker's pool process warming up), after
`step_preload`: one tiny export to ONNX and one TorchScript trace, run a few times, so that each step's process
starts with the exporters' and the TorchScript interpreter's first-call work already done.

A step's process is a fresh fork, and its first export paid, every time, what a process's first export pays
and its later ones do not: torch's fake-tensor dispatch and decomposition tables filled on first use, the
ONNX translation's and optimizer's first passes; and its load of the source, the deserializer's first use.
On 2 cores that was 0.4 s of a small BERT's 2 s export (the first and the second export in one forked
process: 1.6-2.1 s and 1.2-1.6 s); and a TorchScript artifact's first runs (its parity) 0.04 s of a tiny job's
0.24 s step, 0.005 s once a TorchScript model has run in the forkserver. Done once here, every child inherits
it. It costs the forkserver about a second of its start, which is why only a forkserver started ahead of jobs
runs it: on a first run's critical path (the `portq` command's own forkserver) it would cost more than the one
step saves, and on an embedded batch of 12 models it made no difference that could be told from the noise
(27.6 and 29.3 s without it, 27.5 and 26.1 s with it).

Unlike `step_preload`, this runs torch ops, so it is fenced:
- only on a torch built without CUDA (or ROCm, or XPU): the forkserver of a GPU worker must never have
  touched a device, and the tracing of a CPU model is not guaranteed to leave the CUDA driver alone;
- with one CPU thread, so no OpenMP thread team exists to be inherited half-made by the children (the
  thread count is set back after: setting it starts no threads);
- with tqdm's monitor thread off (the exporter's progress bars would start one), and the forkserver's thread
  count checked before and after: a forkserver that gained a thread is recorded in `FAILED`, and a test keeps
  the count equal.
A failure costs only the warm-up: it is recorded and the forkserver carries on as `step_preload` left it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from portq.tasks.execution.forkserver import in_forkserver

#: what went wrong, if anything (the forkserver carries on without the warm-up)
FAILED: dict[str, str] = {}
#: whether the tiny export ran (its children inherit this module: a test reads it there)
RAN = False


def accelerator_build() -> str | None:
    """The accelerator this torch is built for (`cuda`, `rocm`, `xpu`), or None for a CPU-only build."""
    import torch

    if getattr(torch.version, "hip", None):
        return "rocm"
    if torch.backends.cuda.is_built():
        return "cuda"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and getattr(xpu, "_is_compiled", lambda: False)():
        return "xpu"
    return None


def _threads() -> int:
    import os

    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


@contextmanager
def _silenced() -> Iterator[None]:
    """The exporter's messages (Python's and native code's) to /dev/null: they are not the worker's log's."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def exercise() -> None:
    """Export a tiny model (Linear, LayerNorm, GELU) with torch.export, save and load the program (as a step loads
    its source), and export it to ONNX through the dynamo exporter; trace it to TorchScript, save, load and run it
    (the profiling executor optimises on its first runs); in a scratch folder."""
    import tempfile

    import torch

    try:
        from tqdm import tqdm
    except ImportError:  # no progress bars, no monitor thread
        tqdm = None
    threads = torch.get_num_threads()
    monitor = tqdm.monitor_interval if tqdm is not None else 0
    torch.set_num_threads(1)
    if tqdm is not None:
        tqdm.monitor_interval = 0
    try:
        with tempfile.TemporaryDirectory(prefix="portq-exercise-") as folder, _silenced():
            model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.GELU()).eval()
            example = (torch.zeros(1, 4),)
            program = torch.export.export(model, example)
            torch.export.save(program, f"{folder}/model.pt2")  # and loaded, as a step loads its source
            torch.export.load(f"{folder}/model.pt2").module()
            torch.onnx.export(program, example, f"{folder}/model.onnx", dynamo=True, verbose=False)
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, f"{folder}/model.ts")
            loaded = torch.jit.load(f"{folder}/model.ts")
            with torch.no_grad():
                for _ in range(3):
                    loaded(*example)
    finally:
        torch.set_num_threads(threads)
        if tqdm is not None:
            tqdm.monitor_interval = monitor


def _run() -> None:
    global RAN
    build = accelerator_build()
    if build is not None:
        FAILED["skipped"] = f"torch is built for {build}: the forkserver of a GPU worker runs no torch op"
        return
    before = _threads()
    try:
        exercise()
        RAN = True
    except Exception as e:
        FAILED["exercise"] = f"{type(e).__name__}: {e}"
    if _threads() != before:
        FAILED["threads"] = f"the forkserver had {before} threads before the warm-up and {_threads()} after"
    import gc

    gc.collect()  # what the export left behind is frozen too (`step_preload`), its garbage collected first
    gc.freeze()


if in_forkserver():  # imported anywhere else (a test, a documentation tool), it runs nothing
    _run()
