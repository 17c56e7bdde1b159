"""`portq compare`: what changed between two batches, per model x target x artifact, and whether it regressed.

**Matching.** Jobs are matched by model name and target; a job left over on each side with the same source path
is matched too. A model only in the baseline is `removed`, only in the new batch `added` (neither is a
regression); a matched model whose source path changed gets a note. Artifacts are matched by id.

**Conversion.** An artifact that converted in the baseline and fails in the new batch, or whose job now fails
before any artifact, is a regression; the reverse is an improvement. A skipped artifact (no C++ compiler...)
is inconclusive.

**Parity.** Passed -> failed is a regression, failed -> passed an improvement. Between two passes, a max abs
error that grew beyond `error_factor` (default 10x) is a regression and one that shrank as much an improvement;
the baseline's error counts as at least 1% of the new run's atol, so an exact 0 that becomes 1e-9 is no change.

**Latency: the noise rule.** Compared is the artifact's p50 at the sample's batch size (`latency.artifact`).
A measurement's *range* is [min, max] of the medians of the windows its p50 is taken over (the last
`windows` windows of a stable measurement, every window of an unstable one); with fewer than two windows,
p50 +- 1.96 std / sqrt(runs). With `change = new p50 / baseline p50 - 1` and `t = latency_threshold` (10%):

- |change| <= t: unchanged.
- slower (change > t): a regression when the ranges do not overlap (new range low > baseline range high);
  otherwise unchanged, within the noise.
- faster (change < -t): the mirror image, an improvement.
- A *disturbed* measurement is one whose paired timing was inconclusive (an oversubscribed machine, or an
  interval too wide: `portq.tasks.checks.paired`), one marked `stable: false`, whose job found the machine busy
  (load average above the usable CPUs), or whose runs were disturbed (median above 5x the fastest run). The
  windows of a paired measurement are its artifact blocks. Interference only
  ever adds time, so a disturbance can make a measurement look slower, never faster. When the side that came
  out slower is disturbed, its windows are not trusted: the change counts only if every one of its runs, the
  fastest included, is slower than the other side's range high by more than t; otherwise it is
  **inconclusive**, which is not a regression (rerun the model when quieter). A disturbed side that came out
  faster is judged by the window rule: its disturbance worked against the change it shows.

A row's verdict is the worst of its conversion, parity and latency verdicts, in the order regression,
inconclusive, improvement, unchanged. `regressed` (exit 1) is true when any row is a regression.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from portq.tasks.core.contract import (
    BUSY_NOTE,
    DISTURBED_NOTE,
    ArtifactComparison,
    ArtifactReport,
    BatchJob,
    BatchReport,
    CompareRules,
    Comparison,
    JobStatus,
    LatencyComparison,
    LatencyReport,
    ParityComparison,
    ParityReport,
    StepStatus,
    Timing,
    Verdict,
)
from portq.tasks.core.errors import UsageError
from portq.tasks.reports.content import markdown_table

#: worst first: a row takes the first of these that any of its checks found
SEVERITY = (Verdict.regression, Verdict.inconclusive, Verdict.improvement, Verdict.unchanged, Verdict.added,
            Verdict.removed)
#: the baseline's parity error counts as at least this share of the new run's atol
ERROR_FLOOR = 0.01


def _pct(x: float) -> str:
    return f"{x:+.0%}"


def _ms(x: float) -> str:
    return f"{x:.3g} ms"


# ---------------------------------------------------------------------------------------------- latency


def timing_range(t: Timing) -> tuple[float, float]:
    """[min, max] of the medians of the windows the p50 is taken over; p50 +- 1.96 std / sqrt(runs) without two."""
    kept = t.window_medians_ms
    if t.window_runs > 0 and kept:
        kept = kept[-max(1, round(t.runs / t.window_runs)):]
    if len(kept) >= 2:
        return min(kept), max(kept)
    half = 1.96 * t.std_ms / math.sqrt(t.runs) if t.runs > 1 else 0.0
    return max(0.0, t.p50_ms - half), t.p50_ms + half


def disturbances(latency: LatencyReport, t: Timing) -> list[str]:
    """Why a measurement cannot be trusted on its own (empty when it can)."""
    reasons = []
    if latency.inconclusive:  # the paired comparison saw an oversubscribed machine, or runs that varied too much
        reasons.append(f"its paired timing was inconclusive ({latency.inconclusive_reason})")
    elif not t.stable:
        reasons.append(f"unstable (its window medians spread {t.spread:.0%})")
    for note in latency.notes:
        if note.startswith(BUSY_NOTE):
            reasons.append(note.split(":")[0])
        elif note.startswith("artifact:") and DISTURBED_NOTE in note:
            reasons.append("its runs were disturbed (median above 5x the fastest run)")
    return reasons


def judge_latency(base: LatencyReport, new: LatencyReport, threshold: float) -> LatencyComparison | None:
    """The noise rule (module doc) on the artifact's timings; None when a side has no timing to compare."""
    b, n = base.artifact, new.artifact
    if b is None or n is None or b.p50_ms <= 0:
        return None
    change = n.p50_ms / b.p50_ms - 1
    (b_lo, b_hi), (n_lo, n_hi) = timing_range(b), timing_range(n)
    b_bad, n_bad = disturbances(base, b), disturbances(new, n)
    head = f"p50 {_ms(b.p50_ms)} -> {_ms(n.p50_ms)} ({_pct(change)})"
    ranges = f"baseline windows {_ms(b_lo)}-{_ms(b_hi)}, new {_ms(n_lo)}-{_ms(n_hi)}"
    if abs(change) <= threshold:
        verdict, reason = Verdict.unchanged, f"{head}: within the {threshold:.0%} threshold"
    else:
        slower = change > 0
        # the side that came out slower, and the other one
        slow, slow_bad, fast_hi = (n, n_bad, b_hi) if slower else (b, b_bad, n_hi)
        found = Verdict.regression if slower else Verdict.improvement
        word = "slower" if slower else "faster"
        if slow_bad:
            who = "new" if slower else "baseline"
            if slow.min_ms > fast_hi * (1 + threshold):
                verdict = found
                reason = (f"{head}: {word}; the {who} measurement was disturbed ({'; '.join(slow_bad)}), but even "
                          f"its fastest run ({_ms(slow.min_ms)}) is {slow.min_ms / fast_hi - 1:.0%} above the other's "
                          f"windows (up to {_ms(fast_hi)})")
            else:
                verdict = Verdict.inconclusive
                reason = (f"{head}: {word}, but the {who} measurement was disturbed ({'; '.join(slow_bad)}) and its "
                          f"fastest run ({_ms(slow.min_ms)}) is within {threshold:.0%} of the other's windows: "
                          "rerun it on a quieter machine")
        elif (n_lo > b_hi) if slower else (n_hi < b_lo):
            verdict, reason = found, f"{head}: {word} beyond the noise ({ranges}, no overlap)"
        else:
            verdict, reason = Verdict.unchanged, f"{head}: within the noise ({ranges} overlap)"
    return LatencyComparison(verdict=verdict, baseline_p50_ms=b.p50_ms, new_p50_ms=n.p50_ms, change=change,
                             baseline_range_ms=[b_lo, b_hi], new_range_ms=[n_lo, n_hi], baseline_disturbed=b_bad,
                             new_disturbed=n_bad, reason=reason)


# ----------------------------------------------------------------------------------------------- parity


def judge_parity(base: ParityReport, new: ParityReport, factor: float) -> ParityComparison:
    floor = ERROR_FLOOR * new.atol
    b_err, n_err = base.max_abs_err, new.max_abs_err
    growth = n_err / max(b_err, floor) if max(b_err, floor) > 0 else None
    errors = f"max abs err {b_err:.3g} -> {n_err:.3g}"
    if base.passed and not new.passed:
        verdict, reason = Verdict.regression, f"parity now fails ({errors}, atol {new.atol:g})"
    elif not base.passed and new.passed:
        verdict, reason = Verdict.improvement, f"parity passes now ({errors})"
    elif not base.passed:
        verdict, reason = Verdict.unchanged, f"parity still fails ({errors})"
    elif growth is not None and growth > factor:
        verdict, reason = Verdict.regression, f"parity error grew {growth:.3g}x ({errors}; more than {factor:g}x)"
    elif n_err * factor < b_err and b_err > floor:
        verdict, reason = Verdict.improvement, f"parity error shrank {b_err / max(n_err, floor):.3g}x ({errors})"
    else:
        verdict, reason = Verdict.unchanged, f"parity passes ({errors})"
    return ParityComparison(verdict=verdict, baseline_passed=base.passed, new_passed=new.passed,
                            baseline_max_abs_err=b_err, new_max_abs_err=n_err, growth=growth, reason=reason)


# ------------------------------------------------------------------------------------------------ rows


def worst(verdicts: Iterable[Verdict]) -> Verdict:
    found = set(verdicts)
    return next((v for v in SEVERITY if v in found), Verdict.unchanged)


@dataclass
class _Pair:
    base: BatchJob
    new: BatchJob


def _row(pair: _Pair, artifact: str | None, **fields: object) -> ArtifactComparison:
    return ArtifactComparison(model=pair.new.model, target=pair.new.target, artifact=artifact,
                              baseline_source=pair.base.source, new_source=pair.new.source, cached=pair.new.cached,
                              **fields)  # type: ignore[arg-type]


def _job_problem(job: BatchJob) -> str:
    return job.error or job.status.value


def _compare_artifacts(pair: _Pair, b: ArtifactReport | None, n: ArtifactReport | None,
                       rules: CompareRules) -> ArtifactComparison:
    either = n or b
    artifact = either.id if either is not None else None
    statuses = {"baseline_status": b.status.value if b else pair.base.status.value,
                "new_status": n.status.value if n else pair.new.status.value}
    if b is None and n is None:  # neither job got as far as an artifact (failed or cancelled)
        same = pair.base.status is pair.new.status
        reason = (f"the job {'still ' if same else ''}{'fails' if pair.new.status is JobStatus.failed else 'is '}"
                  f"{'' if pair.new.status is JobStatus.failed else pair.new.status.value}: {_job_problem(pair.new)}")
        return _row(pair, None, verdict=Verdict.unchanged if same else Verdict.inconclusive, reasons=[reason],
                    **statuses)
    if b is None:
        assert n is not None
        if pair.base.artifacts:
            return _row(pair, artifact, verdict=Verdict.added, reasons=[f"{n.id} is newly requested"], **statuses)
        ok = n.status is StepStatus.succeeded and n.parity is not None and n.parity.passed
        reason = f"the job failed before ({_job_problem(pair.base)}); {n.id} " + (
            "converts now" if ok else f"is {n.status.value} now")
        return _row(pair, artifact, verdict=Verdict.improvement if ok else Verdict.unchanged, reasons=[reason],
                    **statuses)
    if n is None:
        if pair.new.artifacts:
            return _row(pair, artifact, verdict=Verdict.removed, reasons=[f"{b.id} is no longer requested"],
                        **statuses)
        verdict = Verdict.regression if b.status is StepStatus.succeeded else Verdict.unchanged
        return _row(pair, artifact, verdict=verdict, reasons=[f"the job now fails: {_job_problem(pair.new)}"],
                    **statuses)
    if StepStatus.skipped in (b.status, n.status):
        same = b.status is n.status
        reason = f"{b.id} was {b.status.value}, is {n.status.value}" + (f" ({n.error or b.error})"
                                                                        if n.error or b.error else "")
        return _row(pair, artifact, verdict=Verdict.unchanged if same else Verdict.inconclusive, reasons=[reason],
                    **statuses)
    if b.status is StepStatus.succeeded and n.status is StepStatus.failed:
        return _row(pair, artifact, verdict=Verdict.regression, reasons=[f"conversion now fails: {n.error}"],
                    **statuses)
    if b.status is StepStatus.failed and n.status is StepStatus.succeeded:
        reason = f"converts now (route {n.route})" if n.route else "converts now"
        return _row(pair, artifact, verdict=Verdict.improvement, reasons=[reason], **statuses)
    if b.status is StepStatus.failed:
        return _row(pair, artifact, verdict=Verdict.unchanged, reasons=[f"conversion still fails: {n.error}"],
                    **statuses)
    parity = judge_parity(b.parity, n.parity, rules.error_factor) if b.parity and n.parity else None
    latency = judge_latency(b.latency, n.latency, rules.latency_threshold) if b.latency and n.latency else None
    found = [c for c in (parity, latency) if c is not None]
    reasons = [c.reason for c in found] or ["converted in both batches (nothing measured to compare)"]
    return _row(pair, artifact, verdict=worst(c.verdict for c in found), reasons=reasons, parity=parity,
                latency=latency, **statuses)


def _match(base: BatchReport, new: BatchReport) -> tuple[list[_Pair], list[BatchJob], list[BatchJob], list[str]]:
    """Jobs paired by model name and target, then leftovers by source path; and what is left on each side."""
    by_name = {(j.model, j.target): j for j in base.jobs}
    pairs, added, notes = [], [], []
    for j in new.jobs:
        other = by_name.pop((j.model, j.target), None)
        if other is None:
            added.append(j)
            continue
        pairs.append(_Pair(other, j))
        if other.source != j.source:
            notes.append(f"{j.model} ({j.target.value}): its source path changed from {other.source} to {j.source}")
    by_path = {(j.source, j.target): j for j in by_name.values()}
    for j in list(added):
        other = by_path.pop((j.source, j.target), None)
        if other is not None:
            added.remove(j)
            del by_name[(other.model, other.target)]
            pairs.append(_Pair(other, j))
            notes.append(f"{other.model} is now named {j.model} ({j.target.value}; same source path {j.source})")
    return pairs, list(by_name.values()), added, notes


def _unfinished(report: BatchReport) -> None:
    pending = [j for j in report.jobs if not j.status.finished]
    if pending:
        raise UsageError(f"batch {report.batch} is not finished: {len(pending)} of {len(report.jobs)} job(s) still "
                         f"queued or running ({', '.join(j.model for j in pending[:5])})", step="compare",
                         hint=f"`portq wait {report.batch}` first")


def compare(base: BatchReport, new: BatchReport, rules: CompareRules | None = None,
            series: str | None = None) -> Comparison:
    """Compare two finished batches; a UsageError (exit 2) when they cannot be compared."""
    rules = rules or CompareRules()
    if base.store != new.store:
        raise UsageError(f"the batches come from different stores: {base.batch} from {base.store}, {new.batch} from "
                         f"{new.store}", step="compare",
                         hint="compare nights of one store, where the same model and options share a cached result")
    if base.batch == new.batch:
        raise UsageError(f"batch {base.batch} is compared with itself", step="compare",
                         hint="give two different batches, or --series S for its last two nights")
    _unfinished(base)
    _unfinished(new)
    pairs, removed, added, notes = _match(base, new)
    if not pairs:
        names = ", ".join(sorted({j.model for j in base.jobs})[:8])
        new_names = ", ".join(sorted({j.model for j in new.jobs})[:8])
        raise UsageError(f"batches {base.batch} and {new.batch} have no model in common ({base.batch}: {names}; "
                         f"{new.batch}: {new_names})", step="compare",
                         hint="models are matched by name and target; compare nights of one manifest")
    rows = []
    for pair in sorted(pairs, key=lambda p: (p.new.model, p.new.target.value)):
        b_arts = {a.id: a for a in pair.base.artifacts}
        n_arts = {a.id: a for a in pair.new.artifacts}
        ids = list(n_arts) + [i for i in b_arts if i not in n_arts]
        rows += [_compare_artifacts(pair, b_arts.get(i), n_arts.get(i), rules) for i in ids]
        if not ids:
            rows.append(_compare_artifacts(pair, None, None, rules))
    for j in sorted(removed, key=lambda j: (j.model, j.target.value)):
        rows.append(ArtifactComparison(model=j.model, target=j.target, verdict=Verdict.removed,
                                       baseline_source=j.source, baseline_status=j.status.value,
                                       reasons=[f"only in the baseline ({j.source})"]))
    for j in sorted(added, key=lambda j: (j.model, j.target.value)):
        rows.append(ArtifactComparison(model=j.model, target=j.target, verdict=Verdict.added, new_source=j.source,
                                       new_status=j.status.value, cached=j.cached,
                                       reasons=[f"new in this batch ({j.source})"]))
    counts = {v.value: sum(r.verdict is v for r in rows) for v in SEVERITY}
    return Comparison(baseline=base.batch, new=new.batch, store=new.store, series=series, rules=rules,
                      regressed=counts[Verdict.regression.value] > 0, counts=counts, notes=notes, rows=rows)


# ------------------------------------------------------------------------------ content for both renderers

COMPARE_COLUMNS = ["model", "target", "artifact", "verdict", "p50 ms (baseline -> new)", "change",
                   "max abs err (baseline -> new)", "cached", "why"]


def comparison_rows(c: Comparison) -> list[list[str]]:
    rows = []
    for r in c.rows:
        lat, par = r.latency, r.parity
        rows.append([
            r.model, r.target.value, r.artifact or "-", r.verdict.value,
            f"{lat.baseline_p50_ms:.3g} -> {lat.new_p50_ms:.3g}" if lat else "-",
            _pct(lat.change) if lat else "-",
            f"{par.baseline_max_abs_err:.3g} -> {par.new_max_abs_err:.3g}" if par else "-",
            "yes" if r.cached else "", "; ".join(r.reasons)])
    return rows


def comparison_headline(c: Comparison) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in c.counts.items() if v)
    verdict = "REGRESSED" if c.regressed else "no regression"
    return f"{verdict}: {counts}" + (f" (series {c.series})" if c.series else "")


def rules_line(c: Comparison) -> str:
    return (f"latency: a change beyond {c.rules.latency_threshold:.0%} of the baseline p50 and beyond both "
            "measurements' window ranges; a disturbed (unstable or busy) slower side is inconclusive unless even its "
            f"fastest run clears the other's range; parity: passed -> failed, or max abs error grown beyond "
            f"{c.rules.error_factor:g}x")


def regressions(c: Comparison) -> list[str]:
    """`model/target/artifact` of every regressed row (what the CLI names on stderr)."""
    return [f"{r.model}/{r.target.value}/{r.artifact or '-'}" for r in c.rows if r.verdict is Verdict.regression]


def comparison_markdown(c: Comparison) -> str:
    lines = [f"# portq compare {c.baseline} -> {c.new}", "", f"**{comparison_headline(c)}**", "",
             markdown_table(COMPARE_COLUMNS, comparison_rows(c)), ""]
    lines += [f"- note: {n}" for n in c.notes]
    lines += ["", f"Rules: {rules_line(c)}.", ""]
    return "\n".join(lines)
