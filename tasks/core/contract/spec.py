"""The job spec: what travels on the queue (identity, kind and source description, versioned options).

A `JobSpec` is the only thing a worker accepts. It is JSON, validated against these models on arrival, and
never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import Enum
from typing import Annotated, Any, Literal

from portq.tasks.core.contract.base import StrictModel
from portq.tasks.core.contract.ids import (
    DEFAULT_VARIANT,
    VARIANT_NAME,
    Format,
    JobKind,
    Target,
    artifact_id,
    check_id,
    route_for,
    safe_name,
    utcnow,
)
from pydantic import Field, field_validator, model_validator

JOB_SPEC_VERSION: Literal[2] = 2


_INPUT_SPEC = re.compile(r"^\s*(?P<name>[A-Za-z_][\w.]*)\s*:\s*(?P<dtype>[a-z0-9]+)\s*\[(?P<shape>[^\]]*)\]"
                         r"\s*(\{(?P<range>[^}]*)\})?\s*$")
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


class InputSpec(StrictModel):
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


class OutputTolerance(StrictModel):
    """A per-output override; a field left out falls back to the job's, then to the precision's default."""

    mode: ToleranceMode | None = None
    atol: float | None = Field(None, ge=0)
    rtol: float | None = Field(None, ge=0)
    quantile: float | None = Field(None, gt=0, le=1)


class Tolerance(StrictModel):
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


class ParityOptions(StrictModel):
    random_samples: int = Field(2, ge=0, le=64, description="seeded random draws added to the user's samples")
    seed: int = 0
    localise: bool = Field(True, description="when parity fails, find the first operator whose values diverge")


class LatencyOptions(StrictModel):
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


class SourceRef(StrictModel):
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


class ConvertSource(StrictModel):
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


class HuggingFaceSource(StrictModel):
    """Source description of a `huggingface` job: a Hugging Face model folder, packed by the client into one tar of
    its files (`portq.tasks.state.model_folders`), loaded on the worker by the task's Auto class from those files
    only, with example inputs built from its config.json."""

    kind: Literal["huggingface"] = "huggingface"
    model: SourceRef = Field(description="the folder's files in one tar; `name` is the folder the user gave")
    task: str = Field(description="what the model is loaded for (its Auto class): from config.json's architectures "
                                  "or --task, e.g. text-classification")
    trust_remote_code: bool = Field(False, description="allow code shipped with the folder (config.json auto_map)")
    sequence_length: int = Field(16, ge=1, le=1_000_000, description="the example inputs' sequence length (text)")
    batch_size: int = Field(2, ge=1, le=4096, description="the example inputs' batch size")

    @property
    def display(self) -> str:
        """The name errors and reports use for this source: the folder the user gave."""
        return self.model.name

    @property
    def trust_pickle(self) -> bool:
        return False  # transformers reads a pytorch_model.bin with weights_only

    def files(self) -> list[SourceRef]:
        return [self.model]

    def model_files(self) -> list[SourceRef]:
        return [self.model]

    def data_files(self) -> list[SourceRef]:
        return []

    def key_material(self) -> Any:
        return _key_material(self.model_dump(mode="json"))


class FuseMember(StrictModel):
    """One model of a fusion: its uploaded file, the label messages and reports use, and how to load it."""

    model: SourceRef
    name: str = Field(description="the member's label: its file name, or the path as given where names clash")
    arch: str | None = Field(None, description="package.module:Class for state dicts and safetensors files")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    trust_pickle: bool = Field(False, description="allow full unpickling of torch.save files (runs their code)")


class FinetuneOptions(StrictModel):
    """A fine-tune of the fused model: Adam on the data's inputs and labels, on the job's target device."""

    data: SourceRef = Field(description="an .npz of the model's inputs and a `labels` array")
    epochs: int = Field(5, ge=1, le=100_000)
    lr: float = Field(1e-3, gt=0, le=10)
    seed: int = 0
    batch_size: int = Field(64, ge=1, description="examples per Adam step")


class FuseSource(StrictModel):
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
SourceDescription = Annotated[ConvertSource | FuseSource | HuggingFaceSource, Field(discriminator="kind")]


class ArtifactRequest(StrictModel):
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


class OptimizeOptions(StrictModel):
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


class JobOptions(StrictModel):
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


class JobSpec(StrictModel):
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
        return check_id(v)

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
