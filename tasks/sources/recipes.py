"""Building the source model of a `convert` job from its file, in plain torch: portq's loaders share the
checkpoint rules below, and every reproduce script carries a copy of this file's source to rebuild the
source exactly as portq did.

So this module stands alone: it imports torch, numpy and safetensors inside functions, and portq only on
lines marked `portq-only` (the script carries `dequantize`'s source before this one).
`build_source(settings, path)` (and `load_model_file`, which fused models load each member with) returns
an object with `.module` (eager callable), `.script` (ScriptModule or None), `.program` (ExportedProgram or
None) and, for an ONNX file, `.onnx` (its path), which is what every export recipe takes.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from portq.tasks.sources.dequantize import float_equivalent  # portq-only

#: keys under which training checkpoints commonly keep the model's weights, most specific first
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "weights")
#: the prefix training wrappers (DataParallel, DDP) put before every key
WRAPPER_PREFIX = "module."


def find_state_dict(obj: Any) -> dict[str, Any] | None:
    """The state dict in a torch.save payload: the payload itself, or under a common checkpoint key."""
    import torch

    if not isinstance(obj, dict):
        return None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in CHECKPOINT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return None


def strip_wrapper_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Remove DataParallel's `module.` prefix when every key has it."""
    if state and all(k.startswith(WRAPPER_PREFIX) for k in state):
        return {k[len(WRAPPER_PREFIX):]: v for k, v in state.items()}
    return state


def import_arch(arch: str) -> Any:
    """`package.module:Class` (or `package.module:Outer.Inner`) -> the class."""
    module_name, _, attr = arch.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def onnx_module(path: str) -> Any:
    """An ONNX model as a callable on torch tensors (onnxruntime on the CPU), so that an ONNX file can be a
    source: its outputs are the reference an optimized copy of it is held to."""
    import numpy as np
    import onnxruntime as ort
    import torch

    class OnnxModule:
        def __init__(self) -> None:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]
            # named as portq flattens outputs (output.<key>), so the artifact's outputs carry the same names
            self.outputs = [o.name.removeprefix("output.") for o in self.session.get_outputs()]

        def __call__(self, *args: Any) -> dict[str, Any]:
            feed = {n: np.ascontiguousarray(a.detach().cpu().numpy()) for n, a in zip(self.inputs, args)}
            return {k: torch.from_numpy(np.asarray(o)) for k, o in zip(self.outputs, self.session.run(None, feed))}

        def to(self, device: Any) -> OnnxModule:  # the reference runs on the CPU, whatever the target
            return self

        def eval(self) -> OnnxModule:
            return self

    return OnnxModule()


def build_source(settings: dict[str, Any], path: str | None = None) -> Any:
    """The source model as portq loaded it. settings: {"kind", "model", "arch", "arch_kwargs"}; `path`
    overrides settings["model"] (the file's location in the store)."""
    return load_model_file(settings, path)


def load_model_file(settings: dict[str, Any], path: str | None = None) -> Any:
    """One model file loaded as portq loaded it (`build_source` of a convert job; each member of a fusion)."""
    import torch

    path = path or settings["model"]
    kind = settings["kind"]
    if kind == "onnx":
        return types.SimpleNamespace(module=onnx_module(path), script=None, program=None, onnx=path)
    if kind == "torchscript":  # a dynamically quantized archive becomes its float equivalent, as in portq
        script, _ = float_equivalent(torch.jit.load(path, map_location="cpu").eval())
        return types.SimpleNamespace(module=script, script=script, program=None)
    if kind == "exported_program":
        program = torch.export.load(path)
        return types.SimpleNamespace(module=program.module(), script=None, program=program)
    if kind == "pickled_module":  # portq loaded it with --trust-pickle: this runs code from the file
        module, _ = float_equivalent(torch.load(path, map_location="cpu", weights_only=False).eval())
        return types.SimpleNamespace(module=module, script=None, program=None)
    if kind == "safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(path, device="cpu")
    else:  # a state dict, or a training checkpoint holding one
        state = find_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    module = import_arch(settings["arch"])(**settings.get("arch_kwargs", {}))
    module.load_state_dict(strip_wrapper_prefix(state), strict=True)
    return types.SimpleNamespace(module=module.eval(), script=None, program=None)
