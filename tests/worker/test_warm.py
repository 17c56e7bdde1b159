"""A pool process warms up ahead of its first job: what a job imports on its way to its first step (torch.export's
loader among it, which imports torch's compiler stack: 2-3 s of the first job's load without the warm-up)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_the_pool_warm_up_imports_what_loading_a_program_and_building_its_report_import(tmp_path):
    path = tmp_path / "m.pt2"
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), path)
    code = f"""
        import importlib, json, sys
        from portq.worker.warm import MODULES

        for name in MODULES:
            importlib.import_module(name)
        before = set(sys.modules)
        from portq.tasks.sources.loading import LoadRequest, load_model
        from pathlib import Path
        load_model(LoadRequest(path=Path({str(path)!r}), display="m.pt2"))
        print(json.dumps(sorted(set(sys.modules) - before)))
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    new = json.loads(res.stdout.splitlines()[-1])
    heavy = [m for m in new if m.startswith(("torch._dynamo", "torch._export", "torch._functorch", "torch.export",
                                             "torch._inductor", "sympy"))]
    assert not heavy, heavy  # the first job's load imports none of torch's compiler stack


def test_a_job_that_arrives_during_the_warm_up_waits_for_its_end_then_loads(tmp_path):
    """A job's imports raced the warm-up's in the same process, and torch's circular imports failed both ("cannot
    load the ExportedProgram: 'torch._dynamo'"): the job waits for the warm-up's imports to end first."""
    path = tmp_path / "m.pt2"
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), path)
    code = f"""
        import threading, time
        from pathlib import Path
        from portq.worker import warm

        warm.until_warm(timeout=1)  # no warm-up started in this process: at once
        started = time.monotonic()
        warm._warm()  # as the pool process starts (Celery's worker_process_init)
        warm.until_warm()  # as a job starts, right after (portq.worker.task)
        assert warm._IMPORTED.is_set()
        from portq.tasks.sources.loading import LoadRequest, load_model
        loaded = load_model(LoadRequest(path=Path({str(path)!r}), display="m.pt2"))
        print("loaded", loaded.kind)
    """
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PORTQ_")} | {
        "PORTQ_ISOLATE": "0", "PORTQ_STORE": str(tmp_path / "store")}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loaded exported_program" in res.stdout
