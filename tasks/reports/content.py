"""Human-readable reports: Markdown per job (report.md), the batch summary table, and the best-format pick.

The job report's content (facts, table rows, sentences) is built here once, as plain strings, and
rendered twice: as Markdown below and as HTML in `portq.tasks.reports.html`, so the two never drift.
"""

from __future__ import annotations

from portq.tasks.core.contract import (
    ArtifactReport,
    BatchReport,
    FusionReport,
    JobReport,
    JobStatus,
    LatencyReport,
    Memory,
    ParityReport,
    StepStatus,
    Timing,
    ToleranceMode,
)
from portq.tasks.reports import fusion
from portq.tasks.reports.facts import Fact
from portq.tasks.reports.facts import fmt as _fmt


def speedup_interval(a: ArtifactReport) -> tuple[float, float]:
    """An artifact's speedup interval (low, high); a report without one (older than paired timing) is a point."""
    assert a.latency is not None
    lat = a.latency
    return (lat.speedup_interval[0], lat.speedup_interval[1]) if lat.speedup_interval else (lat.speedup, lat.speedup)


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two speedup intervals (low, high) overlap: neither is shown to be faster than the other."""
    return a[0] <= b[1] and b[0] <= a[1]


#: files within this fraction of the smallest tied one count as the same size when a tie is broken
SAME_SIZE = 0.10

#: how `JobReport.best_note` begins when no artifact beats the source
NO_FASTER = "no faster artifact than the source"


def beats_source(a: ArtifactReport) -> bool:
    """Whether the artifact is measured faster than the source: its speedup above 1x, and its interval not entirely at
    or below 1x."""
    return a.latency is not None and a.latency.speedup > 1.0 and speedup_interval(a)[1] > 1.0


def mark_best(artifacts: list[ArtifactReport]) -> str | None:
    """Mark the fastest artifact that converted, passed parity and beats the source (the highest speedup over the
    source); return its id. None when no artifact qualifies: `no_pick_note` says why.

    The fastest is the one most surely fast: the highest lower bound of its interval (a wide interval's high
    estimate does not make it the anchor). Artifacts whose intervals overlap its are tied with it: none is shown
    to be faster. The tie is broken by a stated rule: a conclusive comparison before an inconclusive one (an
    interval too wide to tell ties with everything near it, and must not outrank a measured speedup), then
    lossless before lossy (an optimization that changes the numbers), then the smaller file where the files
    differ by more than `SAME_SIZE` (a fused graph a few kilobytes larger is not a reason to ship a slower one),
    then the higher estimate, then the job's order. The pick's `best_note` says when it was a tie, and when its
    speedup is inconclusive.
    """
    eligible = [a for a in artifacts if a.good and a.latency is not None and beats_source(a)]
    for a in artifacts:
        a.best, a.best_note = False, None
    if not eligible:
        return None
    fastest = max(eligible, key=lambda a: (speedup_interval(a)[0], a.latency.speedup if a.latency else 0.0))
    tied = [a for a in eligible if overlap(speedup_interval(a), speedup_interval(fastest))]
    kept = [a for a in tied if a.latency is not None and not a.latency.inconclusive] or tied
    kept = [a for a in kept if lossless(a)] or kept
    sizes = [a.size_bytes for a in kept if a.size_bytes is not None]
    if sizes:
        kept = [a for a in kept if a.size_bytes is not None and a.size_bytes <= min(sizes) * (1 + SAME_SIZE)]
    best = min(kept, key=lambda a: (-(a.latency.speedup if a.latency else 0.0), eligible.index(a)))
    notes = []
    if len(tied) > 1:
        others = ", ".join(a.id for a in tied if a is not best)
        notes.append(f"tied with {others} (speedup intervals overlap): picked by the rule a conclusive speedup "
                     f"first, then lossless, then the smaller file (by more than {SAME_SIZE:.0%}), then the higher "
                     "estimate")
    assert best.latency is not None
    if best.latency.inconclusive:
        notes.append(f"its speedup is inconclusive: {best.latency.inconclusive_reason}")
    best.best, best.best_note = True, "; ".join(notes) or None
    return best.id


def no_pick_note(artifacts: list[ArtifactReport]) -> str | None:
    """The job's `best_note` when artifacts passed parity and were timed but none beats the source (None otherwise:
    a pick, or nothing that passed to speak of)."""
    timed = [a for a in artifacts if a.good and a.latency is not None]
    if not timed or any(a.best for a in artifacts):
        return None
    fastest = max(timed, key=lambda a: a.latency.speedup if a.latency else 0.0)
    return (f"{NO_FASTER}: the fastest that passed parity, {fastest.id}, runs at {speedup_text(fastest)} the "
            "source's speed; serve the source model")


def lossless(a: ArtifactReport) -> bool:
    """Whether the artifact computes with the source's numbers (no lossy optimization such as fp16 or int8)."""
    return a.optimization is None or a.optimization.lossless


def speedup_text(a: ArtifactReport) -> str:
    """The speedup as the tables show it: `3.40x (3.10-3.80)`, flagged when inconclusive."""
    if a.latency is None:
        return "-"
    lat = a.latency
    text = f"{lat.speedup:.2f}x"
    if lat.speedup_interval:
        text += f" ({lat.speedup_interval[0]:.2f}-{lat.speedup_interval[1]:.2f})"
    return f"inconclusive: {text}" if lat.inconclusive else text


def artifact_row(a: ArtifactReport) -> list[str]:
    parity = "-" if a.parity is None else ("pass" if a.parity.passed else "FAIL")
    max_abs = _fmt(a.parity.max_abs_err) if a.parity else "-"
    p50 = "-"
    if a.latency:
        p50 = _fmt(a.latency.p50_ms) + ("" if a.latency.stable else " (unstable)")
    src = _fmt(a.latency.source_p50_ms) if a.latency else "-"
    note = a.error or (f"route {a.route}" if a.route else "")
    if a.optimization is not None and a.status is not StepStatus.skipped:
        note += f" + {a.optimization.transform}"
    if a.latency and a.latency.inconclusive:
        note += f"; speedup inconclusive: {a.latency.inconclusive_reason}"
    elif a.latency and a.latency.speedup < 1.0 and a.status is StepStatus.succeeded:
        note += "; slower than the source"
    if a.parity and a.parity.first_divergence:
        d = a.parity.first_divergence
        note += f"; diverges at {d.node} ({d.op_type}{', ' + d.module if d.module else ''})"
    best = ("best (tie)" if a.best_note and a.best_note.startswith("tied") else "best") if a.best else ""
    return [a.id, a.status.value, parity, max_abs, p50, src, speedup_text(a), best, note]


ARTIFACT_COLUMNS = ["artifact", "status", "parity", "max abs err", "p50 ms", "source p50 ms", "speedup", "best",
                    "note"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _timing_row(label: str, t: Timing) -> list[str]:
    return [label, str(t.batch_size or "-"), _fmt(t.p50_ms), _fmt(t.p90_ms), _fmt(t.p95_ms), _fmt(t.p99_ms),
            _fmt(t.mean_ms), _fmt(t.std_ms), _fmt(t.first_run_ms), f"{t.throughput_per_s:.1f}",
            f"{t.runs} ({t.windows} windows)", "yes" if t.stable else f"NO (spread {t.spread:.0%})"]


TIMING_COLUMNS = ["", "batch", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "mean ms", "std ms", "first run ms",
                  "items/s", "runs", "stable"]


# ----------------------------------------------------------- the job report's content, shared by both renderers


def size_text(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def job_facts(r: JobReport) -> list[Fact]:
    """The job's header lines: source, status, best pick, how it failed, what it trusted, where it ran."""
    facts = [Fact("source", r.source), Fact("batch", r.batch),
             Fact("status", r.status.value + (" (cached)" if r.cached else ""), strong=True,
                  bad=r.status is JobStatus.failed)]
    if r.best:
        pick = next((a for a in r.artifacts if a.id == r.best), None)
        note = pick.best_note if pick is not None else None
        facts.append(Fact("best pick", r.best + (f" ({note})" if note else ""), strong=True))
    elif r.best_note:
        facts.append(Fact("best pick", f"none: {r.best_note}", strong=True, bad=True))
    verdict = speed_verdict(r)
    if verdict and not r.best_note:
        facts.append(Fact("speed", verdict, bad=verdict.startswith("no artifact")))
    facts += search_facts(r)
    f = r.failure
    if f is not None:
        where = ", ".join(x for x in (f"step {f.step}" if f.step else "", f"file {f.file}" if f.file else "") if x)
        facts.append(Fact(f"failure ({f.kind} error)", (f"[{where}] " if where else "") + f.cause, bad=True))
        if f.hint:
            facts.append(Fact("hint", f.hint))
    elif r.error:
        facts.append(Fact("error", r.error, bad=True))
    facts += [Fact("note", note) for note in r.notes]
    if r.trust_pickle:
        facts.append(Fact("trust pickle", "yes (--trust-pickle: the model was loaded by full unpickling, which "
                                          "can run code from the file)", bad=True))
    if r.trust_remote_code:
        facts.append(Fact("trust remote code", "yes (--trust-remote-code: code shipped with the model folder ran)",
                          bad=True))
    if r.duration_s is not None:
        facts.append(Fact("duration", f"{r.duration_s:.1f} s on {r.worker or '?'}"))
    return facts


def speed_verdict(r: JobReport) -> str | None:
    """Whether anything the job made beats the source model (p50 at the sample), said plainly."""
    timed = [a for a in r.artifacts if a.latency is not None and a.status is StepStatus.succeeded]
    if not timed:
        return None
    passing = [a for a in timed if a.good]
    fastest = max(passing or timed, key=lambda a: a.latency.speedup if a.latency else 0.0)
    assert fastest.latency is not None
    if fastest.latency.inconclusive:
        return (f"{fastest.id} measured {speedup_text(fastest)} the source's speed, not a precise number: "
                f"{fastest.latency.inconclusive_reason}" + ("" if passing else " (and it failed parity)"))
    if fastest.latency.speedup >= 1.0:
        return f"{fastest.id} is {speedup_text(fastest)} the source's speed" + (
            "" if passing else " (but it failed parity)")
    return (f"no artifact is faster than the source model: the fastest, {fastest.id}, runs at "
            f"{fastest.latency.speedup:.2f}x its speed; serve the PyTorch model, or try --optimize")


def search_facts(r: JobReport) -> list[Fact]:
    """What --optimize tried, pruned and did not try (each one's reason is in its row's note)."""
    candidates = [a for a in r.artifacts if a.requested_by == "optimize"]
    if not candidates:
        return []
    tried = [a.id for a in candidates if a.status is not StepStatus.skipped]
    pruned = [a.id for a in candidates if a.pruned]
    skipped = [a.id for a in candidates if a.status is StepStatus.skipped and not a.pruned]
    failed = [a.id for a in candidates if a.status is StepStatus.failed or (a.parity and not a.parity.passed)]
    parts = [f"tried {len(tried)}" + (f" ({', '.join(tried)})" if tried else "")]
    if failed:
        parts.append(f"of which {len(failed)} failed, each with its error below ({', '.join(failed)})")
    if pruned:
        parts.append(f"pruned {len(pruned)}, their family could not win ({', '.join(pruned)})")
    if skipped:
        parts.append(f"not tried {len(skipped)} ({', '.join(skipped)})")
    return [Fact("optimize", "; ".join(parts))]


def artifact_facts(a: ArtifactReport) -> list[Fact]:
    """An artifact's own lines: the route that made it, its opset, size, file and reproduce script."""
    facts = []
    if a.error:
        facts.append(Fact("error", a.error, bad=True))
    if a.variant != "default" or a.options:
        options = ", ".join(f"{k}={v}" for k, v in a.options.items() if v is not None)
        facts.append(Fact("variant", f"{a.format.value} {a.variant}" + (f" ({options})" if options else "")))
    if a.requested_by != "request":
        facts.append(Fact("why", {"optimize": "an --optimize candidate"}.get(a.requested_by, a.requested_by)))
    if a.route:
        facts.append(Fact("route", a.route))
    o = a.optimization
    if o is not None:
        facts.append(Fact("optimization", f"{o.transform} on {o.base}" + ("" if o.lossless else " (lossy)")))
        kept = o.facts.get("node_block_list")
        if kept:
            facts.append(Fact("kept in float32", f"{len(kept)} node(s): " + ", ".join(kept[:20])
                              + (" ..." if len(kept) > 20 else "")))
        summary = optimization_summary(o.facts)
        if summary:
            facts.append(Fact("optimizer", summary))
        facts += [Fact("note", n) for n in o.facts.get("notes", [])]
    facts += [Fact("rewrite", note) for note in a.notes]
    if a.opset is not None:
        facts.append(Fact("opset", str(a.opset)))
    if a.size_bytes is not None:
        facts.append(Fact("size", size_text(a.size_bytes)))
    if a.path:
        facts.append(Fact("file", a.path))
    if a.reproduce:
        facts.append(Fact("reproduce", a.reproduce))
    return facts


def optimization_summary(facts: dict[str, object]) -> str:
    """The optimizer's own facts worth a line: node counts, fused operators, host-specific layout."""
    parts = []
    if "nodes_before" in facts and "nodes_after" in facts:
        parts.append(f"nodes {facts['nodes_before']} -> {facts['nodes_after']}")
    fused = facts.get("fused") or facts.get("fused_ops")  # ORT transformer fusion's statistics, else the op counts
    if isinstance(fused, dict) and fused:
        parts.append("fused " + ", ".join(f"{k} {v}" for k, v in fused.items() if v))
    if facts.get("hardware_specific"):
        parts.append("weights laid out for this host's CPU (serve on the same kind of CPU)")
    if "passed" in facts and "history" in facts:
        parts.append(f"repair {'passed' if facts['passed'] else 'did not pass'} after "
                     f"{len(facts['history'])} conversion(s)")  # type: ignore[arg-type]
    return "; ".join(parts)


ATTEMPT_COLUMNS = ["route", "outcome", "seconds"]


def attempt_rows(a: ArtifactReport) -> list[list[str]]:
    """Every route tried for the artifact, in order, and what became of it."""
    return [[t.route, "converted" if t.error is None else t.error, f"{t.seconds:.2f}"] for t in a.attempts]


def parity_summary(p: ParityReport) -> str:
    return (f"{p.samples} samples ({p.user_samples} yours, {p.random_samples} random, seed {p.seed}) on {p.device}; "
            f"precision {p.precision.value}; default check {p.mode.value} atol {p.atol:g} / rtol {p.rtol:g}; "
            f"input shapes {p.sample_shapes or '-'}.")


PARITY_COLUMNS = ["output", "shape", "passed", "check", "tolerance from", "statistic abs / rel", "failing",
                  "max abs", "mean abs", "median abs", "p99 abs", "max rel", "mean rel", "median rel", "p99 rel",
                  "cosine", "top-1 / top-k", "NaN/Inf src vs art", "min atol", "min rtol"]


def parity_rows(p: ParityReport) -> list[list[str]]:
    rows = []
    for o in p.outputs:
        t = o.tolerance
        check = "-"
        if t is not None:
            stat = f"p{t.quantile * 100:g}" if t.mode is ToleranceMode.quantile and t.quantile else t.mode.value
            check = f"{stat} atol {t.atol:g} / rtol {t.rtol:g}"
        stats = "-" if o.statistic_abs is None else f"{_fmt(o.statistic_abs)} / {_fmt(o.statistic_rel)}"
        top = "-" if o.top1_agreement is None else f"{o.top1_agreement:.1%}"
        if o.topk_agreement is not None:
            top += f" / top-{o.topk} {o.topk_agreement:.1%}"
        rows.append([o.name, str(o.shape), "pass" if o.passed else "FAIL", check, t.origin if t else "-", stats,
                     f"{o.failing_elements}/{o.elements}", _fmt(o.max_abs_err), _fmt(o.mean_abs_err),
                     _fmt(o.median_abs_err), _fmt(o.p99_abs_err), _fmt(o.max_rel_err), _fmt(o.mean_rel_err),
                     _fmt(o.median_rel_err), _fmt(o.p99_rel_err),
                     "-" if o.cosine_similarity is None else f"{o.cosine_similarity:.6f}", top,
                     f"{o.nan_source}/{o.inf_source} vs {o.nan_artifact}/{o.inf_artifact}", _fmt(o.min_atol),
                     _fmt(o.min_rtol)])
    return rows


PARITY_LEGEND = ("failing: elements over both atol and rtol (the elementwise view); min atol: the smallest atol "
                 "that passes at the output's rtol; min rtol: the smallest rtol that passes at its atol.")


def parity_notes(p: ParityReport) -> list[Fact]:
    """Where the artifact first diverges from the source, each output's problems, and how that was searched."""
    facts = [Fact(f"{o.name} problems", "; ".join(o.problems), bad=True) for o in p.outputs if o.problems]
    d = p.first_divergence
    if d is not None:
        module = f", module {d.module}" + (f" ({d.module_class})" if d.module_class else "") if d.module else ""
        facts.append(Fact("first divergence",
                          f"node {d.node} ({d.op_type}, from {d.source_node or '-'} {d.target or ''}{module}): "
                          f"max abs err {d.max_abs_err:.3g}, max rel err {d.max_rel_err:.3g} on sample {d.sample}",
                          bad=True))
    if p.localisation:
        facts.append(Fact("localisation", p.localisation))
    return facts


def latency_headline(lat: LatencyReport) -> str:
    return (f"speedup (source p50 / artifact p50): {lat.speedup:.2f}x"
            + ("" if lat.stable else " (a measurement was unstable: read with care)"))


def timing_table(lat: LatencyReport) -> tuple[list[str], list[list[str]]]:
    """The artifact's and the source's timing side by side (full statistics when the report has them)."""
    if lat.artifact and lat.source:
        return TIMING_COLUMNS, [_timing_row("artifact", lat.artifact), _timing_row("source (PyTorch)", lat.source)]
    return ["", "p50 ms", "p90 ms", "p99 ms", "mean ms"], [
        ["artifact", _fmt(lat.p50_ms), _fmt(lat.p90_ms), _fmt(lat.p99_ms), _fmt(lat.mean_ms)],
        ["source (PyTorch)", _fmt(lat.source_p50_ms), _fmt(lat.source_p90_ms), _fmt(lat.source_p99_ms),
         _fmt(lat.source_mean_ms)]]


SWEEP_COLUMNS = ["batch", "artifact p50 ms", "source p50 ms", "speedup", "artifact items/s", "source items/s"]


def sweep_rows(lat: LatencyReport) -> list[list[str]]:
    return [[str(s.batch_size), _fmt(s.artifact.p50_ms), _fmt(s.source.p50_ms), f"{s.speedup:.2f}x",
             f"{s.artifact.throughput_per_s:.1f}", f"{s.source.throughput_per_s:.1f}"] for s in lat.sweep]


def memory_text(m: Memory) -> str:
    text = f"peak RSS {m.rss_peak_mb:.0f} MB (+{m.rss_delta_mb:.0f} MB over {m.rss_before_mb:.0f} MB; {m.method})"
    if m.cuda_peak_mb is not None:
        text += f", CUDA peak {m.cuda_peak_mb:.0f} MB"
    if m.cuda_used_mb is not None:
        text += f", CUDA in use {m.cuda_used_mb:.0f} MB"
    return text


def latency_facts(lat: LatencyReport) -> list[Fact]:
    """Loading, memory (artifact and source), execution providers, the stability criterion and any notes."""
    facts = []
    if lat.load_ms is not None:
        facts.append(Fact("load", f"{lat.load_ms:.1f} ms"))
    if lat.memory:
        facts.append(Fact("memory, artifact", memory_text(lat.memory)))
    if lat.source_memory:
        facts.append(Fact("memory, source (PyTorch)", memory_text(lat.source_memory)))
    if lat.providers:
        facts.append(Fact("execution providers", ", ".join(lat.providers)))
    if lat.criterion:
        facts.append(Fact("criterion", lat.criterion))
    facts += [Fact("note", n) for n in lat.notes]
    return facts


# ------------------------------------------------------------------------------------------------ Markdown


def _md_facts(facts: list[Fact]) -> list[str]:
    return [f"- {f.label}: " + (f"**{f.value}**" if f.strong else f.value) for f in facts]


def job_markdown(r: JobReport) -> str:
    out = [f"# portq job {r.job_id}: {r.model} -> {r.target.value}", "", *_md_facts(job_facts(r)), ""]
    out += [markdown_table(ARTIFACT_COLUMNS, [artifact_row(a) for a in r.artifacts]), ""]
    if r.fusion is not None:
        out += fusion_markdown(r.fusion)
    for a in r.artifacts:
        out += [f"## {a.id}" + (" (best pick)" if a.best else ""), ""]
        facts = artifact_facts(a)
        if facts:
            out += [*_md_facts(facts), ""]
        if a.attempts:
            out += ["Routes tried:", "", markdown_table(ATTEMPT_COLUMNS, attempt_rows(a)), ""]
        if a.parity:
            p = a.parity
            out += [f"### parity {'passed' if p.passed else 'FAILED'}", "", parity_summary(p), "",
                    markdown_table(PARITY_COLUMNS, parity_rows(p)), "", PARITY_LEGEND, ""]
            notes = parity_notes(p)
            if notes:
                out += [*_md_facts(notes), ""]
        if a.latency:
            lat = a.latency
            out += [f"### latency on {lat.device}", "", markdown_table(*timing_table(lat)), "", latency_headline(lat),
                    ""]
            if lat.sweep:
                out += [markdown_table(SWEEP_COLUMNS, sweep_rows(lat)), ""]
            out += [*_md_facts(latency_facts(lat)), ""]
    if r.environment:
        out += ["## environment", "", environment_line(r.environment), ""]
    if r.toolchain:
        out.append("toolchain: " + toolchain_line(r))
    return "\n".join(out) + "\n"


def fusion_markdown(f: FusionReport) -> list[str]:
    """The fusion section's Markdown lines (content in `portq.tasks.reports.fusion`)."""
    out = ["## fusion", "", *_md_facts(fusion.fusion_facts(f)), "",
           markdown_table(fusion.MEMBER_COLUMNS, fusion.member_rows(f)), ""]
    if f.greedy_steps:
        out += ["Greedy soup, in order of the members' scores:", "",
                markdown_table(fusion.GREEDY_COLUMNS, fusion.greedy_rows(f)), ""]
    if f.finetune is not None:
        out += ["Fine-tune loss per epoch:", "", markdown_table(fusion.LOSS_COLUMNS, fusion.loss_rows(f)), ""]
    return out


def toolchain_line(r: JobReport) -> str:
    return ", ".join(f"{k} {v}" for k, v in r.toolchain.items())


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


#: `source` is the file each job came from, as the user gave it (albert.pt and albert.pt2 are two jobs named albert)
SUMMARY_COLUMNS = ["model", "source", "target", "job status", *ARTIFACT_COLUMNS]


#: the `best` cell of a job's extra row when no artifact beats the source
NO_PICK = "none"


def summary_rows(b: BatchReport) -> list[list[str]]:
    """One row per artifact; a job without artifacts gets one with its error, and a job where nothing beat the
    source one more, `best` none, with the job's `best_note`."""
    rows = []
    blank = ["-"] * (len(ARTIFACT_COLUMNS) - 2)
    for j in b.jobs:
        status = j.status.value + (" (cached)" if j.cached else "")
        if not j.artifacts:
            rows.append([j.model, j.source, j.target.value, status, *blank, "", j.error or ""])
        for a in j.artifacts:
            rows.append([j.model, j.source, j.target.value, status, *artifact_row(a)])
        if j.best is None and j.best_note:
            rows.append([j.model, j.source, j.target.value, status, "(pick)", *blank[1:], NO_PICK, j.best_note])
    return rows


def counts_line(b: BatchReport) -> str:
    """The batch's jobs by status, and how many were cache hits (served from the cache, not converted again)."""
    counts = ", ".join(f"{k} {v}" for k, v in b.counts.items() if v)
    hits = sum(j.cached for j in b.jobs)
    return counts + (f"; {hits} cache hit(s): {', '.join(j.model for j in b.jobs if j.cached)}" if hits else "")


def relative_link(target: str, base: str) -> str:
    """`target` (a path or URL in the store) as a link from the folder `base`: relative when both are in one
    filesystem or under one URL root, so a page keeps working when the store is served or published."""
    import os
    import posixpath
    from urllib.parse import urlsplit

    t, b = urlsplit(target), urlsplit(base)
    if "://" not in target and "://" not in base:
        return os.path.relpath(target, base)
    if (t.scheme, t.netloc) == (b.scheme, b.netloc) and t.scheme:
        return posixpath.relpath(t.path, b.path or "/")
    return target


def job_links(b: BatchReport, base: str, suffix: str) -> list[tuple[str, str]]:
    """(label, link to the job's report.<suffix>) for every job that has a report, relative to `base`."""
    return [(f"{j.model} ({j.source}, {j.target.value})", relative_link(f"{j.result}/report.{suffix}", base))
            for j in b.jobs if j.result]


def batch_markdown(b: BatchReport, base: str | None = None) -> str:
    """The batch's summary in Markdown; with `base` (the folder the file will be in), links to each job's report."""
    text = f"# portq batch {b.batch}\n\n{counts_line(b)}\n\n{markdown_table(SUMMARY_COLUMNS, summary_rows(b))}\n"
    links = job_links(b, base, "md") if base is not None else []
    if links:
        text += "\n## job reports\n\n" + "\n".join(f"- [{label}]({link})" for label, link in links) + "\n"
    return text
