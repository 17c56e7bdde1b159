"""A forkserver started ahead of jobs (a worker's pool process) runs one tiny export, so each step's process starts
with the exporters' first-call work done; the forkserver gains no thread from it, and its children work as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]


def child_report(path: str) -> None:
    """In a step's process: what it inherited, and a first export of its own, checked against eager PyTorch."""
    import numpy as np
    import onnxruntime as ort
    import psutil

    exercise = sys.modules.get("portq.tasks.execution.step_exercise")  # imported by its forkserver, or not

    model = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 2, 8)
    onnx_path = str(Path(path).with_suffix(".onnx"))
    torch.onnx.export(torch.export.export(model, (x,)), (x,), onnx_path, dynamo=True, verbose=False)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    close = bool(np.allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0],
                             model(x).detach().numpy(), atol=1e-5))
    with torch.no_grad():  # and a TorchScript model of its own, after the forkserver's warm-up ran one
        traced = torch.jit.trace(model, x)
        close_ts = all(bool(torch.allclose(traced(x), model(x), atol=1e-6)) for _ in range(3))
    Path(path).write_text(json.dumps({"close_ts": close_ts,
        "ran": bool(exercise and exercise.RAN), "failed": exercise.FAILED if exercise else {}, "close": close,
        "threads": torch.get_num_threads(), "forkserver_threads": psutil.Process(os.getppid()).num_threads()}))


def _forkserver_child(tmp_path: Path, exercise: bool) -> dict:
    code = f"""
        from portq.tasks.execution import forkserver
        from tests.tasks.execution.test_step_exercise import child_report

        if {exercise}:
            forkserver.exercise_on_start()  # as a warm pool process does
        forkserver.warm_up(wait=True)
        proc = forkserver.forkserver().Process(target=child_report, args=({str(tmp_path / f"r{exercise}.json")!r},))
        proc.start()
        proc.join(300)
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((tmp_path / f"r{exercise}.json").read_text())


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="the warm-up export runs only on a CPU-only torch")
def test_a_forkserver_warmed_by_one_export_gains_no_thread_and_its_children_export_as_before(tmp_path):
    plain = _forkserver_child(tmp_path, exercise=False)
    warmed = _forkserver_child(tmp_path, exercise=True)
    assert warmed["ran"] and not warmed["failed"], warmed["failed"]
    assert not plain["ran"]  # the command's own forkserver does not run it (first runs wait for their forkserver)
    assert warmed["forkserver_threads"] == plain["forkserver_threads"]  # no thread to be inherited half-made
    assert warmed["threads"] == plain["threads"] == torch.get_num_threads()  # its one-thread export set back
    assert warmed["close"] and plain["close"]
    assert warmed["close_ts"] and plain["close_ts"]

