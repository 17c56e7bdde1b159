"""`portq optimize`: optimization variants of an existing ONNX file (a portq artifact's included)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from portq.client.cli import BrokerOpt, StoreOpt, app
from portq.tasks.core.contract import InputSpec, Target
from portq.tasks.core.errors import ConfigError


def _check_onnx(path: Path) -> None:
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


@app.command()
def optimize(
    models: Annotated[list[Path], typer.Argument(help="ONNX files (a portq artifact's model.onnx included).")],
    target: Annotated[Target, typer.Option(help="Serving device: cpu routes to the `cpu` queue, cuda to `gpu`.")]
    = Target.cpu,
    variants: Annotated[str, typer.Option("--optimize", help="'auto' (the candidates for the target) or variant "
                                                             "names, e.g. ort-all,int8-dynamic.")] = "auto",
    precision: Annotated[str | None, typer.Option(help="Lossy precisions allowed, e.g. fp16,int8.")] = None,
    calibration: Annotated[list[Path] | None, typer.Option(help="Static int8 calibration samples (.npz file or "
                                                                "directory); repeatable.")] = None,
    inputs: Annotated[list[str] | None, typer.Option("--input", "-i", help="Input spec 'name:dtype[d0,d1]'; "
                      "default: a portq artifact's own, else the graph's (unfixed dims at 2).")] = None,
    batch: Annotated[str | None, typer.Option(help="Batch name (a fresh id otherwise).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the batch; exit 1 if a job failed.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds (exit 3).")] = 0,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
) -> None:
    """Optimize existing ONNX files: each variant is measured against the file itself, and the fastest that passes
    parity is picked. Anything that is not ONNX is refused before work starts."""
    from portq.client.submit import submit

    for path in models:
        _check_onnx(path)
    specs = inputs or (artifact_inputs(models[0]) if len(models) == 1 else [])
    submit(models=[str(p) for p in models], target=target, formats=["onnx"], batch=batch, wait=wait,
           timeout=timeout, inputs=specs, optimize=variants, precision=precision, calibration=calibration,
           broker=broker, store=store)
