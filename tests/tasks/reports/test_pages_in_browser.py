"""The HTML pages in a real browser: headless Chromium (Debian's `chromium`), driven by Playwright.

At 1280 and 800 px wide no page is wider than the window (a wide table scrolls inside its own box), no chart
label is cut off, and the pages link each other and their files with links that resolve in the store.

Without Chromium or Playwright the browser tests skip, saying which is missing; under CI (the CI variable set)
they fail instead. PORTQ_PAGE_SHOTS=<folder> keeps a screenshot of each page at each width there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from portq.tasks.core.contract import (
    FinetuneReport,
    FusionMemberReport,
    FusionReport,
    GreedyStep,
    JobReport,
    JobStatus,
)
from portq.tasks.reports.html import job_html, ratio_ticks

from tests.conftest import run_cli
from tests.tasks.reports.test_content import _full_job

WIDTHS = (1280, 800)
CHROMIUM = os.environ.get("PORTQ_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FAST = ["--runs", "4", "--warmup", "1"]

# every element that reaches past the window's right edge, outside a box that scrolls on its own
OVERFLOWING = """() => {
  const w = window.innerWidth, out = [];
  for (const el of document.body.querySelectorAll('*')) {
    if (el.closest('.scroll')) continue;
    const r = el.getBoundingClientRect();
    if (r.right > w + 0.5) out.push(`${el.tagName.toLowerCase()} ${(el.textContent || '').slice(0, 40)}: ${r.right}`);
  }
  return out.slice(0, 8);
}"""

# every chart label that does not lie wholly inside its chart
CLIPPED_LABELS = """() => {
  const out = [];
  for (const svg of document.querySelectorAll('svg')) {
    const box = svg.getBoundingClientRect();
    for (const t of svg.querySelectorAll('text')) {
      const r = t.getBoundingClientRect();
      if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
        out.push(`${svg.getAttribute('aria-label')}: "${t.textContent}"`);
    }
  }
  return out;
}"""


def _need_browser() -> None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "Playwright for Python is not installed (pip install -e '.[test]')"
    else:
        missing = "" if CHROMIUM else "no Chromium on PATH (Debian: apt-get install chromium)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}: CI must run the browser tests")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def store(example_models, tmp_path_factory) -> Path:
    """A real batch in the embedded default: one model in two formats, its pages in the store."""
    store = tmp_path_factory.mktemp("pages") / "store"
    res = run_cli("submit", str(example_models["mlp"]), "--format", "onnx", "--format", "torchscript",
                  "--batch", "pages", *FAST, env={"PORTQ_STORE": str(store)})
    assert res.returncode == 0, res.stderr
    return store


@pytest.fixture(scope="module")
def wide_pages(tmp_path_factory) -> dict[str, Path]:
    """Pages built from reports alone: a failed job with every field, and a fused model's job."""
    folder = tmp_path_factory.mktemp("wide")
    fusion = FusionReport(
        method="greedy-soup", space="weight", params={"metric": "accuracy", "strict": False}, metric="accuracy",
        members=[FusionMemberReport(name=f"run-{i}/checkpoint-final-epoch-{i}.pt", file=f"runs/run-{i}/ckpt.pt",
                                    score=0.9 - i / 100, kept=i % 2 == 0, max_abs_diff=0.01, mean_abs_diff=0.001,
                                    top1_agreement=0.98) for i in range(4)],
        greedy_steps=[GreedyStep(candidate=f"run-{i}/checkpoint-final-epoch-{i}.pt", score=0.9, accepted=i % 2 == 0)
                      for i in range(4)],
        soup_score=0.9, fused_score=0.95, bn_stats="averaged", notes=["BatchNorm running statistics averaged"],
        finetune=FinetuneReport(epochs=3, lr=0.01, seed=0, device="cpu", loss="cross-entropy", examples=64,
                                curve=[1.2, 0.8, 0.5]))
    fused = JobReport(job_id="j2", batch="b", model="soup", source="fuse(greedy-soup: 4 members)", target="cpu",
                      status=JobStatus.succeeded, kind="fuse", fusion=fusion)
    pages = {"full job": folder / "full.html", "fusion job": folder / "fusion.html"}
    pages["full job"].write_text(job_html(_full_job()))
    pages["fusion job"].write_text(job_html(fused))
    return pages


def _check(browser, page_file: Path, shots: str | None) -> list:
    """Open the page at each width; assert it fits the window and its charts hold their labels. Its links."""
    page = browser.new_page()
    try:
        for width in WIDTHS:
            page.set_viewport_size({"width": width, "height": 900})
            page.goto(page_file.as_uri())
            scroll = page.evaluate("document.documentElement.scrollWidth")
            inner = page.evaluate("window.innerWidth")
            assert scroll <= inner, (f"{page_file} is {scroll} px wide in a {inner} px window: "
                                     f"{page.evaluate(OVERFLOWING)}")
            assert page.evaluate(CLIPPED_LABELS) == [], f"{page_file} at {width} px"
            if shots:
                name = f"{page_file.parent.name}-{page_file.stem}-{width}.png"
                page.screenshot(path=str(Path(shots, name)), full_page=True)
        return page.eval_on_selector_all("a[href]", "els => els.map(a => [a.getAttribute('href'), a.textContent])")
    finally:
        page.close()


def _target(page_file: Path, href: str) -> Path:
    assert not urlsplit(href).scheme and not href.startswith("/"), f"{href} is not relative"
    return (page_file.parent / unquote(urlsplit(href).path)).resolve()


def test_the_batch_pages_fit_the_window_and_link_each_other_and_their_files(browser, store, tmp_path):
    shots = os.environ.get("PORTQ_PAGE_SHOTS")
    summary = store / "batches" / "pages" / "summary.html"
    summary_links = _check(browser, summary, shots)
    jobs = [_target(summary, href) for href, _ in summary_links]
    assert len(jobs) == 1 and all(j.name == "report.html" and j.is_file() for j in jobs)
    for job in jobs:
        links = [(href, text) for href, text in _check(browser, job, shots) if not href.startswith("#")]
        targets = {_target(job, href) for href, _ in links}
        missing = [href for href, _ in links if not _target(job, href).exists()]
        assert not missing, f"{job} links files that are not there: {missing}"
        assert summary.resolve() in targets, f"{job} does not link the batch's summary: {links}"
        for name in ("report.json", "report.md"):
            assert job.parent / name in targets, f"{job} does not link its {name}"
        assert (job.parent / "job.log" in targets) == (job.parent / "job.log").exists()
        artifacts = [p for p in job.parent.glob("*/*") if p.suffix in (".onnx", ".pt")]
        assert artifacts and all(p.resolve() in targets for p in artifacts), (artifacts, links)


def test_wide_reports_fit_the_window(browser, wide_pages):
    for page_file in wide_pages.values():
        _check(browser, page_file, os.environ.get("PORTQ_PAGE_SHOTS"))


def test_ratio_ticks_are_1_2_5_on_a_log_axis():
    assert ratio_ticks(0.5, 2.0) == [0.5, 1.0, 2.0]
    assert ratio_ticks(0.3, 12) == [0.5, 1.0, 2.0, 5.0, 10.0]
    assert ratio_ticks(0.004, 2e4) == [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]


def test_a_job_page_links_the_summary_relatively_on_every_kind_of_store():
    """The result folder is results/<key> on a directory store and results/<key>/d-<id> on an object store: the
    link back to batches/<batch>/summary.html holds from either, and names no local path or bucket."""
    from portq.tasks.reports.batch_pages import summary_link
    from portq.tasks.state.store import Store

    for root, up in (("/srv/portq", "../.."), ("s3://bucket/portq", "../../..")):
        store = Store(root)
        folder = store.url(store.publication("results/k").folder)
        assert summary_link(store, "b", folder) == f"{up}/batches/b/summary.html"
    page = job_html(_full_job(), summary="../../batches/b/summary.html", present={"report.json", "job.log"})
    assert 'href="../../batches/b/summary.html"' in page and 'href="job.log"' in page
    assert 'href="report.md"' not in page  # only the files that are there
