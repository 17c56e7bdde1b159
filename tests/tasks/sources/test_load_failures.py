"""A .pt2 that torch.export.load cannot read: the error names the node and operator (or the schema), the torch
that saved the file, and what to do. The broken archives are made by editing a valid one's model.json."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from portq.tasks.core.errors import ModelLoadError
from portq.tasks.sources.loading import LoadRequest, load_model
from torch import nn

THIS = torch.__version__.split("+")[0]


@pytest.fixture(scope="module")
def program_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "small.pt2"
    module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    torch.export.save(torch.export.export(module, (torch.randn(3, 4),)), str(path))
    return path


def _edited(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None] | None) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("models/model.json"):
                if edit is None:
                    continue
                program = json.loads(data)
                edit(program)
                data = json.dumps(program).encode()
            zout.writestr(info.filename, data)
    return dst


def _retarget(target: str) -> Callable[[dict[str, Any]], None]:
    def edit(program: dict[str, Any]) -> None:
        next(n for n in program["graph_module"]["graph"]["nodes"] if "linear" in n["target"])["target"] = target
    return edit


def _newer(program: dict[str, Any]) -> None:
    program["schema_version"]["major"] += 1
    program["torch_version"] = "2.99.0"


def _message(path: Path) -> str:
    with pytest.raises(ModelLoadError) as e:
        load_model(LoadRequest(path=path, display="model.pt2"))
    return e.value.message


@pytest.mark.parametrize("edit, expected", [
    (_retarget("torch.ops.aten.not_a_real_op.default"),
     ["node 'linear' calls torch.ops.aten.not_a_real_op.default, an operator (or overload) this torch does not have",
      f"saved with torch {THIS}", f"re-export it with torch {THIS}", "TorchScript (torch.jit.save)", "--arch"]),
    (_retarget("torch.ops.moe_kernels.grouped_gemm.default"),
     ["calls custom operator torch.ops.moe_kernels.grouped_gemm.default (namespace 'moe_kernels')",
      "portq does not import it", "re-export without the custom op"]),
    (_newer, ["uses serialization schema 9.", "comes from a newer torch (2.99.0)", f"re-export it with torch {THIS}"]),
    (None, ["the archive holds no serialized program"]),
], ids=["unknown-aten-op", "custom-op", "newer-torch", "no-program"])
def test_the_error_names_the_cause_the_saving_torch_and_the_fix(program_file, tmp_path, edit, expected) -> None:
    message = _message(_edited(program_file, tmp_path / "bad.pt2", edit))
    assert message.startswith("[step load, file model.pt2] cannot load the ExportedProgram: ")
    for fragment in expected:
        assert fragment in message
    assert "check the warnings above" not in message and len(message) < 700
