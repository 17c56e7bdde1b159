"""Human-readable reports: Markdown per job (report.md) and a batch summary table."""

from __future__ import annotations

from portq.tasks.contract import ArtifactReport, BatchReport, JobReport


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if abs(x) < 1e-2 else f"{x:.{digits}f}"


def artifact_row(a: ArtifactReport) -> list[str]:
    parity = "-" if a.parity is None else ("pass" if a.parity.passed else "FAIL")
    max_abs = _fmt(a.parity.max_abs_err) if a.parity else "-"
    p50 = _fmt(a.latency.p50_ms) if a.latency else "-"
    src = _fmt(a.latency.source_p50_ms) if a.latency else "-"
    speedup = f"{a.latency.speedup:.2f}x" if a.latency else "-"
    note = a.error or (f"route {a.route}" if a.route else "")
    return [a.format.value, a.status.value, parity, max_abs, p50, src, speedup, note]


ARTIFACT_COLUMNS = ["format", "status", "parity", "max abs err", "p50 ms", "source p50 ms", "speedup", "note"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def job_markdown(r: JobReport) -> str:
    out = [f"# portq job {r.job_id}: {r.model} -> {r.target.value}", ""]
    out.append(f"- source: `{r.source}`  \n- batch: `{r.batch}`  \n- status: **{r.status.value}**"
               + ("  (cached)" if r.cached else ""))
    if r.error:
        out.append(f"- error: {r.error}")
    if r.duration_s is not None:
        out.append(f"- duration: {r.duration_s:.1f} s on {r.worker}")
    out += ["", _table(ARTIFACT_COLUMNS, [artifact_row(a) for a in r.artifacts]), ""]
    for a in r.artifacts:
        if a.parity:
            out.append(f"## {a.format.value}: parity ({a.parity.samples} samples, seed {a.parity.seed}, "
                       f"atol {a.parity.atol:g}, rtol {a.parity.rtol:g}, on {a.parity.device})")
            out.append("")
            out.append(_table(["output", "shape", "max abs err", "max rel err", "mean abs err", "passed"], [
                [o.name, str(o.shape), _fmt(o.max_abs_err), _fmt(o.max_rel_err), _fmt(o.mean_abs_err),
                 "yes" if o.passed else "NO"] for o in a.parity.outputs]))
            out.append("")
        if a.latency:
            lat = a.latency
            out.append(f"## {a.format.value}: latency on {lat.device} ({lat.runs} runs after {lat.warmup} warm-up)")
            out.append("")
            out.append(_table(["", "p50 ms", "p90 ms", "p99 ms", "mean ms"], [
                ["artifact", _fmt(lat.p50_ms), _fmt(lat.p90_ms), _fmt(lat.p99_ms), _fmt(lat.mean_ms)],
                ["source (PyTorch)", _fmt(lat.source_p50_ms), _fmt(lat.source_p90_ms), _fmt(lat.source_p99_ms),
                 _fmt(lat.source_mean_ms)]]))
            out.append("")
    if r.toolchain:
        out.append("toolchain: " + ", ".join(f"{k} {v}" for k, v in r.toolchain.items()))
    return "\n".join(out) + "\n"


SUMMARY_COLUMNS = ["model", "target", "job status", *ARTIFACT_COLUMNS]


def summary_rows(b: BatchReport) -> list[list[str]]:
    rows = []
    for j in b.jobs:
        status = j.status.value + (" (cached)" if j.cached else "")
        if not j.artifacts:
            rows.append([j.model, j.target.value, status, "-", "-", "-", "-", "-", "-", "-", j.error or ""])
        for a in j.artifacts:
            rows.append([j.model, j.target.value, status, *artifact_row(a)])
    return rows


def batch_markdown(b: BatchReport) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in b.counts.items() if v)
    return f"# portq batch {b.batch}\n\n{counts}\n\n{_table(SUMMARY_COLUMNS, summary_rows(b))}\n"
