"""The contract's vocabulary: ids and names, targets and their queues, formats, job kinds, artifact ids.

Everything here is plain Python (no pydantic model): the rest of the contract builds on it.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from enum import Enum

#: The Celery task name; the client sends by name, so it never imports the worker.
CONVERT_TASK = "portq.convert"

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: a variant name: the part of an artifact id after the format (`onnx.opset17` -> `opset17`)
VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
DEFAULT_VARIANT = "default"


class Target(str, Enum):
    """Where the artifact will be served; decides the routing queue and the device parity runs on."""

    cpu = "cpu"
    cuda = "cuda"


_QUEUE_FOR_TARGET = {Target.cpu: "cpu", Target.cuda: "gpu"}
QUEUES = tuple(_QUEUE_FOR_TARGET.values())


def route_for(target: Target | str) -> str:
    """The Celery queue that serves a target: cpu -> `cpu`, cuda -> `gpu`."""
    return _QUEUE_FOR_TARGET[Target(target)]


class Format(str, Enum):
    """Artifact formats. Each is produced by its own step registered in `portq.tasks.formats`."""

    onnx = "onnx"
    torchscript = "torchscript"
    pt2 = "pt2"
    aoti = "aoti"


class JobKind(str, Enum):
    """What a job builds its source model from; each kind has a source builder (portq.tasks.sources.builders)."""

    convert = "convert"
    fuse = "fuse"
    huggingface = "huggingface"


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex[:12]


def safe_name(name: str, fallback: str = "model") -> str:
    """A name that is safe as a single path component: no separators, no `..`, no leading dot."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    cleaned = cleaned.replace("..", "_")
    return cleaned[:100] or fallback


#: a model's example inputs beside it: `<stem>.npz`
SIDECAR_SUFFIX = ".npz"


def model_name(path: str) -> str:
    """A job's model name: the file's stem (`models/mlp.pt` -> `mlp`), made safe as a path component."""
    from pathlib import PurePath

    p = PurePath(path)
    return safe_name(p.stem if p.suffix else p.name)


def check_id(value: str) -> str:
    """The value, if it is safe as a job, batch or series id (it names store keys and folders)."""
    if not SAFE_ID.match(value):
        raise ValueError(f"{value!r} is not a valid id (letters, digits, '.', '_', '-'; at most 128)")
    return value


def artifact_id(fmt: Format | str, variant: str = DEFAULT_VARIANT) -> str:
    """`onnx` for a format's default variant, `onnx.opset17` for another."""
    value = Format(fmt).value
    return value if variant == DEFAULT_VARIANT else f"{value}.{variant}"
