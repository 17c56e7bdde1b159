"""`portq history`: a series' nights (counts, cache hits), and each model's numbers across them for the plots.

Content only, as plain strings and numbers; rendered as a terminal table (`portq.client.render`), Markdown
(here) and HTML (`portq.tasks.reports.html`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from portq.tasks.core.contract import BatchReport, SeriesHistory, StepStatus, Target
from portq.tasks.reports.content import markdown_table

HISTORY_COLUMNS = ["night", "batch", "submitted", "jobs", "succeeded", "failed", "cache hits", "converted",
                   "unfinished", "warnings"]


def history_rows(h: SeriesHistory) -> list[list[str]]:
    rows = []
    for i, n in enumerate(h.nights, 1):
        c = n.counts
        unfinished = c.get("queued", 0) + c.get("running", 0)
        rows.append([str(i), n.batch, n.submitted_at[:19].replace("T", " "), str(c.get("total", 0)),
                     str(c.get("succeeded", 0)), str(c.get("failed", 0)), str(n.cache_hits), str(n.converted),
                     str(unfinished) if unfinished else "", str(len(n.warnings)) if n.warnings else ""])
    return rows


def history_warnings(h: SeriesHistory) -> list[str]:
    """Each night's warnings (globs that matched nothing...), prefixed with its batch."""
    return [f"{n.batch}: {w}" for n in h.nights for w in n.warnings]


def history_markdown(h: SeriesHistory) -> str:
    warnings = "".join(f"- warning: {w}\n" for w in history_warnings(h))
    return (f"# portq history {h.series}\n\n{len(h.nights)} night(s) in {h.store}\n\n"
            f"{markdown_table(HISTORY_COLUMNS, history_rows(h))}\n" + (f"\n{warnings}" if warnings else ""))


@dataclass
class Trend:
    """One model x target x artifact across nights: p50 (ms) and parity max abs error, None where missing."""

    model: str
    target: Target
    artifact: str
    p50_ms: list[float | None] = field(default_factory=list)
    max_abs_err: list[float | None] = field(default_factory=list)
    passed: list[bool | None] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.model} ({self.target.value}) {self.artifact}"


def trends(reports: list[BatchReport]) -> list[Trend]:
    """Each model x target x artifact of these batches (oldest first), with its numbers per batch."""
    found: dict[tuple[str, Target, str], Trend] = {}
    for i, report in enumerate(reports):
        for job in report.jobs:
            for a in job.artifacts:
                key = (job.model, job.target, a.id)
                trend = found.setdefault(key, Trend(job.model, job.target, a.id, [None] * len(reports),
                                                    [None] * len(reports), [None] * len(reports)))
                ok = a.status is StepStatus.succeeded
                trend.p50_ms[i] = a.latency.p50_ms if ok and a.latency else None
                trend.max_abs_err[i] = a.parity.max_abs_err if ok and a.parity else None
                trend.passed[i] = a.parity.passed if ok and a.parity else (False if not ok else None)
    return [found[k] for k in sorted(found, key=lambda k: (k[0], k[1].value, k[2]))]
