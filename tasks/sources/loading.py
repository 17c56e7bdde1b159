"""Loading model files: the kind is detected from the content, never from the file name.

Each kind has a loader in `LOADERS`. Nothing here unpickles arbitrary objects: TorchScript and
ExportedProgram archives are loaded by torch's own (non-pickle-executing) readers, and plain
`torch.save` files go through `weights_only` unless the submission opted in with `--trust-pickle`.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from portq.tasks.core.errors import ModelLoadError, first_line
from portq.tasks.core.registry import Registry
from portq.tasks.sources.checkpoints import load_safetensors, load_torch_save
from portq.tasks.sources.loaded import LoadedModel, LoadRequest, float_equivalent

Loader = Callable[[LoadRequest], LoadedModel]
LOADERS: Registry[Loader] = Registry("model kind")

_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def detect_kind(path: Path, display: str) -> str:
    """Tell what a file holds from its bytes: torchscript, exported_program, torch_save, safetensors."""
    if not path.exists():
        raise ModelLoadError("file does not exist", step="load", file=display)
    if path.is_dir():
        raise ModelLoadError("is a directory, not a model file", step="load", file=display,
                             hint="pass the model files inside it, e.g. DIR/*.pt")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ModelLoadError("file is empty", step="load", file=display)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ModelLoadError(f"truncated or corrupt archive ({e})", step="load", file=display,
                                 hint="the file looks like a zip-based torch archive but cannot be read; "
                                      "re-save or re-copy it") from e
        rel = {n.split("/", 1)[1] if "/" in n else n for n in names}
        if "archive_format" in rel or any(n.startswith("models/") for n in rel):
            return "exported_program"
        if "constants.pkl" in rel or any(n.startswith("code/") for n in rel):
            return "torchscript"
        if "data.pkl" in rel:
            return "torch_save"
        raise ModelLoadError("zip archive is not a TorchScript, ExportedProgram or torch.save file", step="load",
                             file=display)
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len < _SAFETENSORS_MAX_HEADER and head[8:9] == b"{":
            return "safetensors"
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return "torch_save"  # legacy (non-zip) torch.save pickle
    if head[:1] == b"\x08" and is_onnx(path):  # a ModelProto starts with its ir_version field
        return "onnx"
    raise ModelLoadError("not a PyTorch model file (no TorchScript, ExportedProgram, torch.save or safetensors "
                         "header found)", step="load", file=display,
                         hint="portq takes torch.jit.save archives, torch.export.save .pt2 files, state dicts "
                              "with --arch, safetensors with --arch, and ONNX files (portq optimize)")


def load_model(req: LoadRequest) -> LoadedModel:
    kind = detect_kind(req.path, req.display)
    loader = LOADERS.get(kind)
    try:
        model = loader(req)
    except ModelLoadError:
        raise
    except Exception as e:  # torch raises RuntimeError for nearly everything
        raise ModelLoadError(f"cannot load {kind.replace('_', ' ')}: {first_line(e)}", step="load",
                             file=req.display) from e
    if model.program is None and hasattr(model.module, "eval"):  # an ExportedProgram's module refuses eval()
        model.module.eval()
    return model


def is_onnx(path: Path) -> bool:
    """An ONNX model file (its graph parses and has nodes)."""
    try:
        import onnx

        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:
        return False


@LOADERS.register("onnx")
def _load_onnx(req: LoadRequest) -> LoadedModel:
    """An ONNX file as a source (`portq optimize`): run by onnxruntime; its example inputs follow its graph
    (dims without a fixed size at 2, integers 0 and 1) unless --input or a sidecar .npz says otherwise."""
    import numpy as np
    import onnx
    import torch
    from portq.tasks.sources.recipes import onnx_module

    proto = onnx.load(str(req.path), load_external_data=False)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    example = []
    for value in inputs:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        shape = [d.dim_value if d.dim_value > 0 else 2 for d in tensor.shape.dim]
        array = (np.random.default_rng(0).standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f"
                 else np.zeros(shape, dtype=dtype))
        example.append(torch.from_numpy(array))
    return LoadedModel(kind="onnx", module=onnx_module(str(req.path)), input_names=[i.name for i in inputs],
                       example_inputs=tuple(example), onnx=str(req.path))


@LOADERS.register("torchscript")
def _load_torchscript(req: LoadRequest) -> LoadedModel:
    import torch
    from portq.tasks.sources.traced_loops import BAKED_LOOP_CAUSE, BAKED_LOOP_HINT, baked_data_dependent_loops

    script = torch.jit.load(str(req.path), map_location="cpu")
    names = [a.name for a in script.forward.schema.arguments][1:]
    baked = baked_data_dependent_loops(script)
    if baked:  # the archive is wrong for other inputs before any exporter sees it
        raise ModelLoadError(BAKED_LOOP_CAUSE.format(where="; ".join(baked)), step="load", file=req.display,
                             hint=BAKED_LOOP_HINT)
    script, notes = float_equivalent(script, req.display)
    return LoadedModel(kind="torchscript", module=script, script=script, input_names=names, notes=notes)


#: packages whose output classes (pytree nodes, e.g. transformers' ModelOutput) a .pt2 may name; portq
#: imports one of these when a program needs it. Other packages are never imported on a file's say-so.
PYTREE_PACKAGES = ("transformers", "diffusers", "timm", "torchvision", "torchaudio", "peft", "sentence_transformers")
_UNREGISTERED_PYTREE = re.compile(r"Deserializing ([\w.]+) in pytree is not registered")


def _load_program(req: LoadRequest) -> Any:
    """torch.export.load, importing a known package first when the program's outputs use its classes."""
    import importlib.util
    import logging

    import torch

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(logging.Formatter().format(record))  # with the traceback it carries

    for _ in range(3):  # a program may name classes from more than one package
        handler = Collect()
        logger = logging.getLogger("torch.export")
        logger.addHandler(handler)
        try:
            return torch.export.load(str(req.path))
        except Exception as e:
            logged = "\n".join(handler.messages)
            found = _UNREGISTERED_PYTREE.search(f"{logged}\n{e}")
            if not found:
                from portq.tasks.sources.load_failures import describe_load_failure

                failure = describe_load_failure(str(req.path), e, logged)
                raise ModelLoadError(failure.cause, step="load", file=req.display, hint=failure.hint) from e
            type_name = found[1]
            package = type_name.split(".")[0]
            if package not in PYTREE_PACKAGES or importlib.util.find_spec(package) is None:
                raise ModelLoadError(
                    f"the program's inputs or outputs use {type_name}, a class torch.export cannot rebuild "
                    f"without its package", step="load", file=req.display,
                    hint=(f"install {package} on the worker" if package in PYTREE_PACKAGES else
                          "export the model with plain tuple/dict outputs (e.g. a wrapper that returns a dict)"),
                ) from None
            __import__(package)  # registers its pytree nodes; then try again
            importlib.import_module(type_name.rsplit(".", 1)[0])
        finally:
            logger.removeHandler(handler)
    raise ModelLoadError("the program names too many unregistered output classes", step="load", file=req.display)


@LOADERS.register("exported_program")
def _load_exported_program(req: LoadRequest) -> LoadedModel:
    program = _load_program(req)
    example = None
    if program.example_inputs is not None:
        args, kwargs = program.example_inputs
        if not kwargs:
            example = tuple(args)
    names = list(program.graph_signature.user_inputs)
    return LoadedModel(kind="exported_program", module=program.module(), program=program, input_names=names,
                       example_inputs=example)


LOADERS.add("torch_save", load_torch_save)
LOADERS.add("safetensors", load_safetensors)
