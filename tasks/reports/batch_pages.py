"""A batch's summary pages in the store, beside its records: `batches/<batch>/summary.html` and `summary.md`.

Written when a client sees the batch finish (`portq submit`, `portq wait`, `portq.wait`). Their links to each
job's report are relative (`../../results/<key>/report.html`), and so is each job page's link back here
(`summary_link`), so the pages keep working when the store is served over HTTP, copied, or published to an
object store.
"""

from __future__ import annotations

from portq.tasks.core.contract import BatchReport
from portq.tasks.reports.content import batch_markdown, relative_link
from portq.tasks.reports.html import batch_html
from portq.tasks.state import keys
from portq.tasks.state.store import Store

PAGES = {"html": "summary.html", "md": "summary.md"}


def page_key(batch: str, fmt: str) -> str:
    return keys.page_key(batch, PAGES[fmt])


def page_urls(store: Store, batch: str) -> dict[str, str]:
    """Where the batch's summary pages are (a path for a directory store, a URL otherwise), by format."""
    return {fmt: store.url(page_key(batch, fmt)) for fmt in PAGES}


def summary_link(store: Store, batch: str, folder: str) -> str:
    """The batch's summary page as a link from `folder` (a job's result folder, as a path or URL in the store):
    relative, like the summary's links back to the jobs."""
    return relative_link(page_urls(store, batch)["html"], folder)


def publish_summary(store: Store, report: BatchReport) -> dict[str, str]:
    """Write (or rewrite) the batch's summary pages into the store; where they are, by format."""
    base = store.url(keys.batch_key(report.batch))
    store.write_bytes(page_key(report.batch, "html"), batch_html(report, base).encode())
    store.write_bytes(page_key(report.batch, "md"), batch_markdown(report, base).encode())
    return page_urls(store, report.batch)
