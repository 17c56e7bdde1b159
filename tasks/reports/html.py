"""Self-contained HTML reports: one page per job (report.html), a batch summary page, and the nightly pages
(`portq compare --format html`, `portq history --format html`).

Plots are inline SVG drawn here (latency distribution per artifact, absolute-error histogram per output, each
model's p50 and parity error across a series' nights);
no scripts, fonts or stylesheets are fetched, so a page opens the same offline, from a CI artifact or an
object store. Every value from a report is escaped.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Collection, Sequence
from urllib.parse import quote

from portq.tasks.core.contract import (
    ArtifactReport,
    BatchReport,
    Comparison,
    FusionReport,
    Histogram,
    JobReport,
    SeriesHistory,
    StepStatus,
)
from portq.tasks.reports.compare import COMPARE_COLUMNS, comparison_headline, comparison_rows, rules_line
from portq.tasks.reports.content import (
    ARTIFACT_COLUMNS,
    ATTEMPT_COLUMNS,
    PARITY_COLUMNS,
    PARITY_LEGEND,
    SUMMARY_COLUMNS,
    SWEEP_COLUMNS,
    Fact,
    _fmt,
    artifact_facts,
    artifact_row,
    attempt_rows,
    counts_line,
    environment_line,
    job_facts,
    job_links,
    latency_facts,
    latency_headline,
    parity_notes,
    parity_rows,
    parity_summary,
    summary_rows,
    sweep_rows,
    timing_table,
    toolchain_line,
)
from portq.tasks.reports.history import HISTORY_COLUMNS, Trend, history_rows, history_warnings

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2328;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #dde1e4;padding-bottom:4px}
h1,h2,h3,p,li{overflow-wrap:anywhere}h3{font-size:15px}
.scroll{overflow-x:auto;max-width:100%;margin:8px 0 14px}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #dde1e4;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f3f5f7}
td{white-space:nowrap}td.text{white-space:normal;min-width:16em}td.path{white-space:normal}
td.num{text-align:right;font-variant-numeric:tabular-nums}.pass{color:#18794e;font-weight:600}
.fail{color:#c9252d;font-weight:600}.best{background:#e8f7ee}.regression{background:#fdecec}.muted{color:#5f6b73}
.plots{display:flex;flex-wrap:wrap;gap:18px}figure{margin:0;min-width:0;max-width:100%}
figcaption{font-size:12px;color:#5f6b73}svg{max-width:100%;height:auto}
code{background:#f3f5f7;padding:0 3px;border-radius:3px}
nav{margin:4px 0 12px}nav a{margin-right:14px;display:inline-block;max-width:100%}
"""

COLORS = ("#2f6fde", "#e0832a", "#18794e", "#a23fbf")


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


_NUMBER = re.compile(r"[-+]?\.?\d")


def _cell(text: str) -> str:
    cls = {"pass": "pass", "FAIL": "fail", "failed": "fail", "succeeded": "pass", "best": "pass",
           "regression": "fail", "improvement": "pass"}.get(text)
    if cls is None and _NUMBER.match(text) and not text.endswith("windows)"):
        cls = "num"
    elif cls is None and len(text) > 32 and " " in text:
        cls = "text"  # sentences (a note, an error) wrap; every other cell keeps its tokens whole
    elif cls is None and len(text) > 20 and "/" in text and " " not in text:
        # a path: it may wrap after a slash when the table is short of room
        return f'<td class="path">{"/<wbr>".join(_e(part) for part in text.split("/"))}</td>'
    attrs = f' class="{cls}"' if cls else ""
    return f"<td{attrs}>{_e(text)}</td>"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], best_rows: set[int] | None = None,
          row_class: str = "best") -> str:
    """A table in a box of its own, which scrolls sideways when the table is wider than the page."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_class}"' if best_rows and i in best_rows else ""
        body.append(f"<tr{cls}>" + "".join(_cell(c) for c in row) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


# ------------------------------------------------------------------------------------------------- plots


def _svg(width: float, height: float, title: str, parts: Sequence[str]) -> str:
    """An inline SVG with a viewBox, so that the page's CSS can shrink it to a narrow window."""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:g}" height="{height:g}" '
            f'viewBox="0 0 {width:g} {height:g}" role="img" aria-label="{_e(title)}">{"".join(parts)}</svg>')


#: a glyph's width at most, in ems, in the sans-serif fonts a browser falls back to (DejaVu Sans is the widest)
_EM = 0.66


def _title(title: str, width: float) -> str:
    """A chart's title on its first line, in a smaller font when it would not fit the chart's width."""
    size = min(12.0, (width - 2) / (_EM * max(len(title), 1)))
    return f'<text x="0" y="14" font-size="{size:.1f}" font-weight="600">{_e(title)}</text>'


def svg_bars(labels: Sequence[str], counts: Sequence[int], *, title: str, x_label: str, width: int = 420,
             height: int = 200, color: str = COLORS[0]) -> str:
    """A categorical bar chart (one bar per label)."""
    left, right, top, bottom = 40, 10, 22, 58
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(counts, default=0) or 1
    n = max(len(counts), 1)
    bar_w = plot_w / n
    parts = [_title(title, width),
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#888"/>',
             f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{peak}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" font-size="10" text-anchor="end">0</text>']
    for i, (label, c) in enumerate(zip(labels, counts)):
        h = plot_h * c / peak
        x = left + i * bar_w
        parts.append(f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                     f'height="{h:.1f}" fill="{color}"><title>{_e(label)}: {c}</title></rect>')
        lx, ly = x + bar_w / 2, top + plot_h + 8
        parts.append(f'<text x="{lx:.1f}" y="{ly}" font-size="9" text-anchor="end" '
                     f'transform="rotate(-45 {lx:.1f} {ly})">{_e(label)}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" font-size="11" text-anchor="middle">'
                 f'{_e(x_label)}</text>')
    return _svg(width, height, title, parts)


def svg_histograms(series: Sequence[tuple[str, Histogram]], *, title: str, x_label: str, width: int = 520,
                   height: int = 220) -> str:
    """Linear-axis histograms drawn over one shared x range (translucent, one colour per series)."""
    left, right, top, bottom = 40, 10, 22, 56
    plot_w, plot_h = width - left - right, height - top - bottom
    edges = [e for _, h in series for e in h.edges]
    lo, hi = (min(edges), max(edges)) if edges else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    # shares, not counts: a fast artifact runs many more times than its source in the same windows
    totals = [max(sum(h.counts) + h.above, 1) for _, h in series]
    peak = max((c / t for (_, h), t in zip(series, totals) for c in h.counts), default=0) or 1

    def x(v: float) -> float:
        return left + plot_w * (v - lo) / (hi - lo)

    parts = [_title(title, width),
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#888"/>',
             f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{peak:.0%}</text>']
    for k, tick in enumerate((lo, (lo + hi) / 2, hi)):
        anchor = ("start", "middle", "end")[k]
        parts.append(f'<text x="{x(tick):.1f}" y="{top + plot_h + 12}" font-size="10" text-anchor="{anchor}">'
                     f'{_fmt(tick)}</text>')
    for i, ((name, h), total) in enumerate(zip(series, totals)):
        color = COLORS[i % len(COLORS)]
        for j, c in enumerate(h.counts):
            a, b = h.edges[j], h.edges[j + 1] if j + 1 < len(h.edges) else h.edges[j]
            x0, x1 = x(a), max(x(b), x(a) + 2)
            bh = plot_h * c / total / peak
            parts.append(f'<rect x="{x0:.1f}" y="{top + plot_h - bh:.1f}" width="{x1 - x0:.1f}" height="{bh:.1f}" '
                         f'fill="{color}" fill-opacity="0.55"><title>{_e(name)} {_fmt(a)}-{_fmt(b)} ms: {c} runs'
                         f'</title></rect>')
        tail = f" (+{h.above} slower)" if h.above else ""
        parts.append(f'<rect x="{left + 200 * i}" y="{height - 16}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{left + 200 * i + 14}" y="{height - 7}" font-size="11">{_e(name)}, {total} runs'
                     f'{_e(tail)}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 26}" font-size="11" text-anchor="middle">'
                 f'{_e(x_label)}</text>')
    return _svg(width, height, title, parts)


def svg_lines(labels: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]], *, title: str,
              y_label: str, log: bool = False, width: int = 460, height: int = 220) -> str:
    """Values over a sequence of labelled points (nights), one line per series; a gap where a value is None.

    `log`: a log10 y axis; values at or below 0 are drawn on the axis floor, marked as exact."""
    left, right, top, bottom = 56, 10, 22, 70
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for _, vs in series for v in vs if v is not None and (v > 0 or not log)]
    lo: float
    hi: float
    if log:
        lo = math.floor(math.log10(min(values))) if values else -8
        hi = max(math.ceil(math.log10(max(values))), lo + 1) if values else 0
        fmt_lo, fmt_hi = f"1e{lo:.0f}", f"1e{hi:.0f}"
    else:
        lo, hi = 0.0, (max(values) * 1.1 if values else 1.0) or 1.0
        fmt_lo, fmt_hi = "0", _fmt(hi)
    n = max(len(labels), 1)

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / n)

    def y(v: float) -> float:
        t = ((math.log10(v) if v > 0 else lo) - lo) / (hi - lo) if log else (v - lo) / (hi - lo)
        return top + plot_h * (1 - min(max(t, 0.0), 1.0))

    parts = [_title(title, width),
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#888"/>',
             f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{_e(fmt_hi)}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" font-size="10" text-anchor="end">{_e(fmt_lo)}</text>',
             f'<text x="12" y="{top + plot_h / 2}" font-size="11" text-anchor="middle" '
             f'transform="rotate(-90 12 {top + plot_h / 2})">{_e(y_label)}</text>']
    for i, label in enumerate(labels):
        lx, ly = x(i), top + plot_h + 8
        parts.append(f'<text x="{lx:.1f}" y="{ly}" font-size="9" text-anchor="end" '
                     f'transform="rotate(-40 {lx:.1f} {ly})">{_e(label)}</text>')
    for k, (name, vs) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        run: list[str] = []
        for i, v in enumerate(list(vs) + [None]):
            if v is None:
                if len(run) > 1:
                    points = " ".join(run)
                    parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>')
                run = []
                continue
            run.append(f"{x(i):.1f},{y(v):.1f}")
            exact = " (exact)" if log and v <= 0 else ""
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{color}"><title>{_e(name)} '
                         f'{_e(labels[i])}: {_e(_fmt(v))}{exact}</title></circle>')
    return _svg(width, height, title, parts)


def svg_line(values: Sequence[float], *, title: str, x_label: str, y_label: str, width: int = 420) -> str:
    """A line through the values at 1, 2, ... (a loss curve per epoch): one series of `svg_lines`."""
    return svg_lines([str(i + 1) for i in range(len(values))], [(y_label, list(values))], title=title,
                     y_label=f"{y_label} (x: {x_label})", width=width)


def ratio_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis of ratios: 1, 2 and 5 times the powers of ten in [lo, hi] (only the powers of ten
    when that makes more than nine)."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [(m, float(f"{m}e{k}")) for k in decades for m in (1, 2, 5)]
    ticks = [(m, t) for m, t in ticks if lo <= t <= hi]
    if len(ticks) > 9:
        ticks = [(m, t) for m, t in ticks if m == 1]
    return [t for _, t in ticks]


def _ratio_text(v: float) -> str:
    if v < 0.1:
        return f"{v:.2g}x"
    return f"{v:.2f}x" if v < 10 else f"{v:.1f}x" if v < 100 else f"{v:.0f}x"


def svg_ratio_bars(labels: Sequence[str], ratios: Sequence[float], *, title: str, x_label: str,
                   width: int = 640) -> str:
    """Ratios (speedups) as horizontal bars on a log axis, each drawn from 1x: right of it faster, left slower.

    One row per label, so the chart grows downwards, not sideways; a label too long for its margin is cut
    short (the full label is in the bar's tooltip)."""
    row_h, top, bottom, right, char_w = 22, 26, 40, 58, 11 * _EM
    longest = max((len(label) for label in labels), default=0)
    left = math.ceil(min(max(longest * char_w + 14, 60), width * 0.4))
    fits = math.floor((left - 14) / char_w + 1e-6)
    plot_w = width - left - right
    height = top + row_h * len(ratios) + bottom
    positive = [r for r in ratios if r > 0]
    lo = min(min(positive, default=1.0), 1.0) / 1.25
    hi = max(max(positive, default=1.0), 1.0) * 1.25
    if hi / lo < 4:  # ratios close to 1x: from 0.5x to 2x at least
        lo, hi = min(lo, 0.5), max(hi, 2.0)

    def x(v: float) -> float:
        v = min(max(v, lo), hi)
        return left + plot_w * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    axis_y = top + row_h * len(ratios)
    parts = [_title(title, width)]
    for t in ratio_ticks(lo, hi):
        stroke = "#888" if t == 1 else "#e3e6e8"
        parts.append(f'<line x1="{x(t):.1f}" y1="{top - 4}" x2="{x(t):.1f}" y2="{axis_y}" stroke="{stroke}"/>'
                     f'<text x="{x(t):.1f}" y="{axis_y + 13}" font-size="10" text-anchor="middle">{t:g}x</text>')
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#888"/>')
    for i, (label, v) in enumerate(zip(labels, ratios)):
        y = top + row_h * i
        x0, x1 = sorted((x(1.0), x(v)))
        color = COLORS[2] if v >= 1 else COLORS[1]
        shown = label if len(label) <= fits else label[:max(fits - 1, 1)] + "…"
        parts.append(f'<text x="{left - 6}" y="{y + 15}" font-size="11" text-anchor="end">{_e(shown)}</text>'
                     f'<rect x="{x0:.1f}" y="{y + 4}" width="{max(x1 - x0, 1.5):.1f}" height="{row_h - 8}" '
                     f'fill="{color}"><title>{_e(label)}: {_ratio_text(v)}</title></rect>'
                     f'<text x="{x1 + 4:.1f}" y="{y + 15}" font-size="11">{_ratio_text(v)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle">'
                 f'{_e(x_label)}</text>')
    return _svg(width, height, title, parts)


def error_histogram_svg(name: str, h: Histogram) -> str:
    labels = ["0"] + [f"{e:.0e}" for e in h.edges[:-1]]
    return svg_bars(labels, [h.zeros, *h.counts], title=f"|error| of {name}",
                    x_label="absolute error (decade bins; 0 = exact)")


# ------------------------------------------------------------------------------------------------- pages


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _href(path: str | None) -> str | None:
    """A file of the job's result folder as a link from its report.html; None for a path that is not relative
    to the folder (an absolute path or a URL)."""
    if not path or path.startswith("/") or "://" in path or ".." in path.split("/"):
        return None
    return quote(path)


def _link(path: str, label: str | None = None) -> str:
    href = _href(path)
    return f'<a href="{_e(href)}">{_e(label or path)}</a>' if href else _e(label or path)


def _facts(facts: list[Fact], linked: dict[str, str] | None = None) -> str:
    """The facts as a list; a fact whose label is in `linked` shows its value with that (relative) link."""
    items = []
    for f in facts:
        value = _link(f.value) if linked and f.label in linked and f.value == linked[f.label] else _e(f.value)
        value = f"<strong>{value}</strong>" if f.strong else value
        cls = ' class="fail"' if f.bad else ""
        items.append(f"<li{cls}>{_e(f.label)}: {value}</li>")
    return "<ul>" + "".join(items) + "</ul>" if items else ""


def _artifact_html(a: ArtifactReport) -> list[str]:
    linked = {"file": a.path or "", "reproduce": a.reproduce or ""}
    out = [f"<h2 id=\"{_e(_anchor(a.id))}\">{_e(a.id)}{' — best pick' if a.best else ''}</h2>",
           _facts(artifact_facts(a), linked)]
    if a.data and a.status is StepStatus.succeeded:
        out.append("<p class=\"muted\">beside the file: " + ", ".join(_link(d) for d in a.data) + "</p>")
    if a.attempts:
        out += ["<p class=\"muted\">Routes tried:</p>", table(ATTEMPT_COLUMNS, attempt_rows(a))]
    p = a.parity
    if p is not None:
        verdict = '<span class="pass">passed</span>' if p.passed else '<span class="fail">FAILED</span>'
        out.append(f"<h3>parity {verdict}</h3><p class=\"muted\">{_e(parity_summary(p))}</p>")
        out.append(table(PARITY_COLUMNS, parity_rows(p)))
        out.append(f"<p class=\"muted\">{_e(PARITY_LEGEND)}</p>")
        out.append(_facts(parity_notes(p)))
        plots = [error_histogram_svg(o.name, o.abs_err_histogram) for o in p.outputs if o.abs_err_histogram]
        if plots:
            out.append("<div class=\"plots\">" + "".join(f"<figure>{s}</figure>" for s in plots) + "</div>")
    lat = a.latency
    if lat is not None:
        out.append(f"<h3>latency on {_e(lat.device)}</h3>")
        out.append(table(*timing_table(lat)))
        cls = "" if lat.stable else ' class="fail"'
        out.append(f"<p{cls}>{_e(latency_headline(lat))}</p>")
        if lat.artifact and lat.source:
            plots = [svg_histograms([(n, t.histogram)], title=f"latency of {n} (share of runs, up to its p99)",
                                    x_label="ms per run", width=420)
                     for n, t in ((f"{a.id} artifact", lat.artifact), ("source", lat.source))
                     if t.histogram]
            if plots:
                out.append("<div class=\"plots\">" + "".join(f"<figure>{svg}</figure>" for svg in plots) + "</div>")
        if lat.sweep:
            out.append(table(SWEEP_COLUMNS, sweep_rows(lat)))
        out.append(_facts(latency_facts(lat)))
    return [x for x in out if x]


def _fusion_html(f: FusionReport) -> list[str]:
    from portq.tasks.reports import fusion

    out = ["<h2>fusion</h2>", _facts(fusion.fusion_facts(f)), table(fusion.MEMBER_COLUMNS, fusion.member_rows(f))]
    if f.greedy_steps:
        out += ["<p class=\"muted\">Greedy soup, in order of the members' scores:</p>",
                table(fusion.GREEDY_COLUMNS, fusion.greedy_rows(f))]
    if f.finetune is not None and f.finetune.curve:
        t = f.finetune
        out.append("<div class=\"plots\"><figure>" + svg_line(
            t.curve, title=f"fine-tune: mean {t.loss} loss per epoch", x_label="epoch", y_label="loss")
            + "</figure></div>")
    return out


#: the job's own files in its result folder, linked from its page when they are there
JOB_FILES = ("report.json", "report.md", "job.log", "reproduce_inputs.npz")


def _anchor(artifact: str) -> str:
    return "artifact-" + re.sub(r"[^A-Za-z0-9_.-]", "-", artifact)


def job_nav(r: JobReport, summary: str | None, present: Collection[str] | None) -> str:
    """The links at the top of a job's page: the batch's summary page, the job's files, each artifact's file."""
    links = []
    if summary:
        links.append(f'<a href="{_e(summary)}">batch {_e(r.batch)}: summary</a>')
    names = [n for n in JOB_FILES if n in present] if present is not None else list(JOB_FILES[:2])
    links += [_link(n) for n in names]
    links += [_link(a.path, f"{a.id} file") for a in r.artifacts
              if a.status is StepStatus.succeeded and _href(a.path) and a.path]
    return "<nav>" + " ".join(links) + "</nav>" if links else ""


def job_html(r: JobReport, summary: str | None = None, present: Collection[str] | None = None) -> str:
    """report.html for one job, as it sits in the job's result folder. It links `summary` (the batch's summary page,
    relative to that folder), the job's files in `present` (the names in the folder; without it, report.json and
    report.md) and each artifact's file and reproduce script, all relative, so they work wherever the folder is."""
    body = [f"<h1>portq job {_e(r.job_id)}: {_e(r.model)} → {_e(r.target.value)}</h1>", job_nav(r, summary, present),
            _facts(job_facts(r))]
    best_rows = {i for i, a in enumerate(r.artifacts) if a.best}
    if r.artifacts:
        body.append(table(ARTIFACT_COLUMNS, [artifact_row(a) for a in r.artifacts], best_rows))
    if r.fusion is not None:
        body += _fusion_html(r.fusion)
    for a in r.artifacts:
        body += _artifact_html(a)
    if r.environment:
        body.append(f"<h2>environment</h2><p>{_e(environment_line(r.environment))}</p>")
    if r.toolchain:
        body.append("<p class=\"muted\">toolchain: " + _e(toolchain_line(r)) + "</p>")
    return _page(f"portq {r.model}", [b for b in body if b])


def batch_html(b: BatchReport, base: str) -> str:
    """The batch summary page: model x format x parity x p50 x speedup, best picks highlighted, and a link to each
    job's report.html relative to `base`, the folder the page will be in (`relative_link`)."""
    rows = summary_rows(b)
    best_rows = {i for i, row in enumerate(rows) if row[SUMMARY_COLUMNS.index("best")].startswith("best")}
    body = [f"<h1>portq batch {_e(b.batch)}</h1>", f"<p>{_e(counts_line(b))}; store <code>{_e(b.store)}</code></p>",
            table(SUMMARY_COLUMNS, rows, best_rows)]
    speedups = [(f"{j.model}/{a.id}", a.latency.speedup) for j in b.jobs for a in j.artifacts
                if a.latency is not None]
    if speedups:
        body.append("<div class=\"plots\"><figure>" + svg_ratio_bars(
            [n for n, _ in speedups], [v for _, v in speedups], title="speedup over the source (p50 at the sample)",
            x_label="source p50 / artifact p50, log scale: right of 1x faster, left of it slower") + "</figure></div>")
    links = [f"<li><a href=\"{_e(link)}\">{_e(label)}</a></li>" for label, link in job_links(b, base, "html")]
    if links:
        body.append("<h2>job reports</h2><ul>" + "".join(links) + "</ul>")
    return _page(f"portq batch {b.batch}", body)


# ------------------------------------------------------------------------------------------ nightly pages


def trend_plots(labels: Sequence[str], found: Sequence[Trend]) -> str:
    """Per model x target x artifact: its p50 and its parity max abs error across the nights."""
    if not found or not labels:
        return ""
    out = ["<h2>across the nights</h2>",
           f"<p class=\"muted\">p50 at the sample's batch size and parity's max abs error, night by night "
           f"({_e(labels[0])} to {_e(labels[-1])}); a gap: the artifact did not convert that night.</p>"]
    for t in found:
        p50 = svg_lines(labels, [("p50", t.p50_ms)], title=f"{t.label}: p50", y_label="ms")
        err = svg_lines(labels, [("max abs err", t.max_abs_err)], title=f"{t.label}: parity max abs error",
                        y_label="error (log)", log=True)
        out.append(f"<h3>{_e(t.label)}</h3><div class=\"plots\"><figure>{p50}</figure><figure>{err}</figure></div>")
    return "".join(out)


def comparison_html(c: Comparison, labels: Sequence[str] = (), found: Sequence[Trend] = ()) -> str:
    """`portq compare --format html`: the verdicts, then each model's numbers across the series' nights."""
    rows = comparison_rows(c)
    bad = {i for i, r in enumerate(c.rows) if r.verdict.value == "regression"}
    cls = "fail" if c.regressed else "pass"
    body = [f"<h1>portq compare {_e(c.baseline)} → {_e(c.new)}</h1>",
            f"<p class=\"{cls}\">{_e(comparison_headline(c))}</p>",
            f"<p class=\"muted\">store <code>{_e(c.store)}</code>; rules: {_e(rules_line(c))}</p>",
            table(COMPARE_COLUMNS, rows, bad, row_class="regression")]
    if c.notes:
        body.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in c.notes) + "</ul>")
    body.append(trend_plots(labels, found))
    return _page(f"portq compare {c.baseline} {c.new}", [b for b in body if b])


def history_html(h: SeriesHistory, labels: Sequence[str] = (), found: Sequence[Trend] = ()) -> str:
    """`portq history --format html`: the series' nights, then each model's numbers across them."""
    body = [f"<h1>portq history {_e(h.series)}</h1>",
            f"<p class=\"muted\">{len(h.nights)} night(s); store <code>{_e(h.store)}</code></p>",
            table(HISTORY_COLUMNS, history_rows(h))]
    warnings = history_warnings(h)
    if warnings:
        body.append("<ul>" + "".join(f"<li class=\"muted\">warning: {_e(w)}</li>" for w in warnings) + "</ul>")
    body.append(trend_plots(labels, found))
    return _page(f"portq history {h.series}", [b for b in body if b])
