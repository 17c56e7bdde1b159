"""Save the zoo to disk: each case as a TorchScript archive (with a sidecar .npz), as an ExportedProgram, and
(where the case says) as a whole pickled module, with a sidecar .npz.

A save that fails is recorded, not raised: a model that cannot be exported by the user's own tools is
not portq's to convert, and the table says so. A case that registers something while it builds (a custom
operator library) is built and saved in a fresh process, so this one never sees it, as a worker would not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tests.zoo.models import ZOO, build

#: file kind -> file suffix
KINDS = {"torchscript": "_ts.pt", "exported_program": "_ep.pt2", "pickled_module": "_pickle.pt"}


@dataclass
class ZooFile:
    case: str
    kind: str  # torchscript | exported_program
    path: Path | None
    error: str | None = None
    dynamic: bool = False  # convert with --dynamic batch
    note: str | None = None

    @property
    def id(self) -> str:
        return f"{self.case}:{self.kind}"


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _sidecar(path: Path, names: list[str], args: tuple[torch.Tensor, ...]) -> None:
    np.savez(path.with_suffix(".npz"), **{n: a.numpy() for n, a in zip(names, args)})


def save_case(name: str, directory: Path) -> list[ZooFile]:
    spec = ZOO[name]
    if spec.save_in_subprocess and not os.environ.get("PORTQ_ZOO_CHILD"):
        return _save_in_child(name, directory)
    module, args = build(name)
    files: list[ZooFile] = []
    if "torchscript" in spec.kinds:
        files.append(_save_torchscript(name, module, args, directory))
    if "exported_program" in spec.kinds:
        files.append(_save_program(name, module, args, directory))
    if "pickled_module" in spec.kinds:
        path = directory / f"{name}{KINDS['pickled_module']}"
        torch.save(module, path)  # what users do, and what portq loads only with --trust-pickle
        _sidecar(path, spec.names, args)
        files.append(ZooFile(name, "pickled_module", path, dynamic=spec.dynamic_batch))
    return files


def _save_torchscript(name: str, module: torch.nn.Module, args: tuple[torch.Tensor, ...], directory: Path) -> ZooFile:
    spec = ZOO[name]
    ts_path = directory / f"{name}{KINDS['torchscript']}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if "script" in spec.save_as:
                script = torch.jit.script(module)
            else:  # traced the way most users trace: under no_grad, dict outputs allowed
                with torch.no_grad():
                    script = torch.jit.trace(module, args, strict=False, check_trace=False)
        torch.jit.save(script, str(ts_path))
        _sidecar(ts_path, spec.names, args)
    except Exception as e:  # noqa: BLE001 - recorded for the table
        return ZooFile(name, "torchscript", None, _error(e))
    return ZooFile(name, "torchscript", ts_path, dynamic=spec.dynamic_batch)


def _save_program(name: str, module: torch.nn.Module, args: tuple[torch.Tensor, ...], directory: Path) -> ZooFile:
    spec = ZOO[name]
    ep_path = directory / f"{name}{KINDS['exported_program']}"
    note = None
    program = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec.dynamic_batch:  # what a user who wants other batch sizes exports
            batch = torch.export.Dim("batch")
            try:
                program = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args))
            except Exception as e:  # noqa: BLE001
                note = f"exported with a static batch: {_error(e)}"
        try:
            dynamic = program is not None
            program = program or torch.export.export(module, args)
            torch.export.save(program, str(ep_path))
        except Exception as e:  # noqa: BLE001
            return ZooFile(name, "exported_program", None, _error(e))
    return ZooFile(name, "exported_program", ep_path, dynamic=dynamic, note=note)


def _save_in_child(name: str, directory: Path) -> list[ZooFile]:
    code = ("import json, sys; from pathlib import Path; from dataclasses import asdict; "
            "from tests.zoo.build import save_case; "
            "print(json.dumps([{**asdict(f), 'path': str(f.path) if f.path else None} "
            "for f in save_case(sys.argv[1], Path(sys.argv[2]))]))")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PORTQ_ZOO_CHILD": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, name, str(directory)], capture_output=True, text=True,
                          env=env, timeout=600)
    if done.returncode != 0:
        return [ZooFile(name, kind, None, f"building it in a fresh process failed: {done.stderr.strip()[-300:]}")
                for kind in ZOO[name].kinds]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return [ZooFile(**{**row, "path": Path(row["path"]) if row["path"] else None}) for row in rows]


def save_zoo(directory: Path, names: list[str] | None = None) -> list[ZooFile]:
    directory.mkdir(parents=True, exist_ok=True)
    out: list[ZooFile] = []
    for name in names or list(ZOO):
        out.extend(save_case(name, directory))
    return out
