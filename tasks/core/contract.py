"""The job contract: what travels on the queue and what comes back, as versioned, validated data.

A `JobSpec` is the only thing a worker accepts. It is JSON, validated against this module on arrival, and
never unpickled. Version 2 splits a job into its identity (job id, batch, model name, submitted at), its
kind and source description (what model to build: `convert` one file, `fuse` several into one; each kind
has a source builder in `portq.tasks.sources.builders`), and one versioned `JobOptions` object (target,
requested artifacts, inputs, tolerances, parity and latency options). Each requested artifact is a format plus a
variant with that format's options, named by an artifact id (`onnx`, `onnx.opset17`).

A `JobReport` is what a worker writes as `report.json`; a `BatchReport` is what `portq report BATCH --json`
prints; a `Comparison` and a `SeriesHistory` are what `portq compare` and `portq history` print as JSON. All
of them are published as JSON Schema files under `schemas/`.

This module imports neither torch nor Celery: the CLI and the worker's main process both load it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

JOB_SPEC_VERSION: Literal[2] = 2
REPORT_SCHEMA_VERSION: Literal[2] = 2

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


def json_float(x: float) -> float:
    """JSON has no Infinity or NaN: report the largest float instead, which still fails any tolerance."""
    return x if math.isfinite(x) else sys.float_info.max


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


def _check_id(value: str) -> str:
    if not SAFE_ID.match(value):
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


class ToleranceMode(str, Enum):
    """How parity judges an output: per element, or on a statistic of the errors (see portq.tasks.checks.tolerances)."""

    elementwise = "elementwise"
    max = "max"
    mean = "mean"
    median = "median"
    quantile = "quantile"


class Precision(str, Enum):
    """The numeric precision an artifact computes in; picks the default tolerance (portq.tasks.checks.tolerances)."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


class OutputTolerance(_Strict):
    """A per-output override; a field left out falls back to the job's, then to the precision's default."""

    mode: ToleranceMode | None = None
    atol: float | None = Field(None, ge=0)
    rtol: float | None = Field(None, ge=0)
    quantile: float | None = Field(None, gt=0, le=1)


class Tolerance(_Strict):
    """Parity tolerances. Unset fields take the precision's default (fp32: elementwise, atol 1e-4, rtol 1e-3).

    Elementwise: an element fails when it exceeds both atol and rtol. Statistic modes: the output fails when
    the statistic of the absolute error exceeds atol and that of the relative error exceeds rtol.
    """

    atol: float | None = Field(None, ge=0, description="absolute tolerance; unset: the precision's default")
    rtol: float | None = Field(None, ge=0, description="relative tolerance; unset: the precision's default")
    mode: ToleranceMode | None = Field(None, description="elementwise, or a statistic; unset: precision default")
    quantile: float | None = Field(None, gt=0, le=1, description="q for mode quantile (default 0.99)")
    precision: Precision | None = Field(None, description="unset: the artifact's, else inferred from the model")
    outputs: dict[str, OutputTolerance] = Field(
        default_factory=dict, description="per-output overrides, keyed by output name or fnmatch pattern")


class ParityOptions(_Strict):
    random_samples: int = Field(2, ge=0, le=64, description="seeded random draws added to the user's samples")
    seed: int = 0
    localise: bool = Field(True, description="when parity fails, find the first operator whose values diverge")


class LatencyOptions(_Strict):
    """Warm-up, then timed windows until the last `windows` window medians agree within `stability`."""

    warmup: int = Field(5, ge=0)
    runs: int = Field(30, ge=1, description="timed runs at least, split evenly into `windows` windows")
    windows: int = Field(3, ge=2, description="the last this many windows' medians must agree")
    stability: float = Field(0.10, gt=0, description="(max - min) / min of those medians must not exceed this")
    max_windows: int = Field(12, ge=2, description="give up (report unstable) after this many windows")
    min_window_ms: float = Field(20.0, ge=0, description="a window runs at least this long (fast models)")
    max_seconds: float = Field(30.0, gt=0, description="time budget per measurement; then report unstable")
    batch_sizes: list[int] = Field(default_factory=list, description="batch sizes to sweep when the batch dim "
                                   "is dynamic; empty: 1, the sample's and 8")
    sweep: bool = Field(True, description="sweep batch sizes when the batch dim is dynamic")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive")
        return sorted(set(v))


class SourceRef(_Strict):
    """A file the client uploaded into the store (content-addressed), with the name the user gave it."""

    key: str
    name: str
    sha256: str
    size: int


def _key_material(data: Any) -> Any:
    """The options' JSON with every uploaded file reduced to its content hash (names and keys do not matter)."""
    if isinstance(data, dict):
        if set(data) == {"key", "name", "sha256", "size"}:
            return data["sha256"]
        return {k: _key_material(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_key_material(v) for v in data]
    return data


class ConvertSource(_Strict):
    """Source description of a `convert` job: one model file, and how to load it."""

    kind: Literal["convert"] = "convert"
    model: SourceRef
    arch: str | None = Field(None, description="package.module:Class for state dicts and safetensors files")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    trust_pickle: bool = Field(False, description="allow full unpickling of torch.save files (runs their code)")

    @property
    def display(self) -> str:
        """The name errors and reports use for this source: the file the user gave."""
        return self.model.name

    def files(self) -> list[SourceRef]:
        """Every uploaded file this source reads (the worker checks each against its size limits)."""
        return [self.model]

    def model_files(self) -> list[SourceRef]:
        return [self.model]

    def data_files(self) -> list[SourceRef]:
        return []

    def key_material(self) -> Any:
        return _key_material(self.model_dump(mode="json"))


class FuseMember(_Strict):
    """One model of a fusion: its uploaded file, the label messages and reports use, and how to load it."""

    model: SourceRef
    name: str = Field(description="the member's label: its file name, or the path as given where names clash")
    arch: str | None = Field(None, description="package.module:Class for state dicts and safetensors files")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    trust_pickle: bool = Field(False, description="allow full unpickling of torch.save files (runs their code)")


class FinetuneOptions(_Strict):
    """A fine-tune of the fused model: Adam on the data's inputs and labels, on the job's target device."""

    data: SourceRef = Field(description="an .npz of the model's inputs and a `labels` array")
    epochs: int = Field(5, ge=1, le=100_000)
    lr: float = Field(1e-3, gt=0, le=10)
    seed: int = 0
    batch_size: int = Field(64, ge=1, description="examples per Adam step")


class FuseSource(_Strict):
    """Source description of a `fuse` job: the members, the method and its parameters, and the data it uses.

    Methods and their parameters are checked against `portq.tasks.fusion.methods.FUSION_METHODS` by the
    client and again when the job starts; this model only keeps the shape of the description.
    """

    kind: Literal["fuse"] = "fuse"
    members: list[FuseMember] = Field(min_length=1)
    method: str
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters (weights, t, "
                                                                     "density, scale, metric, tie_break, dim)")
    base: FuseMember | None = Field(None, description="the model task vectors are taken from (task-arithmetic, "
                                                      "ties)")
    eval_data: SourceRef | None = Field(None, description="an .npz of inputs and `labels` to score members and "
                                                          "the fused model (greedy-soup needs it)")
    calibration: SourceRef | None = Field(None, description="an .npz of inputs to recompute BatchNorm statistics")
    finetune: FinetuneOptions | None = None

    @property
    def display(self) -> str:
        """`fuse(soup: a.pt, b.pt)`: the method and its members, as errors and reports name this source."""
        base = f"; base {self.base.name}" if self.base is not None else ""
        return f"fuse({self.method}: {', '.join(m.name for m in self.members)}{base})"

    @property
    def trust_pickle(self) -> bool:
        return any(m.trust_pickle for m in self.all_members())

    def all_members(self) -> list[FuseMember]:
        return [*self.members, *([self.base] if self.base is not None else [])]

    def model_files(self) -> list[SourceRef]:
        return [m.model for m in self.all_members()]

    def data_files(self) -> list[SourceRef]:
        return [ref for ref in (self.eval_data, self.calibration, self.finetune.data if self.finetune else None)
                if ref is not None]

    def files(self) -> list[SourceRef]:
        """Every uploaded file this source reads (the worker checks each against its size limits)."""
        return [*self.model_files(), *self.data_files()]

    def key_material(self) -> Any:
        """Content, method and parameters; not the members' labels, which only name them in messages."""
        data = self.model_dump(mode="json")
        for member in [*data["members"], *([data["base"]] if data["base"] else [])]:
            member.pop("name")
        return _key_material(data)


#: Every source description a job can carry, told apart by `kind`; a kind is added here, to `JobKind` and
#: to `portq.tasks.sources.builders`.
SourceDescription = Annotated[ConvertSource | FuseSource, Field(discriminator="kind")]


class ArtifactRequest(_Strict):
    """One artifact to produce: a format, a variant of it, and that format's options.

    The artifact's id is the format for the default variant (`onnx`) and `format.variant` otherwise
    (`onnx.opset17`): it names the artifact's folder, its reproduce script, its report entry and the job's
    best pick. Variants and options are checked against the format's registry (`portq.tasks.formats`).
    """

    format: Format
    variant: str = DEFAULT_VARIANT
    options: dict[str, Any] = Field(default_factory=dict, description="the format's options, e.g. {'opset': 17}")

    @field_validator("variant")
    @classmethod
    def _variant_is_a_name(cls, v: str) -> str:
        if not VARIANT_NAME.match(v):
            raise ValueError(f"variant {v!r} is not a valid name (lower-case letters, digits, '_', '-')")
        return v

    @property
    def id(self) -> str:
        return artifact_id(self.format, self.variant)

    @classmethod
    def parse(cls, text: str) -> ArtifactRequest:
        """`onnx` (the format's default variant) or `onnx.opset17` (format, then variant)."""
        fmt, _, variant = text.strip().partition(".")
        try:
            format_ = Format(fmt)
        except ValueError:
            known = ", ".join(f.value for f in Format)
            raise ValueError(f"{text!r} is not an artifact: a format ({known}), optionally followed by "
                             "'.VARIANT', e.g. onnx or onnx.opset17") from None
        variant = variant or DEFAULT_VARIANT
        if not VARIANT_NAME.match(variant):
            raise ValueError(f"{text!r}: variant {variant!r} is not a valid name (lower-case letters, digits, '_', "
                             "'-')")
        return cls(format=format_, variant=variant)


def artifact_id(fmt: Format | str, variant: str = DEFAULT_VARIANT) -> str:
    value = Format(fmt).value
    return value if variant == DEFAULT_VARIANT else f"{value}.{variant}"


class OptimizeOptions(_Strict):
    """`--optimize`: which optimization variants to try besides the requested artifacts, and which lossy
    precisions the user allows. The job expands it on the worker, which knows the target and its hardware."""

    candidates: list[str] = Field(default_factory=lambda: ["auto"], description="'auto', or variant names such "
                                  "as ort-all, int8-dynamic (each tried for every requested format that has it)")
    precisions: list[Precision] = Field(default_factory=list, description="lossy precisions allowed (fp16, bf16, "
                                        "int8); lossless variants are always allowed")
    calibration: list[SourceRef] = Field(default_factory=list, description="static quantization samples (.npz); "
                                         "empty: the job's own samples")
    repair: bool = Field(True, description="when a half-precision variant fails parity, try a mixed-precision one "
                                           "that keeps the diverging nodes in float32")

    @field_validator("precisions")
    @classmethod
    def _lossy_only(cls, v: list[Precision]) -> list[Precision]:
        return [p for p in dict.fromkeys(v) if p is not Precision.fp32]


class JobOptions(_Strict):
    """Everything about a job that changes its result, apart from its source: hashed into the job key."""

    version: Literal[2] = JOB_SPEC_VERSION
    target: Target = Target.cpu
    artifacts: list[ArtifactRequest] = Field(default_factory=lambda: [ArtifactRequest(format=Format.onnx)])
    sample: SourceRef | None = Field(None, description="a sidecar .npz of example inputs, uploaded with the model")
    inputs: list[InputSpec] = Field(default_factory=list)
    dynamic: list[str] = Field(default_factory=list, description="dims to export as dynamic, e.g. ['batch']")
    tolerance: Tolerance = Field(default_factory=lambda: Tolerance())
    parity: ParityOptions = Field(default_factory=lambda: ParityOptions())
    latency: LatencyOptions = Field(default_factory=lambda: LatencyOptions())
    optimize: OptimizeOptions | None = Field(None, description="optimization variants to try (--optimize)")

    @field_validator("artifacts")
    @classmethod
    def _artifacts_unique(cls, v: list[ArtifactRequest]) -> list[ArtifactRequest]:
        if not v:
            raise ValueError("at least one artifact (format) is needed")
        seen: dict[str, ArtifactRequest] = {}
        for request in v:
            if request.id in seen and seen[request.id] != request:
                raise ValueError(f"artifact {request.id} is requested twice with different options")
            seen.setdefault(request.id, request)
        return list(seen.values())


class JobSpec(_Strict):
    """One job, as it travels on the queue (JSON, version-checked): identity, kind and source, options."""

    version: Literal[2] = JOB_SPEC_VERSION
    job_id: str
    batch_id: str
    model: str
    submitted_at: str = Field(default_factory=utcnow)
    kind: JobKind = JobKind.convert
    source: SourceDescription
    options: JobOptions = Field(default_factory=lambda: JobOptions())
    force: bool = Field(False, description="run again even when an identical job's result is cached")

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

    @model_validator(mode="after")
    def _kind_matches_source(self) -> JobSpec:
        if self.source.kind != self.kind.value:
            raise ValueError(f"a {self.kind.value} job carries a {self.source.kind} source description")
        return self

    @property
    def target(self) -> Target:
        return self.options.target

    @property
    def queue(self) -> str:
        return route_for(self.options.target)

    @property
    def display(self) -> str:
        """The source as errors and reports name it (the model file the user gave)."""
        return self.source.display

    def key_material(self) -> dict[str, Any]:
        """Everything that changes the result; not who asked, when, or under which name."""
        return {"kind": self.kind.value, "source": self.source.key_material(),
                "options": _key_material(self.options.model_dump(mode="json"))}

    def job_key(self, toolchain: dict[str, str]) -> str:
        """Deterministic key from the source's content, the job's options and the toolchain versions."""
        blob = json.dumps({**self.key_material(), "toolchain": toolchain}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------- reports


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Histogram(_Report):
    """Counts of values in bins [edges[i], edges[i+1]); `zeros` counts exact zeros kept off a log axis and
    `above` the values past the last edge (latency: the slowest 1%, so outliers do not flatten the plot)."""

    scale: Literal["linear", "log10"] = "linear"
    edges: list[float] = Field(default_factory=list)
    counts: list[int] = Field(default_factory=list)
    zeros: int = 0
    above: int = 0


class AppliedTolerance(_Report):
    """The tolerance an output was held to, resolved from overrides, job options and precision defaults."""

    mode: ToleranceMode
    atol: float
    rtol: float
    quantile: float | None = None
    origin: str = ""


class OutputParity(_Report):
    """Parity of one output over all samples. Errors are |artifact - source|; relative errors divide by
    |source| and are taken over elements whose source value is finite and non-zero."""

    name: str
    shape: list[int]
    dtype: str
    max_abs_err: float
    max_rel_err: float
    mean_abs_err: float
    passed: bool
    elements: int = 0
    failing_elements: int = Field(0, description="elements exceeding both atol and rtol (elementwise view)")
    mean_rel_err: float = 0.0
    median_abs_err: float = 0.0
    median_rel_err: float = 0.0
    p99_abs_err: float = 0.0
    p99_rel_err: float = 0.0
    cosine_similarity: float | None = Field(None, description="over all finite elements; 1.0 for two zero vectors")
    nan_source: int = 0
    inf_source: int = 0
    nan_artifact: int = 0
    inf_artifact: int = 0
    nonfinite_mismatches: int = Field(0, description="NaN/Inf on one side not matched on the other (always fails)")
    top1_agreement: float | None = Field(None, description="classifier-like outputs: share of rows whose argmax "
                                         "over the last axis agrees")
    topk: int | None = None
    topk_agreement: float | None = Field(None, description="share of rows whose top-k index sets are equal")
    tolerance: AppliedTolerance | None = None
    statistic_abs: float | None = Field(None, description="statistic modes: the statistic of the absolute error")
    statistic_rel: float | None = Field(None, description="statistic modes: the statistic of the relative error")
    min_atol: float | None = Field(None, description="smallest atol that passes with this rtol (null: none does)")
    min_rtol: float | None = Field(None, description="smallest rtol that passes with this atol (null: none does)")
    first_failing_sample: int | None = None
    problems: list[str] = Field(default_factory=list)
    abs_err_histogram: Histogram | None = None


class Divergence(_Report):
    """Where the artifact's intermediate values first leave the source model's, in execution order."""

    node: str = Field(description="the artifact's node (ONNX node name, or FX node)")
    op_type: str
    source_node: str | None = Field(None, description="the source graph's node (torch.fx) it implements")
    target: str | None = Field(None, description="the torch operator, e.g. aten.linear.default")
    module: str | None = Field(None, description="the source submodule it came from, e.g. encoder.layers.0.attn")
    module_class: str | None = None
    value: str = Field(description="the compared value (tensor name)")
    shape: list[int] = Field(default_factory=list)
    max_abs_err: float
    max_rel_err: float
    mean_abs_err: float
    sample: int = 0
    compared: int = Field(0, description="intermediate values compared before and at this one")


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
    mode: ToleranceMode = ToleranceMode.elementwise
    precision: Precision = Precision.fp32
    user_samples: int = 0
    random_samples: int = 0
    sample_shapes: list[list[list[int]]] = Field(default_factory=list, description="per sample, per input")
    first_divergence: Divergence | None = None
    localisation: str | None = Field(None, description="how the divergence was searched, or why it was not")


class Timing(_Report):
    """Timed runs of one model at one batch size, after warm-up."""

    batch_size: int | None = None
    warmup: int = 0
    runs: int
    windows: int
    window_runs: int
    window_medians_ms: list[float] = Field(default_factory=list)
    stable: bool
    spread: float = Field(description="(max - min) / min of the last windows' medians")
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    throughput_per_s: float = Field(description="items (batch rows) per second at the mean latency")
    first_run_ms: float | None = None
    histogram: Histogram | None = None


class SweepPoint(_Report):
    batch_size: int
    artifact: Timing
    source: Timing
    speedup: float = Field(description="source p50 / artifact p50")


class Memory(_Report):
    """Peak memory while loading, warming up and timing (process RSS; CUDA where the device is a GPU)."""

    rss_before_mb: float
    rss_peak_mb: float
    rss_delta_mb: float = Field(description="peak minus before: what this model added to the process")
    method: str = Field(description="VmHWM (kernel high-water mark, reset per measurement) or sampled")
    cuda_peak_mb: float | None = Field(None, description="torch's peak allocated CUDA memory")
    cuda_used_mb: float | None = Field(None, description="device memory in use after warm-up minus before")


#: How the latency notes that mark a disturbed measurement begin or read (`portq.tasks.checks.latency` writes
#: them); readers such as `portq compare` find them by these, not by parsing prose.
BUSY_NOTE = "the machine was busy"
DISTURBED_NOTE = "runs were disturbed"


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
    stable: bool = True
    criterion: str = ""
    artifact: Timing | None = None
    source: Timing | None = None
    sweep: list[SweepPoint] = Field(default_factory=list)
    load_ms: float | None = Field(None, description="opening the artifact (runtime session / load)")
    memory: Memory | None = None
    source_memory: Memory | None = None
    providers: list[str] | None = Field(None, description="onnxruntime execution providers in use")
    notes: list[str] = Field(default_factory=list)


class RouteAttemptReport(_Report):
    """One try of one export route: None for error means it produced the artifact."""

    route: str
    error: str | None = None
    seconds: float


class OptimizationReport(_Report):
    """How an optimization variant was made from its base artifact, and what the optimizer did."""

    transform: str = Field(description="the optimization recipe (portq.tasks.formats.optimizations)")
    base: str = Field(description="the artifact it was made from (its file, or the same export again)")
    lossless: bool = True
    facts: dict[str, Any] = Field(default_factory=dict, description="what the optimizer reports: node counts, "
                                  "fused operators, nodes kept in float32, ...")


class ArtifactReport(_Report):
    """One requested artifact: how it was made, and its parity and latency. Paths are relative to the job's
    result folder (`JobReport.result`), so they hold wherever the folder is published, copied or served."""

    id: str = Field(description="the artifact id: the format, or format.variant (e.g. onnx.opset17)")
    format: Format
    variant: str = DEFAULT_VARIANT
    options: dict[str, Any] = Field(default_factory=dict, description="the format's options it was made with")
    status: StepStatus
    path: str | None = Field(None, description="the artifact file, relative to the job's result folder")
    error: str | None = None
    route: str | None = None
    opset: int | None = None
    precision: Precision | None = Field(None, description="the precision the artifact computes in")
    requested_by: str = Field("request", description="request (--format), optimize (an --optimize candidate), "
                              "'base of <id>' (an optimization is made from it), or 'repair of <id>' (a "
                              "mixed-precision retry of a half-precision variant that failed parity)")
    attempts: list[RouteAttemptReport] = Field(default_factory=list, description="every route tried, in order")
    notes: list[str] = Field(default_factory=list, description="what the route had to rewrite to convert the "
                                                                "model (e.g. fused transformer kernels into plain ops)")
    reproduce: str | None = Field(None, description="a script that redoes the conversion and parity check, "
                                                    "relative to the job's result folder")
    size_bytes: int | None = Field(None, description="the artifact's size: its file and its data files")
    data: list[str] = Field(default_factory=list, description="files that belong to the artifact and sit beside "
                                                              "it (ONNX external data: model.onnx.data), relative "
                                                              "to the job's result folder")
    optimization: OptimizationReport | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage of this artifact's "
                                      "step: export (or optimize), script, session, parity, latency, localise; "
                                      "step: all of it as the job saw it; isolation: step minus the rest")
    parity: ParityReport | None = None
    latency: LatencyReport | None = None
    best: bool = Field(False, description="the fastest artifact of its job that passed parity")


class Failure(_Report):
    kind: str
    step: str | None
    file: str | None
    cause: str
    hint: str | None = None


class FusionMemberReport(_Report):
    """One model of a fusion, as the fusion section of a job report shows it."""

    name: str
    file: str = Field(description="the file as the user gave it")
    role: Literal["member", "base"] = "member"
    score: float | None = Field(None, description="its score on the eval data (the fusion's metric)")
    kept: bool | None = Field(None, description="greedy-soup: whether the soup kept it")
    max_abs_diff: float | None = Field(None, description="weight-space: max |member - fused| over every output "
                                                          "element of the parity samples")
    mean_abs_diff: float | None = None
    top1_agreement: float | None = Field(None, description="classifier-like outputs: share of rows whose argmax "
                                                           "agrees with the fused model's")


class GreedyStep(_Report):
    """One step of greedy-soup: the soup with `candidate` added, its score, and whether it was kept."""

    candidate: str
    score: float
    accepted: bool


class CombineCheck(_Report):
    """Output-space fusion: the fused model against its members run one by one and combined outside it."""

    passed: bool
    max_abs_err: float
    samples: int
    how: str = Field(description="how the members' outputs were combined for the comparison")


class FinetuneReport(_Report):
    """The fine-tune of the fused model: its settings and the mean loss of each epoch."""

    epochs: int
    lr: float
    seed: int
    device: str
    loss: Literal["cross-entropy", "mse"]
    examples: int
    curve: list[float] = Field(default_factory=list, description="mean training loss per epoch")


class FusionReport(_Report):
    """How a `fuse` job's source model was made, and how it compares with its members."""

    method: str
    space: Literal["output", "weight"]
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters as applied "
                                                                     "(defaults filled in, weights normalised)")
    members: list[FusionMemberReport] = Field(default_factory=list)
    base: FusionMemberReport | None = None
    metric: str | None = Field(None, description="accuracy (higher is better) or loss (lower is better)")
    fused_score: float | None = Field(None, description="the fused model's score on the eval data (after any "
                                                        "fine-tune)")
    soup_score: float | None = Field(None, description="greedy-soup: the chosen soup's score before any fine-tune")
    greedy_steps: list[GreedyStep] = Field(default_factory=list)
    bn_stats: str | None = Field(None, description="weight-space: BatchNorm running statistics recomputed on the "
                                                   "calibration data, or merged like the other tensors, or none")
    combine_check: CombineCheck | None = None
    finetune: FinetuneReport | None = None
    notes: list[str] = Field(default_factory=list)


class JobReport(_Report):
    """`report.json`: what one job produced (written last, after its artifacts)."""

    schema_version: Literal[2] = REPORT_SCHEMA_VERSION
    job_id: str
    job_key: str | None = None
    kind: JobKind = JobKind.convert
    batch: str
    model: str
    source: str
    target: Target
    status: JobStatus
    error: str | None = None
    failure: Failure | None = None
    cached: bool = False
    result: str | None = Field(None, description="URL of the job's result folder, which artifact paths are "
                                                 "relative to (set when the job publishes)")
    artifacts: list[ArtifactReport] = Field(default_factory=list)
    inputs: list[dict[str, Any]] = Field(default_factory=list)
    toolchain: dict[str, str] = Field(default_factory=dict)
    best: str | None = Field(None, description="id of the fastest artifact that passed parity (p50 at the sample)")
    environment: dict[str, Any] = Field(default_factory=dict, description="where latency was measured")
    worker: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    queued_s: float | None = Field(None, description="from submission to the job's start (the queue's wait)")
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage: load, inputs, source "
                                      "(its parity runs and latency), artifacts (every artifact's step), reports, "
                                      "publish; each artifact has its own breakdown")
    trust_pickle: bool = Field(False, description="the model was loaded with --trust-pickle (full unpickling)")
    fusion: FusionReport | None = Field(None, description="fuse jobs: how the source model was fused")
    notes: list[str] = Field(default_factory=list, description="what loading changed about the source, e.g. the "
                                                                "float equivalent of a dynamically quantized model")

    def url(self, relative: str | None) -> str | None:
        """Where a user finds a file of this job (an artifact path or reproduce script)."""
        if relative is None or self.result is None:
            return relative
        return f"{self.result}/{relative}"

    def artifact(self, artifact_id: str) -> ArtifactReport | None:
        return next((a for a in self.artifacts if a.id == artifact_id), None)


class JobRecord(_Report):
    """A job's state in its batch, updated by the client (queued) and the worker (running, finished)."""

    job_id: str
    batch: str
    model: str
    source: str
    target: Target
    status: JobStatus
    kind: JobKind = JobKind.convert
    error: str | None = None
    result: str | None = Field(None, description="store key of the job's result folder")
    cached: bool = False
    attempts: int = 0
    worker: str | None = Field(None, description="the worker that ran (or runs) the latest attempt")
    dead_letter: str | None = Field(None, description="store key of the job's dead-letter record: it ended "
                                                      "without a report, and `portq retry` can resubmit it")
    step: str | None = Field(None, description="what a running job is doing now: load, source (running the source "
                                               "model), export:ID, parity:ID, latency:ID, localise:ID")
    updated_at: str = Field(default_factory=utcnow)
    version: int = Field(0, description="how many times the record was written: each write is conditional on the "
                                        "version read (portq.tasks.state.lifecycle)")


class BatchJob(_Report):
    job_id: str
    kind: JobKind = JobKind.convert
    model: str
    source: str
    target: Target
    status: JobStatus
    error: str | None = None
    cached: bool = False
    result: str | None = Field(None, description="URL of the job's result folder (artifact paths are relative "
                                                 "to it)")
    report: str | None = Field(None, description="URL of the job's report.json")
    artifacts: list[ArtifactReport] = Field(default_factory=list)
    best: str | None = Field(None, description="id of the fastest artifact that passed parity")


class BatchReport(_Report):
    """What `portq report BATCH --json` prints: a contract that scripts and CI rely on."""

    schema_version: Literal[2] = REPORT_SCHEMA_VERSION
    batch: str
    store: str
    counts: dict[str, int]
    jobs: list[BatchJob]


# ------------------------------------------------------------------------------------------ nightly batches

NIGHTLY_SCHEMA_VERSION: Literal[1] = 1


class SeriesEntry(_Report):
    """One night of a series, as the store's index keeps it (`series/<series>/<batch>.json`)."""

    version: Literal[1] = NIGHTLY_SCHEMA_VERSION
    series: str
    batch: str
    submitted_at: str = Field(default_factory=utcnow)
    manifest: str = Field(description="the manifest file the night was submitted from")
    manifest_sha256: str | None = None
    jobs: int = Field(0, description="jobs queued (or run here)")
    rejected: int = Field(0, description="paths refused at submit (recorded as failed jobs)")
    warnings: list[str] = Field(default_factory=list, description="e.g. globs that matched no file")

    @field_validator("series", "batch")
    @classmethod
    def _ids_are_safe(cls, v: str) -> str:
        return _check_id(v)


class NightSummary(_Report):
    """A night as `portq history` lists it: its index entry and what its jobs came to."""

    batch: str
    submitted_at: str
    manifest: str
    counts: dict[str, int] = Field(description="jobs by status, and total")
    cache_hits: int = Field(description="jobs served from the content cache (unchanged model and options)")
    converted: int = Field(description="jobs that ran a conversion (finished, not from the cache)")
    warnings: list[str] = Field(default_factory=list)


class SeriesHistory(_Report):
    """What `portq history SERIES --format json` prints: the series' nights, oldest first."""

    schema_version: Literal[1] = NIGHTLY_SCHEMA_VERSION
    series: str
    store: str
    nights: list[NightSummary]


class Verdict(str, Enum):
    """What `portq compare` concludes for one model x target x artifact (worst first)."""

    regression = "regression"
    inconclusive = "inconclusive"
    improvement = "improvement"
    unchanged = "unchanged"
    added = "added"
    removed = "removed"


class CompareRules(_Report):
    """The thresholds a comparison applied (see `portq.tasks.reports.compare`)."""

    latency_threshold: float = Field(0.10, gt=0, description="a latency change must exceed this share of the "
                                                             "baseline's p50 (and the measurements' spread)")
    error_factor: float = Field(10.0, gt=1, description="parity's max abs error must grow beyond this factor "
                                                        "(from at least 1% of atol) to count as worse")


class LatencyComparison(_Report):
    """The artifact's p50 at the sample's batch size, baseline against new, judged against the noise."""

    verdict: Verdict
    baseline_p50_ms: float
    new_p50_ms: float
    change: float = Field(description="new p50 / baseline p50 - 1")
    baseline_range_ms: list[float] = Field(description="[low, high]: the medians of the windows the p50 is taken "
                                                       "over, or a 95% interval from std and runs")
    new_range_ms: list[float]
    baseline_disturbed: list[str] = Field(default_factory=list, description="why the baseline cannot be trusted "
                                                                            "alone: unstable, busy machine...")
    new_disturbed: list[str] = Field(default_factory=list)
    reason: str


class ParityComparison(_Report):
    verdict: Verdict
    baseline_passed: bool
    new_passed: bool
    baseline_max_abs_err: float
    new_max_abs_err: float
    growth: float | None = Field(None, description="new max abs error / baseline's (from at least 1% of atol)")
    reason: str


class ArtifactComparison(_Report):
    """One model x target x artifact across two batches. `artifact` is null for a job with no artifacts."""

    model: str
    target: Target
    artifact: str | None = None
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list, description="one sentence per finding")
    baseline_source: str | None = None
    new_source: str | None = None
    baseline_status: str | None = Field(None, description="the artifact's status (or the job's, without one)")
    new_status: str | None = None
    cached: bool = Field(False, description="the new job was served from the content cache")
    parity: ParityComparison | None = None
    latency: LatencyComparison | None = None


class Comparison(_Report):
    """What `portq compare --format json` prints. `regressed` is what its exit code says (1 when true)."""

    schema_version: Literal[1] = NIGHTLY_SCHEMA_VERSION
    baseline: str
    new: str
    store: str
    series: str | None = None
    rules: CompareRules
    regressed: bool
    counts: dict[str, int] = Field(description="rows by verdict")
    notes: list[str] = Field(default_factory=list, description="e.g. a model whose source path changed")
    rows: list[ArtifactComparison]


SCHEMAS: dict[str, type[BaseModel]] = {
    f"batch-report.v{REPORT_SCHEMA_VERSION}.json": BatchReport,
    f"job-report.v{REPORT_SCHEMA_VERSION}.json": JobReport,
    f"job-spec.v{JOB_SPEC_VERSION}.json": JobSpec,
    f"comparison.v{NIGHTLY_SCHEMA_VERSION}.json": Comparison,
    f"series-history.v{NIGHTLY_SCHEMA_VERSION}.json": SeriesHistory,
}

_M = TypeVar("_M", bound=BaseModel)


def read_versioned(model: type[_M], data: Any, where: str) -> _M:
    """Validate stored data, telling an older portq's file apart from a damaged one.

    Jobs and reports carry their schema version (`version` in a spec, `schema_version` in a report); data
    written by another version is refused with a sentence that says so, not with a validation dump.
    """
    from portq.tasks.core.errors import OlderVersionError

    field = "version" if "version" in model.model_fields else "schema_version"
    expected = model.model_fields[field].default
    found = data.get(field) if isinstance(data, dict) else None
    if isinstance(found, int) and found != expected:
        what = {JobSpec: "job spec", JobReport: "job report", BatchReport: "batch report",
                SeriesEntry: "series entry"}.get(model, model.__name__)
        age = "an older" if found < expected else "a newer"
        raise OlderVersionError(
            f"{where} is a {what} of schema version {found}, written by {age} portq; this portq reads version "
            f"{expected}", step="read", file=where,
            hint="submit the models again (a new batch) to get version-2 results, or read this store with the "
                 "portq that wrote it" if found < expected else "upgrade portq to read it")
    return model.model_validate(data)


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
