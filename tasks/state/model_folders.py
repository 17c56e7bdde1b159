"""Hugging Face model folders as job inputs, on the client's side: what a folder holds, which task it is for, and
the one archive its files travel in.

A folder (`config.json` and `model.safetensors` or `pytorch_model.bin`, or their sharded forms) is checked here
before anything is uploaded: config.json that parses, the weights it needs, no code to run from it unless the
submission allowed it (`--trust-remote-code`), and a task the model has a head for. Then its files are packed
into one uncompressed tar with sorted names and zeroed times, owners and modes, so that the archive's sha256 is a
hash of the folder's content (names and bytes), the job key follows it and the cache works as for a model file.
The worker unpacks it with `portq.tasks.sources.hf_recipe.unpack_folder`.

Torch-free and transformers-free: the client never imports either to submit a folder.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from portq.tasks.core.errors import InputError
from portq.tasks.core.registry import Registry

STEP = "submit"
CONFIG = "config.json"
#: the suffix of a packed folder in the store
ARCHIVE_SUFFIX = ".tar"
#: weights transformers loads, whole or as an index of shards, in its order of preference
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: files of other frameworks and exports that a PyTorch load never reads: left out of the archive
FOREIGN_SUFFIXES = (".h5", ".msgpack", ".onnx", ".onnx_data", ".ot", ".tflite", ".mlmodel", ".gguf")


@dataclass(frozen=True)
class HfTask:
    """A task portq converts Hugging Face models for: the Auto class that loads the model for it, and the endings
    of the architecture names (config.json `architectures`) whose checkpoints carry its head."""

    name: str
    auto_class: str
    heads: tuple[str, ...]


HF_TASKS: Registry[HfTask] = Registry("Hugging Face task")
for _task in (
    HfTask("feature-extraction", "AutoModel", ("Model",)),
    HfTask("text-classification", "AutoModelForSequenceClassification", ("ForSequenceClassification",)),
    HfTask("token-classification", "AutoModelForTokenClassification", ("ForTokenClassification",)),
    HfTask("fill-mask", "AutoModelForMaskedLM", ("ForMaskedLM",)),
    HfTask("question-answering", "AutoModelForQuestionAnswering", ("ForQuestionAnswering",)),
    HfTask("image-classification", "AutoModelForImageClassification", ("ForImageClassification",)),
):
    HF_TASKS.add(_task.name, _task)


def task_of(architecture: str) -> str | None:
    """The task an architecture's head is for (`BertForSequenceClassification` -> text-classification), or None."""
    for name, task in HF_TASKS:
        if any(architecture.endswith(head) for head in task.heads) and name != "feature-extraction":
            return name
    return "feature-extraction" if architecture.endswith("Model") else None


def supported_tasks(architecture: str) -> list[str]:
    """What a checkpoint of this architecture can be converted for: its head's task, and feature-extraction (the
    base model under any head)."""
    own = task_of(architecture)
    return list(dict.fromkeys([t for t in (own, "feature-extraction") if t]))


def is_model_folder(path: Path) -> bool:
    """A folder given as a model: any directory is taken as one (and checked as one)."""
    return path.is_dir()


@dataclass(frozen=True)
class FolderFacts:
    """What a checked folder is: its task (given or read), the architecture config.json names, its files."""

    task: str
    architecture: str | None
    files: list[str]


def _read_config(folder: Path, display: str, step: str = STEP) -> dict[str, object]:
    path = folder / CONFIG
    if not path.is_file():
        raise InputError(f"the folder has no {CONFIG}, so it is not a Hugging Face model folder", step=step,
                         file=display, hint=f"save the model with save_pretrained(), or pass the model files inside "
                                              f"the folder: {display}/*")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{CONFIG} cannot be read as JSON: {e}", step=step, file=display) from None
    if not isinstance(config, dict):
        raise InputError(f"{CONFIG} is not a JSON object", step=step, file=display)
    return config


def _check_weights(folder: Path, display: str, step: str = STEP) -> None:
    found = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not found:
        raise InputError(f"the folder has {CONFIG} but no weights ({', '.join(WEIGHT_FILES)})", step=step,
                         file=display, hint="save the model with save_pretrained(), which writes model.safetensors")
    if found[0].endswith(".index.json"):
        try:
            shards = set(json.loads((folder / found[0]).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{found[0]} is not a shard index with a weight_map: {e}", step=step,
                             file=display) from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise InputError(f"{found[0]} names {len(missing)} weight file(s) the folder does not hold: "
                             f"{', '.join(missing[:3])}", step=step, file=display)


def check_folder(folder: Path, display: str, task: str | None = None, trust_remote_code: bool = False,
                 step: str = STEP) -> FolderFacts:
    """Check a model folder (the client, before anything is uploaded; the worker again, at `step` load); an
    InputError names the folder and the cause."""
    config = _read_config(folder, display, step)
    _check_weights(folder, display, step)
    if config.get("auto_map") and not trust_remote_code:
        raise InputError(f"{CONFIG} maps the model to code shipped with it (auto_map), which loading would run",
                         step=step, file=display,
                         hint="resubmit with --trust-remote-code if you trust where the folder came from")
    architectures = config.get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and architectures and \
        isinstance(architectures[0], str) else None
    known = ", ".join(HF_TASKS.names())
    if task is not None and task not in HF_TASKS:
        raise InputError(f"--task {task!r} is not a task portq converts; known: {known}", step=step, file=display)
    if architecture is None:
        if task is None:
            raise InputError(f"{CONFIG} names no architectures, so the task is unknown", step=step, file=display,
                             hint=f"give --task, one of {known}")
        return FolderFacts(task=task, architecture=None, files=packed_files(folder))
    supported = supported_tasks(architecture)
    if task is None:
        if not supported:
            raise InputError(f"{architecture} is not an architecture portq knows the task of", step=step,
                             file=display, hint=f"give --task, one of {known}")
        task = supported[0]
    elif task not in supported and supported:
        raise InputError(f"{architecture} does not support --task {task}; it supports: {', '.join(supported)}",
                         step=step, file=display)
    return FolderFacts(task=task, architecture=architecture, files=packed_files(folder))


def packed_files(folder: Path) -> list[str]:
    """The files of a folder that go into its archive, as sorted relative POSIX paths: every file (links followed)
    but hidden ones (.git, .cache), other frameworks' weights and, beside safetensors weights, the .bin ones that
    transformers would not read."""
    names: list[str] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = Path(root).relative_to(folder)
        for name in files:
            if name.startswith(".") or name.endswith(FOREIGN_SUFFIXES) or not (Path(root) / name).is_file():
                continue
            names.append((rel_root / name).as_posix())
    has_safetensors = any(n.endswith(".safetensors") for n in names if "/" not in n)
    if has_safetensors:
        names = [n for n in names if not (n.startswith("pytorch_model") and (n.endswith(".bin") or
                                                                             n.endswith(".bin.index.json")))]
    return sorted(names)


def pack_folder(folder: Path, files: list[str], dest: Path) -> Path:
    """Write `files` of `folder` into the tar `dest`: sorted, with zeroed times, owners and modes, so the same
    content always makes the same bytes."""
    with tarfile.open(dest, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            path = folder / name
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return dest


def folder_size(folder: Path, files: list[str]) -> int:
    return sum((folder / name).stat().st_size for name in files)
