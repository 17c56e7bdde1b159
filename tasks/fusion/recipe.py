"""A fused model from its members, in plain torch: the one code path portq's fuse builder and every
reproduce script of a fused artifact run, so both hold the same model.

`fuse_members` applies a method (its entry in `methods.FUSION_METHODS`, which calls `output_space` or
`weight_space`) to loaded members; `finetune_fused` trains the result on the job's device; `fused_source`
gives the object export recipes take (`.module`, `.script`, `.program`). A fused model whose members include
TorchScript archives is also traced into TorchScript, since neither torch.export nor the TorchScript-based
ONNX exporter take a Python module that calls ScriptModules; the trace runs on inputs described by the
settings (zeros, or an integer input's low end) so a script redoes it without portq's samples.

`build_source(settings)` is what a reproduce script calls: it loads each member with `load_model_file`
(`portq.tasks.sources.recipes`), reads the data files, fuses, fine-tunes and traces as portq did.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import numpy as np
import torch
from portq.tasks.fusion.arrays import read_arrays
from portq.tasks.fusion.methods import FUSION_METHODS, FusionInputs
from portq.tasks.fusion.training import finetune
from portq.tasks.fusion.validation import FusionError
from portq.tasks.sources.recipes import load_model_file

#: rows per calibration batch (BatchNorm statistics are averaged over the batches)
CALIBRATION_BATCH = 256


def tensors_of(arrays: list[np.ndarray]) -> tuple[Any, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def calibration_batches(arrays: list[np.ndarray]) -> list[tuple[Any, ...]]:
    """Calibration inputs split into batches of CALIBRATION_BATCH rows, in order."""
    rows = int(arrays[0].shape[0])
    return [tensors_of([a[start:start + CALIBRATION_BATCH] for a in arrays])
            for start in range(0, rows, CALIBRATION_BATCH)]


def fuse_members(method: str, members: list[tuple[str, Any]], params: dict[str, Any], *,
                 base: tuple[str, Any] | None = None, eval_data: tuple[Any, Any] | None = None,
                 calibration: list[tuple[Any, ...]] | None = None, example: tuple[Any, ...] | None = None,
                 input_names: list[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """The fused module (eval mode, on the CPU) and the method's facts (what it did, for the report), by the
    method's own apply function (`portq.tasks.fusion.methods`), with `params` as applied.

    Output-space methods hold the members themselves; `example` (inputs for one call) checks that their
    outputs combine, and `input_names` become the fused forward's parameters. Weight-space methods return a
    copy of the first member (of the base, for the methods that take one) holding the merged weights.
    """
    inputs = FusionInputs(names=[n for n, _ in members], modules=[m for _, m in members], base=base,
                          eval_data=eval_data, calibration=calibration, example=example, input_names=input_names)
    return FUSION_METHODS.get(method).fuse(inputs, params)


def finetune_fused(module: Any, data: tuple[Any, Any], options: dict[str, Any], device: str) -> tuple[str, list[float]]:
    """Fine-tune the fused module in place on `device`: (loss name, mean loss per epoch)."""
    inputs, labels = data
    return finetune(module, inputs, labels, epochs=int(options["epochs"]), lr=float(options["lr"]),
                    seed=int(options.get("seed", 0)), batch_size=int(options.get("batch_size", 64)), device=device)


def trace_inputs(described: list[dict[str, Any]], device: str) -> tuple[Any, ...]:
    """Inputs for tracing, from {"dtype", "shape", "fill"}: the same in portq and in a reproduce script."""
    return tuple(torch.full(tuple(d["shape"]), d.get("fill", 0), dtype=getattr(torch, d["dtype"]), device=device)
                 for d in described)


def needs_trace(module: Any) -> bool:
    """An output-space fusion of TorchScript members: exporters need it traced into TorchScript."""
    members = getattr(module, "members", None)
    return members is not None and not isinstance(module, torch.jit.ScriptModule) and any(
        isinstance(m, torch.jit.ScriptModule) for m in members)


def fused_source(module: Any, device: str, trace_example: list[dict[str, Any]] | None) -> Any:
    """What export recipes take: `.module` (eager), `.script` (TorchScript or None), `.program` (None)."""
    module = module.to(device)
    script = module if isinstance(module, torch.jit.ScriptModule) else None
    if needs_trace(module):
        if not trace_example:
            raise FusionError("a fusion of TorchScript members is traced, and needs its inputs described")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            script = torch.jit.trace(module, trace_inputs(trace_example, device), strict=False, check_trace=False)
    return types.SimpleNamespace(module=module, script=script, program=None)


def build_source(settings: dict[str, Any], path: str | None = None) -> Any:
    """The fused model as portq built it. settings: {"method", "params", "members": [{"name", "source"}],
    "base", "eval_data", "calibration", "finetune", "device", "input_names", "example", "trace_example"}, where
    each member's "source" is what `load_model_file` reads and data files are .npz paths."""
    if path is not None:
        raise SystemExit("this artifact fuses several models: edit SETTINGS['source']['members'] to use other files")
    members = [(m["name"], load_model_file(m["source"]).module) for m in settings["members"]]
    base = settings.get("base")
    base_member = (base["name"], load_model_file(base["source"]).module) if base else None
    eval_data = None
    if settings.get("eval_data"):
        inputs, labels = read_arrays(settings["eval_data"])
        eval_data = (tensors_of(inputs), torch.from_numpy(labels) if labels is not None else None)
    calibration = calibration_batches(read_arrays(settings["calibration"])[0]) if settings.get("calibration") \
        else None
    module, _ = fuse_members(settings["method"], members, settings["params"], base=base_member, eval_data=eval_data,
                             calibration=calibration, input_names=settings.get("input_names"))
    device = settings.get("device", "cpu")
    tune = settings.get("finetune")
    if tune:
        inputs, labels = read_arrays(tune["data"])
        finetune_fused(module, (tensors_of(inputs), torch.from_numpy(labels)), tune, device)
    return fused_source(module, device, settings.get("trace_example"))
