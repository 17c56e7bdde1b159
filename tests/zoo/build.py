"""Save the zoo to disk: each case as a TorchScript archive (with a sidecar .npz) and as an ExportedProgram.

A save that fails is recorded, not raised: a model that cannot be exported by the user's own tools is
not portq's to convert, and the table says so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tests.zoo.models import ZOO, build

#: file kind -> file suffix
KINDS = {"torchscript": "_ts.pt", "exported_program": "_ep.pt2"}


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


def save_case(name: str, directory: Path) -> list[ZooFile]:
    spec = ZOO[name]
    module, args = build(name)
    files: list[ZooFile] = []
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
        np.savez(directory / f"{name}{KINDS['torchscript'][:-3]}.npz",
                 **{n: a.numpy() for n, a in zip(spec.names, args)})
        files.append(ZooFile(name, "torchscript", ts_path))
    except Exception as e:  # noqa: BLE001 - recorded for the table
        files.append(ZooFile(name, "torchscript", None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    if files[-1].path is not None:
        files[-1].dynamic = spec.dynamic_batch
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
                note = f"exported with a static batch: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        try:
            dynamic = program is not None
            program = program or torch.export.export(module, args)
            torch.export.save(program, str(ep_path))
            files.append(ZooFile(name, "exported_program", ep_path, dynamic=dynamic, note=note))
        except Exception as e:  # noqa: BLE001
            files.append(ZooFile(name, "exported_program", None,
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    return files


def save_zoo(directory: Path, names: list[str] | None = None) -> list[ZooFile]:
    directory.mkdir(parents=True, exist_ok=True)
    out: list[ZooFile] = []
    for name in names or list(ZOO):
        out.extend(save_case(name, directory))
    return out
