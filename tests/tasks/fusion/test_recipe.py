"""A fused artifact's reproduce script fuses the members again without portq, to the same model, and passes
parity; the plain modules it carries stand alone and do not shadow each other's names."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from portq.tasks.core.contract import JobStatus
from portq.tasks.execution.run import run_job
from portq.tasks.formats.reproduce import module_source
from portq.tasks.state.store import Store

from tests.tasks.fusion.helpers import ARCH, SmallNet, fine_tunes, fuse_spec, save_data, save_scripts, save_state_dicts

REPO = Path(__file__).resolve().parents[3]


def _run_script(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    # no portq on the path: the script stands alone (the arch module is found through PYTHONPATH)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, path, *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd="/")


def _onnx_outputs(path: str, samples: list[np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return [session.run(None, {"x": s})[0] for s in samples]


@pytest.mark.parametrize("case", ["ties+finetune", "vote of TorchScript", "breadcrumbs"])
def test_the_script_rebuilds_the_same_fused_model_and_passes_parity(case, tmp_path):
    torch.manual_seed(0)
    base = SmallNet(bn=True).eval()
    store = Store(str(tmp_path / "store"))
    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(2))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    if case == "ties+finetune":  # a weight-space merge, BatchNorm recomputed, then fine-tuned
        paths = save_state_dicts(tmp_path / "m", [base, *fine_tunes(base, 2)])
        spec = fuse_spec(store, paths[1:], "ties", base=paths[0], params={"density": 0.5},
                         calibration=save_data(tmp_path / "calib.npz", x),
                         finetune={"data": save_data(tmp_path / "tune.npz", x, y), "epochs": 3, "lr": 0.01},
                         load={"arch": ARCH, "arch_kwargs": {"bn": True}})
    elif case == "breadcrumbs":  # the method added as one entry in methods.py: its script needs nothing else
        paths = save_state_dicts(tmp_path / "m", [base, *fine_tunes(base, 2)])
        spec = fuse_spec(store, paths[1:], "breadcrumbs", base=paths[0], params={"density": 0.7, "gamma": 0.1},
                         load={"arch": ARCH, "arch_kwargs": {"bn": True}})
    else:  # an output-space fusion of TorchScript members: traced into one TorchScript module first
        paths = save_scripts(tmp_path / "m", fine_tunes(SmallNet().eval(), 3), torch.randn(6, 4))
        spec = fuse_spec(store, paths, "vote", arch=False)
    report = run_job(spec, store)
    assert report.status is JobStatus.succeeded, report.error
    (art,) = report.artifacts
    script = report.url(art.reproduce)
    text = Path(script).read_text()
    assert not re.search(r"^\s*(from|import) portq", text, re.M), "the script must not need portq"
    settings = json.loads(re.search(r'SETTINGS = json.loads\(r"""(.*?)"""\)', text, re.S)[1])["source"]
    assert settings["kind"] == "fuse" and settings["method"] == spec.source.method
    assert [m["name"] for m in settings["members"]] == [m.name for m in spec.source.members]
    out = tmp_path / "again.onnx"
    res = _run_script(script, "--out", str(out))
    assert res.returncode == 0 and res.stdout.rstrip().endswith("parity passed"), res.stdout + res.stderr
    data = np.load(f"{report.result}/reproduce_inputs.npz")
    samples = [data[k] for k in sorted(data.files)]
    # the same fused model: its artifact computes what portq's computes
    for mine, theirs in zip(_onnx_outputs(str(out), samples), _onnx_outputs(report.url(art.path), samples)):
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6)


def test_the_plain_modules_stand_alone_and_share_no_top_level_names():
    from portq.tasks.checks import output_check, runtimes
    from portq.tasks.formats import recipes, unfuse
    from portq.tasks.fusion.builder import _script_modules

    modules = [*_script_modules(), unfuse, recipes, runtimes, output_check]
    seen: dict[str, str] = {}
    for module in modules:
        tree = ast.parse(module_source(module))
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                roots = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else \
                    [(node.module or "").split(".")[0]]
                allowed = {*sys.stdlib_module_names, "torch", "numpy", "onnxruntime", "safetensors"}
                assert set(roots) <= allowed, (module.__name__, roots)
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            for name in names:
                # one file holds them all: a second definition would silently replace the first, except
                # build_source, which the last module (the job kind's) defines on purpose
                assert name not in seen or name == "build_source", f"{name} in {module.__name__} and {seen[name]}"
                seen[name] = module.__name__
