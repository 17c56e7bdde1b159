"""Reports people read: the best pick, the Markdown and the self-contained HTML."""

import re

from portq.tasks.contract import (
    ArtifactReport,
    BatchJob,
    BatchReport,
    Format,
    JobReport,
    JobStatus,
    LatencyReport,
    OutputParity,
    ParityReport,
    StepStatus,
)
from portq.tasks.html_report import batch_html, job_html
from portq.tasks.reporting import batch_markdown, job_markdown, mark_best


def art(fmt, p50, passed=True, status=StepStatus.succeeded):
    parity = ParityReport(passed=passed, atol=1e-4, rtol=1e-3, samples=1, seed=0, device="cpu", max_abs_err=0.0,
                          max_rel_err=0.0, outputs=[OutputParity(name="y<script>", shape=[1], dtype="float32",
                                                                 max_abs_err=0, max_rel_err=0, mean_abs_err=0,
                                                                 passed=passed)])
    latency = LatencyReport(device="cpu", warmup=1, runs=3, p50_ms=p50, p90_ms=p50, p99_ms=p50, mean_ms=p50,
                            source_p50_ms=2.0, source_p90_ms=2.0, source_p99_ms=2.0, source_mean_ms=2.0,
                            speedup=2.0 / p50)
    return ArtifactReport(format=fmt, status=status, parity=parity, latency=latency)


def test_best_is_the_fastest_that_passed():
    arts = [art(Format.onnx, 1.0, passed=False), art(Format.torchscript, 1.5), art(Format.pt2, 1.2)]
    assert mark_best(arts) is Format.pt2
    assert [a.best for a in arts] == [False, False, True]
    assert mark_best([art(Format.onnx, 1.0, passed=False)]) is None
    failed = art(Format.onnx, 0.5, status=StepStatus.failed)
    assert mark_best([failed, art(Format.pt2, 3.0)]) is Format.pt2
    tie = [art(Format.onnx, 1.0), art(Format.pt2, 1.0)]
    assert mark_best(tie) is Format.onnx  # ties go to the earlier format


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
        BatchJob(job_id="j1", model="m", source="m.pt", target="cpu", status=JobStatus.succeeded,
                 report="/s/results/k/report.json", artifacts=job.artifacts, best=job.best)])
    page = batch_html(batch)
    assert 'href="/s/results/k/report.html"' in page and page.count('class="best"') == 1
    assert "| m | cpu | succeeded | onnx | succeeded | pass |" in batch_markdown(batch)
