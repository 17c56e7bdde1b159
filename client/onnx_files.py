"""Existing ONNX files as `portq.optimize` takes them: refused unless ONNX, and a portq artifact's input specs."""

from __future__ import annotations

import json
from pathlib import Path

from portq.tasks.core.contract import InputSpec
from portq.tasks.core.errors import ConfigError


def check_onnx(path: Path) -> None:
    from portq.tasks.sources.loading import is_onnx

    if not path.is_file():
        raise ConfigError(f"{path}: no such file", step="optimize")
    if not is_onnx(path):
        raise ConfigError(f"{path} is not an ONNX file", step="optimize",
                          hint="portq optimize takes ONNX files (a portq artifact's model.onnx included); to "
                               "convert a PyTorch model and optimize it, use portq submit MODEL --optimize auto")


def artifact_inputs(path: Path) -> list[str]:
    """For a portq artifact (`results/<key>/onnx/model.onnx`), the input specs its job used, from report.json."""
    report = path.resolve().parent.parent / "report.json"
    if not report.is_file():
        return []
    try:
        inputs = json.loads(report.read_text()).get("inputs") or []
        specs = []
        for i in inputs:
            dims = [f"{i['dynamic'][str(a)]}={d}" if str(a) in i.get("dynamic", {}) else str(d)
                    for a, d in enumerate(i["shape"])]
            text = f"{i['name']}:{i['dtype']}[{','.join(dims)}]"
            if i.get("low") is not None and i.get("high") is not None:
                text += f"{{{i['low']:g},{i['high']:g}}}"
            InputSpec.parse(text)
            specs.append(text)
        return specs
    except (ValueError, KeyError, TypeError):
        return []
