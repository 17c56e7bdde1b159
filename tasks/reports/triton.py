"""Triton model repositories from a batch (`portq package BATCH --triton DIR`).

One model per succeeded job, from its best artifact (or the one asked for), laid out as Triton's model repository
documentation requires:

    DIR/<name>/config.pbtxt                 name == the folder's name, platform, inputs, outputs, batching
    DIR/<name>/README.md                    the parity and latency summary, the names' mapping
    DIR/<name>/1/model.onnx                 onnxruntime_onnx (its external data files beside it), or
    DIR/<name>/1/model.pt                   pytorch_libtorch (TorchScript)
    DIR/<name>/1/provenance.intoto.json     the artifact's provenance record, unchanged (`portq verify DIR`)

The config's tensors come from the artifact: the ONNX graph's inputs and outputs (names, element types, dims), or,
for TorchScript, which has no signature Triton can read, the job's recorded inputs and parity outputs under the
libtorch backend's names (INPUT__0, OUTPUT__0, ...). When the batch dim (the first) is dynamic in every input
and output, the config batches (`max_batch_size`, `dynamic_batching`) and its dims leave the batch dim out;
otherwise `max_batch_size: 0` and the full dims.

Everything is written into a staging folder beside DIR and renamed into place once complete, after the copied
files were checked against their provenance records: an error leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portq.tasks.core.contract import ArtifactReport, JobReport, JobStatus
from portq.tasks.core.errors import ConfigError, InputError
from portq.tasks.reports.content import parity_summary, speedup_text
from portq.tasks.reports.provenance import PROVENANCE_FILE, TRITON_FILENAMES, verify_record
from portq.tasks.state.records import list_records, read_report, require_batch
from portq.tasks.state.store import Store

#: the Triton platform serving each format portq packages (other formats are skipped, with why)
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}
#: the version folder every packaged model gets
VERSION = "1"
#: Triton data types by ONNX element type (onnx.TensorProto) and by numpy dtype name
ONNX_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
              7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
              12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}
NUMPY_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
               "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
               "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
               "bool": "TYPE_BOOL"}
#: a Triton model name: one path component that is safe in URLs (the HTTP/gRPC APIs name models in paths)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Tensor:
    """One input or output as Triton's config names it; `dims` with -1 for a variable dim, batch dim included."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    original: str  # the artifact's own name for it


@dataclass(frozen=True)
class Signature:
    inputs: list[Tensor]
    outputs: list[Tensor]

    @property
    def batchable(self) -> bool:
        """The first dim is variable in every input and output: Triton may batch requests."""
        return all(t.dims and t.dims[0] == -1 for t in [*self.inputs, *self.outputs])


@dataclass
class PackagedModel:
    name: str
    job_id: str
    model: str
    artifact: str
    platform: str
    folder: Path


@dataclass
class Packaged:
    """What `package` wrote (each model's folder) and which jobs it skipped, with why."""

    directory: Path
    models: list[PackagedModel] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (job's model (job id), reason)


# ------------------------------------------------------------------------------------------- signatures


def _tensor_type(value_info: Any, where: str) -> tuple[str, tuple[int, ...]]:
    t = value_info.type.tensor_type
    data_type = ONNX_TYPES.get(t.elem_type)
    if data_type is None:
        raise InputError(f"{where}: tensor {value_info.name!r} has ONNX element type {t.elem_type}, which Triton "
                         "has no data type for", step="package", file=where)
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim)
    return data_type, dims


def onnx_signature(path: Path) -> Signature:
    """The graph's real inputs (initializers left out) and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    inputs = [Tensor(v.name, *_tensor_type(v, str(path)), original=v.name)
              for v in graph.input if v.name not in weights]
    outputs = [Tensor(v.name, *_tensor_type(v, str(path)), original=v.name) for v in graph.output]
    return Signature(inputs, outputs)


def _numpy_type(dtype: str, name: str, report: JobReport) -> str:
    data_type = NUMPY_TYPES.get(dtype)
    if data_type is None:
        raise InputError(f"{name} of {report.source} has dtype {dtype}, which Triton has no data type for",
                         step="package", file=report.source)
    return data_type


def torchscript_signature(report: JobReport, artifact: ArtifactReport) -> Signature:
    """The job's recorded inputs (name, dtype, shape, dynamic axes) and the artifact's parity outputs, under the
    libtorch backend's INPUT__i / OUTPUT__i names."""
    if not report.inputs or artifact.parity is None or not artifact.parity.outputs:
        raise InputError(f"the report of {report.source} records no input or output signature for "
                         f"{artifact.id}", step="package", file=report.source)
    inputs, varying = [], False
    for i, spec in enumerate(report.inputs):
        dynamic = {int(k) for k in (spec.get("dynamic") or {})}
        varying |= bool(dynamic - {0})
        shape = tuple(-1 if axis in dynamic else int(d) for axis, d in enumerate(spec.get("shape") or []))
        inputs.append(Tensor(f"INPUT__{i}", _numpy_type(str(spec.get("dtype")), str(spec.get("name")), report),
                             shape, original=str(spec.get("name"))))
    batch = bool(inputs) and all(t.dims and t.dims[0] == -1 for t in inputs)
    outputs = []
    for i, out in enumerate(artifact.parity.outputs):
        dims = [-1 if varying and axis > 0 else d for axis, d in enumerate(out.shape)]
        if batch and dims:
            dims[0] = -1  # the batch dim follows the inputs'
        outputs.append(Tensor(f"OUTPUT__{i}", _numpy_type(out.dtype, out.name, report), tuple(dims),
                              original=out.name))
    return Signature(inputs, outputs)


# ---------------------------------------------------------------------------------------------- config


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensors(kind: str, tensors: list[Tensor], batching: bool) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        dims = t.dims[1:] if batching else t.dims
        lines += ["  {", f"    name: {_quoted(t.name)}", f"    data_type: {t.data_type}"]
        if dims:
            lines.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
        else:  # a scalar (per request): Triton wants a shape, the model takes none
            lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
        lines.append("  }" + ("," if i < len(tensors) - 1 else ""))
    return [*lines, "]"]


def config_text(name: str, platform: str, signature: Signature, max_batch_size: int, device: str) -> str:
    """config.pbtxt (Triton's ModelConfig in protobuf text format)."""
    batching = signature.batchable and max_batch_size > 0
    lines = [f"name: {_quoted(name)}", f"platform: {_quoted(platform)}",
             f"max_batch_size: {max_batch_size if batching else 0}",
             *_tensors("input", signature.inputs, batching), *_tensors("output", signature.outputs, batching),
             f"instance_group [ {{ kind: {'KIND_GPU' if device == 'cuda' else 'KIND_CPU'} }} ]"]
    if batching:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def largest_batch(artifact: ArtifactReport) -> int:
    """The largest batch the job ran the artifact at (its parity samples and latency sweep): the served range
    stays one that was checked."""
    sizes = [s[0][0] for s in (artifact.parity.sample_shapes if artifact.parity else []) if s and s[0]]
    sizes += [p.batch_size for p in (artifact.latency.sweep if artifact.latency else [])]
    return max([1, *sizes])


def readme_text(name: str, batch: str, report: JobReport, artifact: ArtifactReport, platform: str,
                signature: Signature, max_batch_size: int, model_file: str) -> str:
    rows = [f"| {kind} | `{t.name}` | `{t.original}` | {t.data_type} | {list(t.dims)} |"
            for kind, ts in (("input", signature.inputs), ("output", signature.outputs)) for t in ts]
    lat = artifact.latency
    parity = parity_summary(artifact.parity) if artifact.parity else "not checked"
    lines = [
        f"# {name}", "",
        f"Packaged by portq from batch `{batch}`, job `{report.job_id}`: model `{report.model}` "
        f"(source `{report.source}`), artifact `{artifact.id}` ({artifact.format.value}, "
        f"{artifact.precision.value if artifact.precision else 'fp32'}), checked on {report.target.value}; "
        f"served by Triton's `{platform}` platform from `{VERSION}/{model_file}`.", "",
        "## Parity", "", f"{'passed' if artifact.parity and artifact.parity.passed else 'FAILED'}: {parity}", "",
        "## Latency", "",
        (f"p50 {lat.p50_ms:.3f} ms on {lat.device} (source {lat.source_p50_ms:.3f} ms); speedup "
         f"{speedup_text(artifact)}" if lat else "not measured"), "",
        "## Inputs and outputs", "",
        f"max_batch_size {max_batch_size}" + (" with dynamic batching (dims below include the batch dim as -1; "
                                              "config.pbtxt leaves it out)" if max_batch_size else
                                              " (no batching: config.pbtxt has the full dims)"), "",
        "| | Triton name | model's name | data type | dims |", "|---|---|---|---|---|", *rows, "",
        "## Provenance", "",
        f"`{VERSION}/{PROVENANCE_FILE}` is the artifact's provenance record as portq wrote it (an in-toto "
        "Statement with SLSA provenance: the files' sha256, the job, the toolchain, the verdicts). "
        "`portq verify <repository>` recomputes the digests.", "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- packaging


def model_name(text: str, taken: set[str]) -> str:
    """A Triton model name from a job's model name: safe characters only, unique in the repository."""
    base = _UNSAFE.sub("_", text).lstrip(".-")[:100] or "model"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def _pick(report: JobReport, artifact_id: str | None) -> tuple[ArtifactReport | None, str]:
    wanted = artifact_id or report.best
    if wanted is None:
        return None, "no artifact passed parity (no best pick)"
    artifact = report.artifact(wanted)
    if artifact is None or artifact.path is None:
        return None, f"it has no artifact {wanted!r} (its artifacts: {', '.join(a.id for a in report.artifacts)})"
    if not artifact.good:
        return None, f"its artifact {wanted} did not pass parity"
    if artifact.format.value not in PLATFORMS:
        return None, (f"its artifact {wanted} is {artifact.format.value}, which Triton serves from neither ONNX "
                      "Runtime nor libtorch (package an onnx or torchscript artifact: --artifact)")
    if artifact.provenance is None:
        return None, "its result has no provenance record (made before portq wrote them): submit it again with --force"
    return artifact, ""


def _copy(store: Store, key: str, dest: Path) -> None:
    with store.local_file(key) as path:
        shutil.copyfile(path, dest)


def _write_model(store: Store, staging: Path, name: str, result: str, report: JobReport, artifact: ArtifactReport,
                 max_batch_size: int | None) -> PackagedModel:
    platform = PLATFORMS[artifact.format.value]
    folder = staging / name
    version = folder / VERSION
    version.mkdir(parents=True)
    model_file = TRITON_FILENAMES[platform]
    assert artifact.path is not None and artifact.provenance is not None
    _copy(store, f"{result}/{artifact.path}", version / model_file)
    for data in artifact.data:
        _copy(store, f"{result}/{data}", version / Path(data).name)
    _copy(store, f"{result}/{artifact.provenance}", version / PROVENANCE_FILE)
    signature = onnx_signature(version / model_file) if platform == "onnxruntime_onnx" \
        else torchscript_signature(report, artifact)
    batch_size = (max_batch_size or largest_batch(artifact)) if signature.batchable else 0
    (folder / "config.pbtxt").write_text(config_text(name, platform, signature, batch_size, report.target.value))
    (folder / "README.md").write_text(readme_text(name, report.batch, report, artifact, platform, signature,
                                                  batch_size, model_file))
    return PackagedModel(name, report.job_id, report.model, artifact.id, platform, folder)


def package(store: Store, batch: str, directory: Path, *, artifact_id: str | None = None,
            max_batch_size: int | None = None) -> Packaged:
    """Write the batch's servable artifacts as a Triton model repository at `directory` (created, or an existing
    repository the models are added to; a model folder that exists already is refused). Failed jobs and jobs
    without a servable artifact are skipped, with why; nothing is written when none is packaged."""
    directory = directory.resolve()
    if max_batch_size is not None and max_batch_size < 1:
        raise ConfigError("--max-batch-size must be at least 1", step="package")
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} is a file, not a model repository folder", step="package")
    require_batch(store, batch)
    done = Packaged(directory)
    chosen: list[tuple[str, JobReport, ArtifactReport]] = []
    for record in list_records(store, batch):
        label = f"{record.model} ({record.job_id})"
        if record.status is not JobStatus.succeeded:
            why = f": {record.error}" if record.error else ""
            done.skipped.append((label, f"job {record.status.value}{why}"))
            continue
        report = read_report(store, record)
        if report is None or record.result is None:
            done.skipped.append((label, "its report is missing from the store"))
            continue
        artifact, why = _pick(report, artifact_id)
        if artifact is None:
            done.skipped.append((label, why))
            continue
        chosen.append((record.result, report, artifact))
    if not chosen:
        return done
    existing = set(os.listdir(directory)) if directory.exists() else set()
    taken: set[str] = set()
    names = [model_name(report.model, taken) for _, report, _ in chosen]
    clash = sorted(existing & set(names))
    if clash:
        raise ConfigError(f"{directory} already holds model folder(s) {', '.join(clash)}", step="package",
                          file=str(directory), hint="remove them, or package into another folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.portq-", dir=directory.parent))
    moved: list[Path] = []
    try:
        for name, (result, report, artifact) in zip(names, chosen):
            model = _write_model(store, staging, name, result, report, artifact, max_batch_size)
            check = verify_record(Store(str(staging)), f"{name}/{VERSION}/{PROVENANCE_FILE}")
            if check.problems:
                raise InputError(f"{store.url(result + '/' + str(artifact.path))} does not match its provenance "
                                 f"record ({check.problems[0].what}); refusing to package it", step="package",
                                 file=store.url(f"{result}/{artifact.path}"),
                                 hint=f"`portq verify {batch}` lists what changed")
            done.models.append(model)
        if not directory.exists():
            os.rename(staging, directory)  # the whole repository appears at once
        else:
            for model in done.models:
                target = directory / model.name
                os.rename(model.folder, target)
                moved.append(target)
        for model in done.models:
            model.folder = directory / model.name
    except BaseException:
        for path in moved:
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return done
