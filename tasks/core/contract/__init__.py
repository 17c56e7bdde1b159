"""The job contract: what travels on the queue and what comes back, as versioned, validated data.

A `JobSpec` is the only thing a worker accepts. It is JSON, validated against this module on arrival, and
never unpickled. Version 2 splits a job into its identity (job id, batch, model name, submitted at), its
kind and source description (what model to build: `convert` one file, `fuse` several into one,
`huggingface` a Hugging Face model folder; each kind
has a source builder in `portq.tasks.sources.builders`), and one versioned `JobOptions` object (target,
requested artifacts, inputs, tolerances, parity and latency options). Each requested artifact is a format plus a
variant with that format's options, named by an artifact id (`onnx`, `onnx.opset17`).

A `JobReport` is what a worker writes as `report.json`; a `BatchReport` is what `portq report BATCH --json`
prints; a `Comparison` and a `SeriesHistory` are what `portq compare` and `portq history` print as JSON. All
of them are published as JSON Schema files under `schemas/`.

The package is split along the contract's seams, each module importing only the ones above it in this list:
`ids` (ids, names, targets, formats, job kinds) and `base` (the pydantic bases), `record` (a job's status and
record), `spec` (the job spec and its options), `report` (job, artifact and batch reports), `nightly` (series
and comparisons), `versioning` (schema files, reading stored data). Every public name is re-exported here:
import from `portq.tasks.core.contract`.

It imports neither torch nor Celery: the CLI and the worker's main process both load it.
"""

from __future__ import annotations

from portq.tasks.core.contract.ids import (
    CONVERT_TASK,
    DEFAULT_VARIANT,
    QUEUES,
    SAFE_ID,
    SIDECAR_SUFFIX,
    VARIANT_NAME,
    Format,
    JobKind,
    Target,
    artifact_id,
    check_id,
    model_name,
    new_id,
    route_for,
    safe_name,
    utcnow,
)
from portq.tasks.core.contract.nightly import (
    NIGHTLY_SCHEMA_VERSION,
    ArtifactComparison,
    CompareRules,
    Comparison,
    LatencyComparison,
    NightSummary,
    ParityComparison,
    SeriesEntry,
    SeriesHistory,
    Verdict,
)
from portq.tasks.core.contract.record import JobRecord, JobStatus
from portq.tasks.core.contract.report import (
    BUSY_NOTE,
    DISTURBED_NOTE,
    PAIRED_METHOD,
    REPORT_SCHEMA_VERSION,
    AppliedTolerance,
    ArtifactReport,
    BatchJob,
    BatchReport,
    CombineCheck,
    Divergence,
    Failure,
    FinetuneReport,
    FusionMemberReport,
    FusionReport,
    GreedyStep,
    Histogram,
    JobReport,
    LatencyReport,
    Memory,
    OptimizationReport,
    OutputParity,
    PairedComparison,
    ParityReport,
    RouteAttemptReport,
    StepStatus,
    SweepPoint,
    Timing,
    json_float,
)
from portq.tasks.core.contract.spec import (
    INPUT_DTYPES,
    JOB_SPEC_VERSION,
    ArtifactRequest,
    ConvertSource,
    FinetuneOptions,
    FuseMember,
    FuseSource,
    HuggingFaceSource,
    InputSpec,
    JobOptions,
    JobSpec,
    LatencyOptions,
    OptimizeOptions,
    OutputTolerance,
    ParityOptions,
    Precision,
    SourceDescription,
    SourceRef,
    Tolerance,
    ToleranceMode,
)
from portq.tasks.core.contract.versioning import SCHEMAS, json_schema, read_versioned

__all__ = [
    "AppliedTolerance", "ArtifactComparison", "ArtifactReport", "ArtifactRequest", "BUSY_NOTE", "BatchJob",
    "BatchReport", "CONVERT_TASK", "CombineCheck", "CompareRules", "Comparison", "ConvertSource", "DEFAULT_VARIANT",
    "DISTURBED_NOTE", "Divergence", "Failure", "FinetuneOptions", "FinetuneReport", "Format", "FuseMember",
    "FuseSource", "FusionMemberReport", "FusionReport", "GreedyStep", "Histogram", "HuggingFaceSource", "INPUT_DTYPES",
    "InputSpec",
    "JOB_SPEC_VERSION", "JobKind", "JobOptions", "JobRecord", "JobReport", "JobSpec", "JobStatus", "LatencyComparison",
    "LatencyOptions", "LatencyReport", "Memory", "NIGHTLY_SCHEMA_VERSION", "NightSummary", "OptimizationReport",
    "OptimizeOptions", "OutputParity", "OutputTolerance", "PAIRED_METHOD", "PairedComparison",
    "ParityComparison", "ParityOptions", "ParityReport",
    "Precision", "QUEUES", "REPORT_SCHEMA_VERSION", "RouteAttemptReport", "SAFE_ID", "SCHEMAS", "SIDECAR_SUFFIX",
    "SeriesEntry", "SeriesHistory", "SourceDescription", "SourceRef", "StepStatus", "SweepPoint", "Target", "Timing",
    "Tolerance", "ToleranceMode", "VARIANT_NAME", "Verdict", "artifact_id", "check_id", "json_float", "json_schema",
    "model_name", "new_id", "read_versioned", "route_for", "safe_name", "utcnow",
]
