"""Opening and calling each kind of artifact, in plain torch and onnxruntime.

portq's parity and latency run artifacts through these runtimes, and every reproduce script carries a
copy of this file's source and runs the artifact through the same code. So it stands alone: numpy at the
top, torch and onnxruntime inside functions, never portq.

A runtime splits a call in three so that latency times only the model: `prepare` turns numpy inputs into
what the runtime eats (on the device), `run` executes (and synchronises the device), `outputs` turns the
result into named numpy arrays (`flatten`: nested tuples, lists and dicts become `output.0`,
`output.1.logits`, ...). Each format's opener takes the artifact's path, the device and the artifact's
options (runner options such as onnxruntime's graph optimization level travel in them).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

#: ONNX metadata key holding the source's input names in forward order (the exporter may drop unused inputs)
META_INPUTS = "portq.input_names"

#: onnxruntime graph optimization levels by the name the options use
ORT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}


def to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


def flatten(obj: Any, prefix: str = "output") -> list[tuple[str, np.ndarray]]:
    """Nested tuples/lists/dicts of tensors -> [(output.0, array), (output.logits, array), ...]."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [(prefix, to_numpy(obj))]
    if isinstance(obj, dict) or hasattr(obj, "to_tuple"):  # transformers' ModelOutput is dict-like
        return [kv for k, v in dict(obj.items()).items() for kv in flatten(v, f"{prefix}.{k}")]
    if isinstance(obj, (tuple, list)):
        return [kv for i, v in enumerate(obj) for kv in flatten(v, f"{prefix}.{i}")]
    if obj is None:
        return []
    if isinstance(obj, (int, float, bool, np.ndarray, np.generic)):
        return [(prefix, np.asarray(obj))]
    raise TypeError(f"model returned a {type(obj).__name__}, which is not a tensor or a tuple/list/dict of tensors")


def to_tensors(sample: list[np.ndarray], device: str) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in sample)


def call(runtime: Any, sample: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """One call of a runtime on numpy inputs: named numpy outputs."""
    return runtime.outputs(runtime.run(runtime.prepare(sample)))


class TorchRuntime:
    """Eager PyTorch: an nn.Module, a ScriptModule, an ExportedProgram's module or an AOTInductor package."""

    def __init__(self, module: Any, device: str, move: bool = True):
        self.device = device
        self.module = module.to(device) if move and hasattr(module, "to") else module
        if str(device).startswith("cuda"):
            import torch

            self._sync: Any = torch.cuda.synchronize
        else:
            self._sync = lambda: None

    def prepare(self, sample: list[np.ndarray]) -> tuple[Any, ...]:
        return to_tensors(sample, self.device)

    def run(self, prepared: tuple[Any, ...]) -> Any:
        import torch

        with torch.inference_mode():
            out = self.module(*prepared)
        self._sync()
        return out

    def outputs(self, raw: Any) -> list[tuple[str, np.ndarray]]:
        flat = flatten(raw)
        # a module may name its outputs (a Hugging Face model's wrapper: logits, last_hidden_state, ...)
        names = getattr(self.module, "portq_output_names", None)
        if names and len(names) == len(flat):
            return [(name, array) for name, (_, array) in zip(names, flat)]
        return flat


#: The job's CPU threads, set in a job's process by `portq.tasks.checks.threads.apply` (None, as in a reproduce
#: script: onnxruntime's default, a thread per core).
JOB_THREADS: int | None = None


class OrtRuntime:
    """An onnxruntime session for an ONNX artifact, with the session options the artifact asked for.

    options: `graph_optimization` (disabled, basic, extended, layout, all; onnxruntime's default is all),
    `disabled_optimizers` (graph transformers not to run: an optimized file may say so) and
    `intra_op_threads` (0 or unset: the job's thread count, `portq.tasks.checks.threads`, where one is set).
    """

    def __init__(self, path: str, device: str, options: dict[str, Any] | None = None,
                 providers: list[Any] | None = None):
        import onnxruntime as ort

        options = options or {}
        self.device = device
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        level = options.get("graph_optimization") or "all"
        session_options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
        intra_op = options.get("intra_op_threads") or JOB_THREADS
        if intra_op:
            session_options.intra_op_num_threads = int(intra_op)
        if providers is None:
            providers = ["CUDAExecutionProvider"] if str(device).startswith("cuda") else ["CPUExecutionProvider"]
        self.session_options = session_options
        disabled = list(options.get("disabled_optimizers") or [])
        self.session = ort.InferenceSession(str(path), session_options, providers=providers,
                                            **({"disabled_optimizers": disabled} if disabled else {}))
        self.providers = self.session.get_providers()
        graph_inputs = [i.name for i in self.session.get_inputs()]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.input_names = json.loads(meta[META_INPUTS]) if META_INPUTS in meta else graph_inputs
        self.graph_inputs = set(graph_inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def prepare(self, sample: list[np.ndarray]) -> dict[str, np.ndarray]:
        if len(sample) != len(self.input_names):
            raise ValueError(f"artifact takes {len(self.input_names)} inputs, sample has {len(sample)}")
        # The exporter drops inputs the graph does not use; feed only the ones it kept.
        return {n: np.ascontiguousarray(a) for n, a in zip(self.input_names, sample) if n in self.graph_inputs}

    def run(self, prepared: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, prepared)

    def outputs(self, raw: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
        return [(n, np.asarray(a)) for n, a in zip(self.output_names, raw)]


def open_onnx(path: str, device: str, options: dict[str, Any]) -> OrtRuntime:
    return OrtRuntime(path, device, options)


def open_torchscript(path: str, device: str, options: dict[str, Any]) -> TorchRuntime:
    """options: `optimize_for_inference` (re-applied at every load: its MKLDNN rewrites cannot be saved)."""
    import torch

    module = torch.jit.load(str(path), map_location=device).eval()
    if options.get("optimize_for_inference"):
        module = torch.jit.optimize_for_inference(module)
    return TorchRuntime(module, device, move=False)


def open_pt2(path: str, device: str, options: dict[str, Any]) -> TorchRuntime:
    import torch

    return TorchRuntime(torch.export.load(str(path)).module(), device)


def open_aoti(path: str, device: str, options: dict[str, Any]) -> TorchRuntime:
    import torch

    loaded = torch._inductor.aoti_load_package(str(path))
    return TorchRuntime(lambda *args: loaded(*args), device, move=False)
