"""Building the source model of a `huggingface` job, in plain torch and transformers: portq's builder
(`portq.tasks.sources.huggingface`) and every reproduce script of such a job call this same code, so both hold
the same model.

A Hugging Face model folder travels as one tar archive of its files (`portq.tasks.state.model_folders` packs it
on the client). `build_source(settings, path)` unpacks it into a temporary folder and loads it with the task's
Auto class from local files only (never the network), then wraps it so that it takes its inputs positionally and
returns the tensors of its `ModelOutput` as a tuple, named by `portq_output_names` (`logits`,
`last_hidden_state`), which the runtimes give its outputs.

So this module stands alone: torch and transformers are imported inside functions, portq never.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

#: the variables that keep transformers and huggingface_hub off the network, set while a folder loads
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


class UnsafeArchive(ValueError):
    """An archive member that is not a plain file inside the folder."""


def unpack_folder(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Unpack a packed model folder into `dest`: plain files only, each inside `dest` (a member that is a link, a
    device, an absolute path or one that climbs out with `..` is refused, not skipped)."""
    root = Path(dest)
    with tarfile.open(archive, "r:") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or not parts or member.name.startswith("/") or ".." in parts:
                raise UnsafeArchive(f"archive member {member.name!r} is not a plain file inside the folder")
            target = root.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    return root


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The offline variables set for the duration (and put back after: the process keeps its environment)."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_pretrained(directory: str | os.PathLike[str], auto_class: str, trust_remote_code: bool = False,
                    attention: str | None = "eager") -> Any:
    """The folder's model by the task's Auto class, from local files only, in eval mode; with `attention` (eager:
    the attention onnxruntime's transformer fusion recognises) where the model takes it, else its default."""
    with offline():
        import transformers

        cls = getattr(transformers, auto_class)
        kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        if attention:
            try:
                return cls.from_pretrained(str(directory), attn_implementation=attention, **kwargs).eval()
            except (ValueError, TypeError) as e:
                if "attn_implementation" not in str(e) and "attention" not in str(e).lower():
                    raise
        return cls.from_pretrained(str(directory), **kwargs).eval()


def forward_parameters(model: Any) -> list[str]:
    """The names the model's forward takes."""
    import inspect

    return list(inspect.signature(model.forward).parameters)


def outputs_as_tuple(model: Any, input_names: list[str], output_names: list[str]) -> Any:
    """The model as a module that takes `input_names` positionally (a prefix of them) and returns the tensors named
    `output_names` of its ModelOutput, as a tuple."""
    import torch

    takes_cache = "use_cache" in forward_parameters(model)

    class OutputsAsTuple(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.portq_input_names = list(input_names)
            self.portq_output_names = list(output_names)

        def forward(self, *args: Any) -> tuple[Any, ...]:
            kwargs = dict(zip(self.portq_input_names, args))
            if takes_cache:
                kwargs["use_cache"] = False
            out = self.model(**kwargs, return_dict=True)
            return tuple(out[name] for name in self.portq_output_names)

    # a real signature (input_ids, attention_mask, ...): torch.export matches dynamic shapes to it by name
    import inspect

    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in input_names]
    OutputsAsTuple.forward.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return OutputsAsTuple().eval()


def output_names_of(model: Any, example: dict[str, Any]) -> list[str]:
    """The names of the tensors the model's ModelOutput holds on an example (ModelOutput drops the ones that are
    None)."""
    import torch

    kwargs = dict(example)
    if "use_cache" in forward_parameters(model):
        kwargs["use_cache"] = False
    with torch.no_grad():
        out = model(**kwargs, return_dict=True)
    return [name for name, value in out.items() if isinstance(value, torch.Tensor)]


def build_source(settings: dict[str, Any], path: str | None = None) -> Any:
    """The source model as portq built it. settings: {"model" (the packed folder), "auto_class",
    "trust_remote_code", "attention", "input_names", "output_names"}; `path` overrides settings["model"]."""
    with tempfile.TemporaryDirectory(prefix="portq-hf-") as tmp:
        folder = unpack_folder(path or settings["model"], tmp)
        model = load_pretrained(folder, settings["auto_class"], settings.get("trust_remote_code", False),
                                settings.get("attention"))
    module = outputs_as_tuple(model, settings["input_names"], settings["output_names"])
    return types.SimpleNamespace(module=module, script=None, program=None)
