"""Human-readable reports: Markdown per job (report.md), the batch summary table, and the best-format pick."""

from __future__ import annotations

from portq.tasks.contract import ArtifactReport, BatchReport, Format, JobReport, StepStatus, Timing


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if abs(x) < 1e-2 else f"{x:.{digits}f}"


def mark_best(artifacts: list[ArtifactReport]) -> Format | None:
    """Mark (and return) the fastest artifact that converted and passed parity: lowest p50 at the sample.

    Ties go to the earlier format in the job's order. None when no artifact qualifies.
    """
    eligible = [a for a in artifacts if a.status is StepStatus.succeeded and a.parity is not None
                and a.parity.passed and a.latency is not None]
    best = min(eligible, key=lambda a: a.latency.p50_ms if a.latency else 0.0, default=None)
    for a in artifacts:
        a.best = a is best
    return best.format if best is not None else None


def artifact_row(a: ArtifactReport) -> list[str]:
    parity = "-" if a.parity is None else ("pass" if a.parity.passed else "FAIL")
    max_abs = _fmt(a.parity.max_abs_err) if a.parity else "-"
    p50 = "-"
    if a.latency:
        p50 = _fmt(a.latency.p50_ms) + ("" if a.latency.stable else " (unstable)")
    src = _fmt(a.latency.source_p50_ms) if a.latency else "-"
    speedup = f"{a.latency.speedup:.2f}x" if a.latency else "-"
    note = a.error or (f"route {a.route}" if a.route else "")
    if a.parity and a.parity.first_divergence:
        d = a.parity.first_divergence
        note += f"; diverges at {d.node} ({d.op_type}{', ' + d.module if d.module else ''})"
    return [a.format.value, a.status.value, parity, max_abs, p50, src, speedup, "best" if a.best else "", note]


ARTIFACT_COLUMNS = ["format", "status", "parity", "max abs err", "p50 ms", "source p50 ms", "speedup", "best",
                    "note"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _timing_row(label: str, t: Timing) -> list[str]:
    return [label, str(t.batch_size or "-"), _fmt(t.p50_ms), _fmt(t.p90_ms), _fmt(t.p95_ms), _fmt(t.p99_ms),
            _fmt(t.mean_ms), _fmt(t.std_ms), f"{t.throughput_per_s:.1f}", f"{t.runs} ({t.windows} windows)",
            "yes" if t.stable else f"NO (spread {t.spread:.0%})"]


TIMING_COLUMNS = ["", "batch", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "mean ms", "std ms", "items/s", "runs",
                  "stable"]


def _parity_section(a: ArtifactReport) -> list[str]:
    p = a.parity
    assert p is not None
    out = [f"## {a.format.value}: parity {'passed' if p.passed else 'FAILED'}", "",
           f"{p.samples} samples ({p.user_samples} yours, {p.random_samples} random, seed {p.seed}) on {p.device}; "
           f"precision {p.precision.value}; default check {p.mode.value} atol {p.atol:g} / rtol {p.rtol:g}.", ""]
    rows = []
    for o in p.outputs:
        tol = o.tolerance.mode.value if o.tolerance else "-"
        if o.tolerance and o.tolerance.quantile is not None:
            tol = f"p{o.tolerance.quantile * 100:g}"
        top = "-" if o.top1_agreement is None else f"{o.top1_agreement:.1%}"
        if o.topk_agreement is not None:
            top += f" / top-{o.topk} {o.topk_agreement:.1%}"
        nonfinite = f"{o.nan_source}/{o.inf_source} vs {o.nan_artifact}/{o.inf_artifact}"
        rows.append([o.name, str(o.shape), "yes" if o.passed else "NO", tol, _fmt(o.max_abs_err), _fmt(o.mean_abs_err),
                     _fmt(o.median_abs_err), _fmt(o.p99_abs_err), _fmt(o.max_rel_err), _fmt(o.p99_rel_err),
                     "-" if o.cosine_similarity is None else f"{o.cosine_similarity:.6f}", top, nonfinite,
                     _fmt(o.min_atol), _fmt(o.min_rtol)])
    out.append(_table(["output", "shape", "passed", "check", "max abs", "mean abs", "median abs", "p99 abs",
                       "max rel", "p99 rel", "cosine", "top-1 / top-k", "NaN/Inf src vs art", "min atol",
                       "min rtol"], rows))
    out += ["", "min atol: the smallest atol that passes at the output's rtol; min rtol: the smallest rtol that "
                "passes at its atol.", ""]
    d = p.first_divergence
    if d is not None:
        module = f", module `{d.module}`" + (f" ({d.module_class})" if d.module_class else "") if d.module else ""
        out += [f"**First divergence:** node `{d.node}` ({d.op_type}, from `{d.source_node}` "
                f"{d.target or ''}{module}): max abs err {d.max_abs_err:.3g}, max rel err {d.max_rel_err:.3g} "
                f"on sample {d.sample}.", ""]
    if p.localisation:
        out += [f"Localisation: {p.localisation}", ""]
    return out


def _latency_section(a: ArtifactReport) -> list[str]:
    lat = a.latency
    assert lat is not None
    out = [f"## {a.format.value}: latency on {lat.device}", ""]
    if lat.artifact and lat.source:
        out.append(_table(TIMING_COLUMNS, [_timing_row("artifact", lat.artifact),
                                           _timing_row("source (PyTorch)", lat.source)]))
    else:
        out.append(_table(["", "p50 ms", "p90 ms", "p99 ms", "mean ms"], [
            ["artifact", _fmt(lat.p50_ms), _fmt(lat.p90_ms), _fmt(lat.p99_ms), _fmt(lat.mean_ms)],
            ["source (PyTorch)", _fmt(lat.source_p50_ms), _fmt(lat.source_p90_ms), _fmt(lat.source_p99_ms),
             _fmt(lat.source_mean_ms)]]))
    out += ["", f"speedup (source p50 / artifact p50): **{lat.speedup:.2f}x**" +
            ("" if lat.stable else " (a measurement was unstable: read with care)"), ""]
    if lat.sweep:
        out.append(_table(["batch", "artifact p50 ms", "source p50 ms", "speedup", "artifact items/s"], [
            [str(s.batch_size), _fmt(s.artifact.p50_ms), _fmt(s.source.p50_ms), f"{s.speedup:.2f}x",
             f"{s.artifact.throughput_per_s:.1f}"] for s in lat.sweep]))
        out.append("")
    facts = []
    if lat.load_ms is not None:
        facts.append(f"load {lat.load_ms:.1f} ms")
    if lat.artifact and lat.artifact.first_run_ms is not None:
        facts.append(f"first run {lat.artifact.first_run_ms:.2f} ms")
    if lat.memory:
        facts.append(f"peak RSS {lat.memory.rss_peak_mb:.0f} MB (+{lat.memory.rss_delta_mb:.0f} MB)")
        if lat.memory.cuda_peak_mb is not None:
            facts.append(f"CUDA peak {lat.memory.cuda_peak_mb:.0f} MB")
    if lat.providers:
        facts.append("providers " + ", ".join(lat.providers))
    if facts:
        out += ["- " + "; ".join(facts), ""]
    if lat.criterion:
        out += [f"- {lat.criterion}", ""]
    out += [f"- {n}" for n in lat.notes]
    return out


def job_markdown(r: JobReport) -> str:
    out = [f"# portq job {r.job_id}: {r.model} -> {r.target.value}", ""]
    out.append(f"- source: `{r.source}`  \n- batch: `{r.batch}`  \n- status: **{r.status.value}**"
               + ("  (cached)" if r.cached else ""))
    if r.best:
        out.append(f"- best pick: **{r.best.value}** (fastest artifact that passed parity)")
    if r.error:
        out.append(f"- error: {r.error}")
    if r.duration_s is not None:
        out.append(f"- duration: {r.duration_s:.1f} s on {r.worker}")
    out += ["", _table(ARTIFACT_COLUMNS, [artifact_row(a) for a in r.artifacts]), ""]
    for a in r.artifacts:
        if a.parity:
            out += _parity_section(a)
        if a.latency:
            out += _latency_section(a)
    if r.environment:
        out += ["## environment", "", environment_line(r.environment), ""]
    if r.toolchain:
        out.append("toolchain: " + ", ".join(f"{k} {v}" for k, v in r.toolchain.items()))
    return "\n".join(out) + "\n"


def environment_line(env: dict) -> str:  # type: ignore[type-arg]
    cpu = env.get("cpu") or {}
    threads = env.get("threads") or {}
    parts = [f"{cpu.get('model', '?')} ({cpu.get('logical_cores', '?')} logical cores"
             + (f", {cpu['affinity']} usable" if "affinity" in cpu else "") + ")"]
    if threads:
        parts.append(f"torch threads {threads.get('torch_intra_op')}/{threads.get('torch_inter_op')}")
    gpu = env.get("gpu")
    if gpu:
        parts.append(f"GPU {gpu.get('name')} (driver {gpu.get('driver') or '?'}, CUDA {gpu.get('cuda_runtime')})")
    versions = env.get("versions") or {}
    parts.append(", ".join(f"{k} {v}" for k, v in versions.items()))
    if "load_average_1m" in env:
        parts.append(f"load average {env['load_average_1m']}")
    return "; ".join(parts)


SUMMARY_COLUMNS = ["model", "target", "job status", *ARTIFACT_COLUMNS]


def summary_rows(b: BatchReport) -> list[list[str]]:
    rows = []
    for j in b.jobs:
        status = j.status.value + (" (cached)" if j.cached else "")
        if not j.artifacts:
            rows.append([j.model, j.target.value, status, *["-"] * (len(ARTIFACT_COLUMNS) - 2), "", j.error or ""])
        for a in j.artifacts:
            rows.append([j.model, j.target.value, status, *artifact_row(a)])
    return rows


def batch_markdown(b: BatchReport) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in b.counts.items() if v)
    return f"# portq batch {b.batch}\n\n{counts}\n\n{_table(SUMMARY_COLUMNS, summary_rows(b))}\n"
