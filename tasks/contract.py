"""The job contract: what travels on the queue and what comes back, as versioned, validated data.

A `JobSpec` is the only thing a worker accepts. It is JSON, validated against this module on arrival, and
never unpickled. A `JobReport` is what a worker writes as `report.json`; a `BatchReport` is what
`portq report BATCH --json` prints. Both reports are published as JSON Schema files under `schemas/`.

This module imports neither torch nor Celery: the CLI and the worker's main process both load it.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

JOB_SPEC_VERSION = 1
REPORT_SCHEMA_VERSION = 1

#: The Celery task name; the client sends by name, so it never imports the worker.
CONVERT_TASK = "portq.convert"

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class StepStatus(str, Enum):
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex[:12]


def safe_name(name: str, fallback: str = "model") -> str:
    """A name that is safe as a single path component: no separators, no `..`, no leading dot."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    cleaned = cleaned.replace("..", "_")
    return cleaned[:100] or fallback


def _check_id(value: str) -> str:
    if not _SAFE_ID.match(value):
        raise ValueError(f"{value!r} is not a valid id (letters, digits, '.', '_', '-'; at most 128)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


_INPUT_SPEC = re.compile(r"^\s*(?P<name>[A-Za-z_][\w.]*)\s*:\s*(?P<dtype>[a-z0-9]+)\s*\[(?P<shape>[^\]]*)\]"
                         r"\s*(\{(?P<range>[^}]*)\})?\s*$")
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


class InputSpec(_Strict):
    """One model input as given by `--input 'name:dtype[d0,d1,...]{low,high}'`.

    A dimension is an int, or `name=size` for a dynamic dimension with its example size.
    """

    name: str
    dtype: str
    shape: list[int]
    dynamic: dict[int, str] = Field(default_factory=dict, description="axis -> symbolic name")
    low: float | None = None
    high: float | None = None

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        m = _INPUT_SPEC.match(text)
        if not m:
            raise ValueError(
                f"input spec {text!r} is not of the form name:dtype[d0,d1,...] or name:dtype[...]{{low,high}}, "
                "e.g. 'x:float32[1,3,224,224]' or 'ids:int64[batch=2,16]{0,30000}'"
            )
        dtype = m["dtype"]
        if dtype not in INPUT_DTYPES:
            raise ValueError(f"input spec {text!r}: unknown dtype {dtype!r}; known: {', '.join(INPUT_DTYPES)}")
        shape: list[int] = []
        dynamic: dict[int, str] = {}
        dims = [d.strip() for d in m["shape"].split(",") if d.strip()]
        for axis, dim in enumerate(dims):
            if "=" in dim:
                dim_name, _, size = dim.partition("=")
                dynamic[axis] = dim_name.strip()
                dim = size.strip()
            if not dim.isdigit() or int(dim) < 1:
                raise ValueError(f"input spec {text!r}: dimension {dim!r} is not a positive integer")
            shape.append(int(dim))
        low = high = None
        if m["range"] is not None:
            parts = [p.strip() for p in m["range"].split(",")]
            try:
                low, high = float(parts[0]), float(parts[1])
            except (ValueError, IndexError):
                raise ValueError(f"input spec {text!r}: range must be {{low,high}}") from None
            if not low < high:
                raise ValueError(f"input spec {text!r}: range low must be below high")
        is_int = dtype.startswith(("int", "uint"))
        if is_int and low is None:
            raise ValueError(
                f"input spec {text!r}: integer inputs need a value range, e.g. '{m['name']}:{dtype}[...]{{0,30000}}'"
            )
        return cls(name=m["name"], dtype=dtype, shape=shape, dynamic=dynamic, low=low, high=high)


class Tolerance(_Strict):
    """Parity passes where every element has abs error <= atol OR rel error <= rtol (fails if it exceeds both)."""

    atol: float = Field(1e-4, ge=0)
    rtol: float = Field(1e-3, ge=0)


class ParityOptions(_Strict):
    random_samples: int = Field(2, ge=0, le=64, description="seeded random draws added to the user's samples")
    seed: int = 0


class LatencyOptions(_Strict):
    warmup: int = Field(5, ge=0)
    runs: int = Field(30, ge=1)


class SourceRef(_Strict):
    """A file the client uploaded into the store (content-addressed), with the name the user gave it."""

    key: str
    name: str
    sha256: str
    size: int


class JobSpec(_Strict):
    """One conversion job, as it travels on the queue (JSON, version-checked)."""

    version: Literal[1] = JOB_SPEC_VERSION
    job_id: str
    batch_id: str
    model: str
    source: SourceRef
    sample: SourceRef | None = None
    target: Target = Target.cpu
    formats: list[Format] = Field(default_factory=lambda: [Format.onnx])
    inputs: list[InputSpec] = Field(default_factory=list)
    dynamic: list[str] = Field(default_factory=list, description="dims to export as dynamic, e.g. ['batch']")
    opset: int | None = None
    tolerance: Tolerance = Field(default_factory=Tolerance)
    parity: ParityOptions = Field(default_factory=ParityOptions)
    latency: LatencyOptions = Field(default_factory=LatencyOptions)
    arch: str | None = None
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    trust_pickle: bool = False
    force: bool = False
    submitted_at: str = Field(default_factory=utcnow)

    @field_validator("job_id", "batch_id")
    @classmethod
    def _ids_are_safe(cls, v: str) -> str:
        return _check_id(v)

    @field_validator("model")
    @classmethod
    def _model_is_safe(cls, v: str) -> str:
        if v != safe_name(v):
            raise ValueError(f"model name {v!r} is not a safe path component")
        return v

    @field_validator("formats")
    @classmethod
    def _formats_unique(cls, v: list[Format]) -> list[Format]:
        if not v:
            raise ValueError("at least one format is needed")
        return list(dict.fromkeys(v))

    @property
    def queue(self) -> str:
        return route_for(self.target)

    def options_for_key(self) -> dict[str, Any]:
        """Everything that changes the result; not who asked, when, or under which name."""
        data = self.model_dump(mode="json", exclude={"job_id", "batch_id", "model", "submitted_at", "force"})
        data["source"] = self.source.sha256
        data["sample"] = self.sample.sha256 if self.sample else None
        return data

    def job_key(self, toolchain: dict[str, str]) -> str:
        """Deterministic key from the model's content, the job's options and the toolchain versions."""
        blob = json.dumps({"options": self.options_for_key(), "toolchain": toolchain}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------- reports


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputParity(_Report):
    name: str
    shape: list[int]
    dtype: str
    max_abs_err: float
    max_rel_err: float
    mean_abs_err: float
    passed: bool


class ParityReport(_Report):
    passed: bool
    atol: float
    rtol: float
    samples: int
    seed: int
    device: str
    max_abs_err: float
    max_rel_err: float
    outputs: list[OutputParity]


class LatencyReport(_Report):
    device: str
    warmup: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    source_p50_ms: float
    source_p90_ms: float
    source_p99_ms: float
    source_mean_ms: float
    speedup: float = Field(description="source p50 / artifact p50")


class ArtifactReport(_Report):
    format: Format
    status: StepStatus
    path: str | None = None
    error: str | None = None
    route: str | None = None
    opset: int | None = None
    size_bytes: int | None = None
    parity: ParityReport | None = None
    latency: LatencyReport | None = None


class Failure(_Report):
    kind: str
    step: str | None
    file: str | None
    cause: str
    hint: str | None = None


class JobReport(_Report):
    """`report.json`: what one job produced (written last, after its artifacts)."""

    schema_version: Literal[1] = REPORT_SCHEMA_VERSION
    job_id: str
    job_key: str | None = None
    batch: str
    model: str
    source: str
    target: Target
    status: JobStatus
    error: str | None = None
    failure: Failure | None = None
    cached: bool = False
    artifacts: list[ArtifactReport] = Field(default_factory=list)
    inputs: list[dict[str, Any]] = Field(default_factory=list)
    toolchain: dict[str, str] = Field(default_factory=dict)
    worker: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    trust_pickle: bool = Field(False, description="the model was loaded with --trust-pickle (full unpickling)")


class JobRecord(_Report):
    """A job's state in its batch, updated by the client (queued) and the worker (running, finished)."""

    job_id: str
    batch: str
    model: str
    source: str
    target: Target
    status: JobStatus
    error: str | None = None
    result: str | None = Field(None, description="store key of the job's result folder")
    cached: bool = False
    attempts: int = 0
    worker: str | None = Field(None, description="the worker that ran (or runs) the latest attempt")
    dead_letter: str | None = Field(None, description="store key of the job's dead-letter record: it ended "
                                                      "without a report, and `portq retry` can resubmit it")
    updated_at: str = Field(default_factory=utcnow)


class BatchJob(_Report):
    job_id: str
    model: str
    source: str
    target: Target
    status: JobStatus
    error: str | None = None
    cached: bool = False
    report: str | None = Field(None, description="URL of the job's report.json")
    artifacts: list[ArtifactReport] = Field(default_factory=list)


class BatchReport(_Report):
    """What `portq report BATCH --json` prints: a contract that scripts and CI rely on."""

    schema_version: Literal[1] = REPORT_SCHEMA_VERSION
    batch: str
    store: str
    counts: dict[str, int]
    jobs: list[BatchJob]


SCHEMAS: dict[str, type[BaseModel]] = {
    "batch-report.v1.json": BatchReport,
    "job-report.v1.json": JobReport,
    "job-spec.v1.json": JobSpec,
}


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
