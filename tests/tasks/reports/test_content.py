"""Reports people read: the best pick, the Markdown and the self-contained HTML."""

import html
import re

from portq.tasks.core.contract import (
    AppliedTolerance,
    ArtifactReport,
    BatchJob,
    BatchReport,
    Failure,
    Format,
    JobReport,
    JobStatus,
    LatencyReport,
    Memory,
    OutputParity,
    ParityReport,
    RouteAttemptReport,
    StepStatus,
    Timing,
    ToleranceMode,
    artifact_id,
)
from portq.tasks.reports.content import batch_markdown, job_markdown, mark_best
from portq.tasks.reports.html import batch_html, job_html


def art(fmt, p50, passed=True, status=StepStatus.succeeded, variant="default"):
    parity = ParityReport(passed=passed, atol=1e-4, rtol=1e-3, samples=1, seed=0, device="cpu", max_abs_err=0.0,
                          max_rel_err=0.0, outputs=[OutputParity(name="y<script>", shape=[1], dtype="float32",
                                                                 max_abs_err=0, max_rel_err=0, mean_abs_err=0,
                                                                 passed=passed)])
    latency = LatencyReport(device="cpu", warmup=1, runs=3, p50_ms=p50, p90_ms=p50, p99_ms=p50, mean_ms=p50,
                            source_p50_ms=2.0, source_p90_ms=2.0, source_p99_ms=2.0, source_mean_ms=2.0,
                            speedup=2.0 / p50)
    return ArtifactReport(id=artifact_id(fmt, variant), format=fmt, variant=variant, status=status, parity=parity,
                          latency=latency)


def test_best_is_the_fastest_that_passed():
    arts = [art(Format.onnx, 1.0, passed=False), art(Format.torchscript, 1.5), art(Format.pt2, 1.2)]
    assert mark_best(arts) == "pt2"
    assert [a.best for a in arts] == [False, False, True]
    assert mark_best([art(Format.onnx, 1.0, passed=False)]) is None
    failed = art(Format.onnx, 0.5, status=StepStatus.failed)
    assert mark_best([failed, art(Format.pt2, 1.8)]) == "pt2"
    tie = [art(Format.onnx, 1.0), art(Format.pt2, 1.0)]
    assert mark_best(tie) == "onnx"  # ties go to the earlier artifact
    variants = [art(Format.onnx, 1.0), art(Format.onnx, 0.8, variant="opset17")]
    assert mark_best(variants) == "onnx.opset17"  # a variant is an artifact of its own


def test_a_tie_is_broken_by_conclusive_then_lossless_then_a_clearly_smaller_file_then_the_estimate():
    from portq.tasks.core.contract import OptimizationReport

    def tied(variant, p50, size, lossy=False):
        a = art(Format.onnx, p50, variant=variant)
        a.latency.speedup_interval = [a.latency.speedup * 0.9, a.latency.speedup * 1.1]
        a.size_bytes = size
        if lossy:
            a.optimization = OptimizationReport(transform="t", base="onnx", lossless=False)
        return a

    # the files differ by 2%: the higher estimate wins (a fused graph a little larger is still the faster one)
    arts = [tied("ort-all", 1.0, 1_000_000), tied("ort-transformer", 0.92, 1_020_000)]
    assert mark_best(arts) == "onnx.ort-transformer"
    assert "tied with onnx.ort-all" in arts[1].best_note and "higher estimate" in arts[1].best_note
    # half the size: the smaller file wins the tie
    arts = [tied("ort-all", 1.0, 500_000), tied("ort-transformer", 0.92, 1_000_000)]
    assert mark_best(arts) == "onnx.ort-all"
    # lossless before lossy, whatever the size and estimate
    arts = [tied("ort-all", 1.0, 1_000_000), tied("int8-dynamic", 0.92, 250_000, lossy=True)]
    assert mark_best(arts) == "onnx.ort-all"
    # a conclusive speedup before an inconclusive one with a higher estimate
    arts = [tied("ort-all", 1.0, 1_000_000), tied("ort-transformer", 0.92, 1_000_000)]
    arts[1].latency.inconclusive = True
    assert mark_best(arts) == "onnx.ort-all"
    # ... and before lossless: a wide lossless interval (1.08-4.22) must not outrank a measured int8 1.74x
    arts = [tied("ort-all", 1.6, 1_000_000), tied("transformer-int8-dynamic", 1.15, 300_000, lossy=True)]
    arts[0].latency.speedup_interval, arts[0].latency.inconclusive = [1.08, 4.22], True
    assert mark_best(arts) == "onnx.transformer-int8-dynamic"


def test_the_anchor_of_a_tie_is_the_most_surely_fast_not_the_widest():
    """A wide interval with a high estimate (2.0x, 0.95-2.33) overlaps everything; anchored on it, a precise 1.36x
    (1.25-1.45) would tie with a 1.05x (1.00-1.10) and lose to the smaller file. Anchored on the highest lower
    bound, the 1.05x is shown slower and out of the tie."""
    def timed(variant, speedup, low, high, size):
        a = art(Format.onnx, 2.0 / speedup, variant=variant)
        a.latency.speedup_interval, a.size_bytes = [low, high], size
        return a

    arts = [timed("default", 2.0, 0.95, 2.33, 1_000_000), timed("ort-transformer", 1.36, 1.25, 1.45, 1_000_000),
            timed("frozen", 1.05, 1.00, 1.10, 600_000)]
    assert mark_best(arts) == "onnx"  # tied with the precise 1.36x; same size; the higher estimate
    assert "onnx.ort-transformer" in arts[0].best_note and "onnx.frozen" not in arts[0].best_note


def _job():
    arts = [art(Format.onnx, 1.0), art(Format.pt2, 1.6)]
    best = mark_best(arts)
    return JobReport(job_id="j1", batch="b", model="m&m", source="m.pt", target="cpu", status=JobStatus.succeeded,
                     artifacts=arts, best=best)


def test_markdown_marks_the_best_pick():
    text = job_markdown(_job())
    assert "best pick: **onnx**" in text
    assert re.search(r"\| onnx \| succeeded \| pass \| 0 \| 1\.000 \| 2\.000 \| 2\.00x \| best \|", text)


def test_html_is_self_contained_and_escaped():
    page = job_html(_job())
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page.replace("&lt;script", "")
    assert not re.search(r"(src|href)=\"https?://", page)  # nothing fetched
    assert "m&amp;m" in page and "y&lt;script&gt;" in page
    job = _job()
    batch = BatchReport(batch="b", store="/s", counts={"succeeded": 1, "total": 1}, jobs=[
        BatchJob(job_id="j1", model="m", source="m.pt", target="cpu", status=JobStatus.succeeded, result="/s/results/k",
                 report="/s/results/k/report.json", artifacts=job.artifacts, best=job.best)])
    page = batch_html(batch, "/s/batches/b")
    assert page.count('class="best"') == 1
    assert "| m | m.pt | cpu | succeeded | onnx | succeeded | pass |" in batch_markdown(batch)


def test_the_batch_page_links_job_reports_relatively_so_a_served_store_works():
    """Written into the store beside the batch's records, the page links ../../results/<key>/report.html, whether
    the store is a directory or an object store (never an absolute local path)."""
    for store in ("/srv/portq", "s3://bucket/portq"):
        job = BatchJob(job_id="j1", model="m", source="m.pt", target="cpu", status=JobStatus.succeeded,
                       result=f"{store}/results/k", report=f"{store}/results/k/report.json")
        batch = BatchReport(batch="b", store=store, counts={"succeeded": 1, "total": 1}, jobs=[job])
        page = batch_html(batch, f"{store}/batches/b")
        assert 'href="../../results/k/report.html"' in page and store not in page.split("<ul>")[-1]
        assert "[m (m.pt, cpu)](../../results/k/report.md)" in batch_markdown(batch, f"{store}/batches/b")


def _timing(p50, first):
    return Timing(runs=30, windows=3, window_runs=10, stable=True, spread=0.01, mean_ms=p50, std_ms=0.1, min_ms=p50,
                  p50_ms=p50, p90_ms=p50, p95_ms=p50, p99_ms=p50, max_ms=p50, throughput_per_s=1000 / p50,
                  first_run_ms=first)


def _full_job():
    """A failed job with every field the reports show: routes tried, reproduce script, memory on both sides..."""
    a = art(Format.onnx, 1.0, passed=False)
    a.route, a.opset, a.size_bytes = "dynamo_decomposed", 17, 2_500_000
    a.path, a.reproduce = "/s/failed/j1/model.onnx", "/s/failed/j1/reproduce_onnx.py"
    a.attempts = [RouteAttemptReport(route="dynamo", error="exporter: aten::foo not supported", seconds=1.25),
                  RouteAttemptReport(route="dynamo_decomposed", seconds=2.5)]
    o = a.parity.outputs[0]
    o.tolerance = AppliedTolerance(mode=ToleranceMode.quantile, atol=0.1, rtol=0.2, quantile=0.9,
                                   origin="fp32 default; mode from override 'y*'")
    o.statistic_abs, o.statistic_rel, o.failing_elements, o.elements = 0.5, 0.25, 3, 40
    lat = a.latency
    lat.artifact, lat.source = _timing(1.0, 17.5), _timing(2.0, 42.25)
    lat.memory = Memory(rss_before_mb=100, rss_peak_mb=180, rss_delta_mb=80, method="VmHWM")
    lat.source_memory = Memory(rss_before_mb=90, rss_peak_mb=333, rss_delta_mb=243, method="sampled")
    lat.providers = ["CPUExecutionProvider"]
    return JobReport(job_id="j1", batch="b", model="m", source="m.pt", target="cpu", status=JobStatus.failed,
                     artifacts=[a], trust_pickle=True, error="[step parity:onnx] parity failed",
                     failure=Failure(kind="input", step="inputs", file="m.pt", cause="the model rejected the inputs",
                                     hint="check the sidecar .npz"))


def test_markdown_and_html_show_the_same_fields():
    """Both renderers show every field: the same facts, columns and words (built once, in reporting.py)."""
    r = _full_job()
    text, page = job_markdown(r), job_html(r)
    expected = [
        "route: dynamo_decomposed", "opset: 17", "size: 2.5 MB (2500000 bytes)",  # artifact
        "reproduce: /s/failed/j1/reproduce_onnx.py", "file: /s/failed/j1/model.onnx",
        "exporter: aten::foo not supported", "1.25", "2.50",  # attempts: route, error, seconds
        "trust pickle: yes", "failure (input error): [step inputs, file m.pt] the model rejected the inputs",
        "hint: check the sidecar .npz",  # job
        "p90 atol 0.1 / rtol 0.2", "fp32 default; mode from override 'y*'", "0.500 / 0.250", "3/40",  # parity
        "first run ms", "17.500", "42.250",  # latency: first run of both sides
        "memory, artifact: peak RSS 180 MB (+80 MB over 100 MB; VmHWM)",
        "memory, source (PyTorch): peak RSS 333 MB (+243 MB over 90 MB; sampled)",
        "execution providers: CPUExecutionProvider",
    ]
    for s in expected:
        assert s in text, s
        assert html.escape(s, quote=True) in page, s
    # the same tables in both: every column header of the Markdown appears in the HTML
    for header in re.findall(r"^\| (.*) \|$\n^\|---", text, re.M):
        for col in filter(None, header.split(" | ")):
            assert f"<th>{html.escape(col.strip())}</th>" in page, col
    assert "providers " not in text.replace("execution providers", "")  # one wording


def test_the_fusion_section_in_markdown_and_html():
    from portq.tasks.core.contract import (
        CombineCheck,
        FinetuneReport,
        FusionMemberReport,
        FusionReport,
        GreedyStep,
    )

    fusion = FusionReport(
        method="greedy-soup", space="weight", params={"metric": "accuracy", "strict": False}, metric="accuracy",
        members=[FusionMemberReport(name="a<b>.pt", file="runs/a<b>.pt", score=0.9, kept=True, max_abs_diff=0.01,
                                    mean_abs_diff=0.001, top1_agreement=0.98),
                 FusionMemberReport(name="c.pt", file="c.pt", score=0.1, kept=False, max_abs_diff=2.0)],
        greedy_steps=[GreedyStep(candidate="a<b>.pt", score=0.9, accepted=True),
                      GreedyStep(candidate="c.pt", score=0.4, accepted=False)],
        soup_score=0.9, fused_score=0.95, bn_stats="averaged", notes=["BatchNorm running statistics averaged"],
        finetune=FinetuneReport(epochs=3, lr=0.01, seed=0, device="cpu", loss="cross-entropy", examples=64,
                                curve=[1.2, 0.8, 0.5]))
    r = JobReport(job_id="j1", batch="b", model="soup", source="fuse(greedy-soup: a<b>.pt, c.pt)", target="cpu",
                  status=JobStatus.succeeded, kind="fuse", fusion=fusion)
    md = job_markdown(r)
    assert "## fusion" in md and "- method: **greedy-soup, weight space (one model with merged weights)**" in md
    assert "- greedy soup: kept 1 of 2 (a<b>.pt); soup score 0.9000" in md
    assert "- fused model's score: **0.9500 (after the fine-tune)**" in md
    assert "- BatchNorm statistics: averaged like the other weights (no calibration data)" in md
    assert "| a<b>.pt | runs/a<b>.pt | member | 0.9000 | yes | 0.010 | 0.001 | 98.0% |" in md
    assert "| 2 | c.pt | 0.4000 | no |" in md and "| 3 | 0.5000 |" in md
    assert "cross-entropy loss: 1.2000 -> 0.5000" in md
    page = job_html(r)
    assert "<h2>fusion</h2>" in page and "a&lt;b&gt;.pt" in page and "a<b>.pt" not in page
    assert page.count("<polyline") == 1 and "fine-tune: mean cross-entropy loss per epoch" in page
    output = r.model_copy(update={"fusion": FusionReport(method="vote", space="output", combine_check=CombineCheck(
        passed=False, max_abs_err=1.0, samples=3, how="a majority vote in numpy"))})
    assert "- fused vs its members run separately: DIFFERENT within the job's tolerance on 3 samples" in \
        job_markdown(output)
    assert 'class="fail">fused vs its members run separately' in job_html(output)


def _slower_job():
    """A job whose every artifact passed parity and none beats the source (2.0 ms): onnx at 0.80x, pt2 at 0.95x with
    an interval reaching past 1x (so its speedup point, not only its interval, decides)."""
    onnx, pt2 = art(Format.onnx, 2.5), art(Format.pt2, 2.1)
    pt2.latency.speedup_interval = [0.9, 1.04]
    arts = [onnx, pt2, art(Format.torchscript, 1.0, status=StepStatus.skipped)]
    arts[2].pruned, arts[2].error, arts[2].requested_by = True, "pruned: its family could not win", "optimize"
    arts[2].latency = arts[2].parity = None
    return arts


def test_nothing_faster_than_the_source_is_no_pick_and_every_page_says_so():
    """No artifact that beats the source: no `best` (job, batch, artifact), `best_note` says so, and report.json, the
    CLI's table, summary.md, summary.html and the job's report.md agree."""
    import io
    import json

    from portq.client.render import summary_table
    from portq.tasks.reports.content import NO_FASTER, no_pick_note
    from rich.console import Console

    arts = _slower_job()
    assert mark_best(arts) is None and not any(a.best for a in arts)
    note = no_pick_note(arts)
    assert note.startswith(f"{NO_FASTER}: the fastest that passed parity, pt2, runs at 0.95x (0.90-1.04)")
    job = JobReport(job_id="j1", batch="b", model="m", source="m.pt", target="cpu", status=JobStatus.succeeded,
                    artifacts=arts, best=None, best_note=note)
    md = job_markdown(job)
    assert f"best pick: **none: {NO_FASTER}" in md and "| best |" not in md.replace("| best | note |", "")
    assert "pruned 1, their family could not win (torchscript)" in md
    batch = BatchReport(batch="b", store="/s", counts={"succeeded": 1, "total": 1}, jobs=[
        BatchJob(job_id="j1", model="m", source="m.pt", target="cpu", status=JobStatus.succeeded, artifacts=arts,
                 best=job.best, best_note=job.best_note)])
    data = json.loads(batch.model_dump_json())
    assert data["jobs"][0]["best"] is None and data["jobs"][0]["best_note"] == note
    assert not any(a["best"] for a in data["jobs"][0]["artifacts"])
    summary = batch_markdown(batch)
    assert f"| (pick) | - | - | - | - | - | - | none | {NO_FASTER}" in summary
    page = batch_html(batch, "/s/batches/b")
    assert 'class="best"' not in page and NO_FASTER in page
    buffer = io.StringIO()
    Console(file=buffer, width=400, color_system=None).print(summary_table(batch))
    rows = [line for line in buffer.getvalue().splitlines() if "│" in line]  # the body (the header has ┃)
    assert not any("│ best" in line for line in rows)
    pick = next(line for line in rows if "(pick)" in line)
    assert "│ none │" in pick and NO_FASTER in pick


def test_a_pick_must_beat_the_source():
    """Faster than the source is the bar: above 1x by its speedup and by its interval's upper bound."""
    barely = art(Format.onnx, 1.98)  # 1.01x
    assert mark_best([barely]) == "onnx"
    barely.latency.speedup_interval = [0.9, 1.0]  # all of its interval at or below 1x
    assert mark_best([barely]) is None
    even = art(Format.onnx, 2.0)  # exactly the source's speed
    assert mark_best([even]) is None and no_pick_note_of([even]).startswith("no faster artifact than the source")


def no_pick_note_of(arts):
    from portq.tasks.reports.content import no_pick_note

    return no_pick_note(arts)
