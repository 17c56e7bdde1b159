"""Nightly batches and their comparison: the series index entry, `portq history`'s `SeriesHistory` and
`portq compare`'s `Comparison`."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from portq.tasks.core.contract.base import ReportModel
from portq.tasks.core.contract.ids import Target, check_id, utcnow
from pydantic import Field, field_validator

NIGHTLY_SCHEMA_VERSION: Literal[1] = 1


class SeriesEntry(ReportModel):
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
        return check_id(v)


class NightSummary(ReportModel):
    """A night as `portq history` lists it: its index entry and what its jobs came to."""

    batch: str
    submitted_at: str
    manifest: str
    counts: dict[str, int] = Field(description="jobs by status, and total")
    cache_hits: int = Field(description="jobs served from the content cache (unchanged model and options)")
    converted: int = Field(description="jobs that ran a conversion (finished, not from the cache)")
    warnings: list[str] = Field(default_factory=list)


class SeriesHistory(ReportModel):
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


class CompareRules(ReportModel):
    """The thresholds a comparison applied (see `portq.tasks.reports.compare`)."""

    latency_threshold: float = Field(0.10, gt=0, description="a latency change must exceed this share of the "
                                                             "baseline's p50 (and the measurements' spread)")
    error_factor: float = Field(10.0, gt=1, description="parity's max abs error must grow beyond this factor "
                                                        "(from at least 1% of atol) to count as worse")


class LatencyComparison(ReportModel):
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


class ParityComparison(ReportModel):
    verdict: Verdict
    baseline_passed: bool
    new_passed: bool
    baseline_max_abs_err: float
    new_max_abs_err: float
    growth: float | None = Field(None, description="new max abs error / baseline's (from at least 1% of atol)")
    reason: str


class ArtifactComparison(ReportModel):
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


class Comparison(ReportModel):
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
