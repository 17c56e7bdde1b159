"""What a job produces: the artifact, parity, latency and fusion reports, the `JobReport` a worker writes as
`report.json`, and the `BatchReport` that `portq report BATCH --json` prints."""

from __future__ import annotations

import math
import sys
from enum import Enum
from typing import Any, Literal

from portq.tasks.core.contract.base import ReportModel
from portq.tasks.core.contract.ids import DEFAULT_VARIANT, Format, JobKind, Target
from portq.tasks.core.contract.record import JobStatus
from portq.tasks.core.contract.spec import Precision, ToleranceMode
from pydantic import Field

REPORT_SCHEMA_VERSION: Literal[3] = 3


class StepStatus(str, Enum):
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"


def json_float(x: float) -> float:
    """JSON has no Infinity or NaN: report the largest float instead, which still fails any tolerance."""
    return x if math.isfinite(x) else sys.float_info.max


class Histogram(ReportModel):
    """Counts of values in bins [edges[i], edges[i+1]); `zeros` counts exact zeros kept off a log axis and
    `above` the values past the last edge (latency: the slowest 1%, so outliers do not flatten the plot)."""

    scale: Literal["linear", "log10"] = "linear"
    edges: list[float] = Field(default_factory=list)
    counts: list[int] = Field(default_factory=list)
    zeros: int = 0
    above: int = 0


class AppliedTolerance(ReportModel):
    """The tolerance an output was held to, resolved from overrides, job options and precision defaults."""

    mode: ToleranceMode
    atol: float
    rtol: float
    quantile: float | None = None
    origin: str = ""


class OutputParity(ReportModel):
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


class Divergence(ReportModel):
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


class ParityReport(ReportModel):
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


class Timing(ReportModel):
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


class SweepPoint(ReportModel):
    batch_size: int
    artifact: Timing
    source: Timing
    speedup: float = Field(description="source p50 / artifact p50")


class Memory(ReportModel):
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


#: how a latency report's speedup was measured (`LatencyReport.comparison.method`)
PAIRED_METHOD = "paired"


class PairedComparison(ReportModel):
    """How the speedup was measured: the source and the artifact timed in alternating blocks
    (`portq.tasks.checks.paired`), and what the machine did meanwhile."""

    method: str = PAIRED_METHOD
    pairs: int
    threads: int = Field(description="compute threads each side ran with")
    stopped_by: str
    confidence: float = Field(0.95, description="of the speedup's interval (percentile bootstrap over the pairs)")
    cores: int
    other_runnable_threads: float = Field(description="median runnable threads of other processes while timing")
    cpu_per_wall: float | None = Field(None, description="this process's CPU seconds per wall second (evidence)")
    involuntary_switches_per_s: float = 0.0
    source_blocks_ms: list[float] = Field(default_factory=list, description="each source block's median run")
    artifact_blocks_ms: list[float] = Field(default_factory=list, description="each artifact block's median run")


class LatencyReport(ReportModel):
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
    speedup: float = Field(description="how many times faster than the source: the median of the paired blocks' "
                           "ratios (`comparison`), or, in reports without one, source p50 / artifact p50")
    speedup_interval: list[float] | None = Field(None, description="[low, high]: the speedup's confidence "
                                                 "interval (absent in reports older than paired timing)")
    inconclusive: bool = Field(False, description="true: the speedup is not a precise number (an oversubscribed "
                               "machine, or an interval too wide): read `inconclusive_reason`")
    inconclusive_reason: str | None = None
    comparison: PairedComparison | None = None
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


class RouteAttemptReport(ReportModel):
    """One try of one export route: None for error means it produced the artifact."""

    route: str
    error: str | None = None
    seconds: float


class OptimizationReport(ReportModel):
    """How an optimization variant was made from its base artifact, and what the optimizer did."""

    transform: str = Field(description="the optimization recipe (portq.tasks.formats.optimizations)")
    base: str = Field(description="the artifact it was made from (its file, or the same export again)")
    lossless: bool = True
    facts: dict[str, Any] = Field(default_factory=dict, description="what the optimizer reports: node counts, "
                                  "fused operators, nodes kept in float32, ...")


class ArtifactReport(ReportModel):
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
    provenance: str | None = Field(None, description="the artifact's provenance record (an in-toto Statement "
                                   "with SLSA provenance: its files' sha256, the job, the toolchain, the verdicts), "
                                   "relative to the job's result folder; `portq verify` checks it")
    optimization: OptimizationReport | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage of this artifact's "
                                      "step: export (or optimize), script, session, parity, latency, localise; "
                                      "step: all of it as the job saw it; isolation: step minus the rest")
    parity: ParityReport | None = None
    latency: LatencyReport | None = None
    pruned: bool = Field(False, description="skipped by --optimize auto: its family could not win (the reason is in "
                                            "`error`, beginning 'pruned')")
    best: bool = Field(False, description="the fastest artifact of its job that passed parity and beats the source")
    best_note: str | None = Field(None, description="on the best pick: a tie it won by the stated rule, or an "
                                  "inconclusive speedup")

    @property
    def good(self) -> bool:
        """Converted and passed parity: an artifact a user can serve. The job's `best` is picked among these, and
        reports and comparisons call such an artifact converting."""
        return self.status is StepStatus.succeeded and self.parity is not None and self.parity.passed


class Failure(ReportModel):
    kind: str
    step: str | None
    file: str | None
    cause: str
    hint: str | None = None


class FusionMemberReport(ReportModel):
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


class GreedyStep(ReportModel):
    """One step of greedy-soup: the soup with `candidate` added, its score, and whether it was kept."""

    candidate: str
    score: float
    accepted: bool


class CombineCheck(ReportModel):
    """Output-space fusion: the fused model against its members run one by one and combined outside it."""

    passed: bool
    max_abs_err: float
    samples: int
    how: str = Field(description="how the members' outputs were combined for the comparison")


class FinetuneReport(ReportModel):
    """The fine-tune of the fused model: its settings and the mean loss of each epoch."""

    epochs: int
    lr: float
    seed: int
    device: str
    loss: Literal["cross-entropy", "mse"]
    examples: int
    curve: list[float] = Field(default_factory=list, description="mean training loss per epoch")


class FusionReport(ReportModel):
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


class JobReport(ReportModel):
    """`report.json`: what one job produced (written last, after its artifacts)."""

    schema_version: Literal[3] = REPORT_SCHEMA_VERSION
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
    best: str | None = Field(None, description="id of the fastest artifact that passed parity and beats the source "
                                               "(absent when none does: `best_note` says so)")
    best_note: str | None = Field(None, description="why there is no best pick: no artifact that passed parity is "
                                                    "faster than the source (begins 'no faster artifact than the "
                                                    "source')")
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
    trust_remote_code: bool = Field(False, description="a Hugging Face folder was loaded with --trust-remote-code "
                                                       "(code shipped with it ran)")
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


class BatchJob(ReportModel):
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
    best: str | None = Field(None, description="id of the fastest artifact that passed parity and beats the source")
    best_note: str | None = Field(None, description="why there is no best pick (as the job report's)")


class BatchReport(ReportModel):
    """What `portq report BATCH --json` prints: a contract that scripts and CI rely on."""

    schema_version: Literal[3] = REPORT_SCHEMA_VERSION
    batch: str
    store: str
    counts: dict[str, int]
    jobs: list[BatchJob]
