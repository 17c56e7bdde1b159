"""`portq compare`, `portq history` and `portq submit --manifest` through the real entry point: exit codes and
messages, on a store whose nights are written directly (the queue scenario is in tests/worker/test_nightly.py)."""

import json
import xml.etree.ElementTree as ET

import jsonschema
import pytest
from portq.tasks.core.contract import JobRecord, JobReport, JobStatus, SeriesEntry, Target
from portq.tasks.core.schema_files import SCHEMA_DIR
from portq.tasks.state import lifecycle, series
from portq.tasks.state.store import Store

from tests.conftest import run_cli
from tests.tasks.reports.test_compare import artifact


def night(store: Store, batch: str, models: dict[str, float], *, series_name: str | None = "vision",
          at: str = "2026-03-14T02:00:00") -> None:
    """A finished batch: one succeeded job per model whose onnx artifact has that p50 (ms)."""
    for model, ms in models.items():
        key = f"results/{batch}-{model}"
        rec = JobRecord(job_id=f"j-{batch}-{model}", batch=batch, model=model, source=f"/models/{model}.pt",
                        target=Target.cpu, status=JobStatus.queued)
        report = JobReport(job_id=rec.job_id, batch=batch, model=model, source=rec.source, target=Target.cpu,
                           status=JobStatus.succeeded, result=store.url(key), artifacts=[artifact(ms)], best="onnx")
        store.write_json(f"{key}/report.json", report.model_dump(mode="json"))
        lifecycle.submitted(store, rec)
        if ms == 1.0:
            lifecycle.served_from_cache(store, rec, key)
        else:
            lifecycle.started(store, rec, "w")
            lifecycle.finished(store, rec, report, key)
    if series_name:
        series.record_night(store, SeriesEntry(series=series_name, batch=batch, submitted_at=at,
                                               manifest="/m/vision.yaml", jobs=len(models)))


@pytest.fixture
def env(tmp_path):
    store = Store(str(tmp_path / "store"))
    night(store, "n1", {"a": 1.0, "b": 1.0}, at="2026-03-13T02:00:00")
    night(store, "n2", {"a": 1.0, "b": 9.0}, at="2026-03-14T02:00:00")
    night(store, "other", {"z": 1.0}, series_name=None)
    return {"PORTQ_STORE": store.root}


def test_compare_exits_1_naming_the_regression(env, tmp_path):
    res = run_cli("compare", "n1", "n2", env=env)
    assert res.returncode == 1, res.stderr
    assert "regression b/cpu/onnx: parity passes" in res.stderr and "a/cpu" not in res.stderr
    assert "1 regression(s) between n1 and n2" in res.stderr
    doc = json.loads(run_cli("compare", "--series", "vision", "--format", "json", env=env).stdout)
    jsonschema.validate(doc, json.loads((SCHEMA_DIR / "comparison.v1.json").read_text()))
    assert (doc["baseline"], doc["new"], doc["series"], doc["regressed"]) == ("n1", "n2", "vision", True)
    assert [(r["model"], r["verdict"]) for r in doc["rows"]] == [("a", "unchanged"), ("b", "regression")]
    page_path = tmp_path / "c.html"
    assert run_cli("compare", "n1", "n2", "--format", "html", "-o", str(page_path), env=env).returncode == 1
    page = page_path.read_text()
    assert "b (cpu) onnx: p50" in page and "b (cpu) onnx: parity max abs error" in page
    for svg in page.split("<svg")[1:]:
        ET.fromstring("<svg" + svg.split("</svg>")[0] + "</svg>")
    assert "portq compare n1 -> n2" in run_cli("compare", "n1", "n2", "--format", "md", env=env).stdout


def test_compare_exits_0_when_nothing_regressed(env):
    res = run_cli("compare", "n2", "n1", env=env)  # b got 9x faster
    assert res.returncode == 0 and "no regression between n2 and n1" in res.stderr
    assert "improvement" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["n1", "nope"], "no batch 'nope' in store"),
    (["n1", "n1"], "batch n1 is compared with itself"),
    (["n1", "other"], "batches n1 and other have no model in common (n1: a, b; other: z)"),
    (["n1"], "give two batches (BASELINE NEW), or --series S"),
    ([], "give two batches (BASELINE NEW), or --series S"),
    (["n1", "n2", "--series", "vision"], "give either two batches or --series, not both"),
    (["--series", "nope"], "no series 'nope' in store"),
    (["n1", "n2", "--error-factor", "0.5"], "--error-factor: Input should be greater than 1"),
])
def test_bad_compare_arguments_exit_2(env, args, message):
    res = run_cli("compare", *args, env=env)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_a_series_needs_two_nights_and_stores_must_match(env, tmp_path):
    store = Store(str(tmp_path / "single"))
    night(store, "only", {"a": 1.0}, series_name="lonely")
    res = run_cli("compare", "--series", "lonely", env={"PORTQ_STORE": store.root})
    assert res.returncode == 2 and "series lonely has 1 night(s); compare needs two" in res.stderr
    saved = tmp_path / "only.json"
    saved.write_text(run_cli("report", "only", "--json", env={"PORTQ_STORE": store.root}).stdout)
    res = run_cli("compare", str(saved), "n1", env=env)
    assert res.returncode == 2
    assert f"the batches come from different stores: only from {store.root}, n1 from {env['PORTQ_STORE']}" in \
        res.stderr


def test_history_lists_the_nights(env, tmp_path):
    res = run_cli("history", "vision", env=env)
    assert res.returncode == 0 and "n1" in res.stdout and "n2" in res.stdout
    doc = json.loads(run_cli("history", "vision", "--format", "json", env=env).stdout)
    jsonschema.validate(doc, json.loads((SCHEMA_DIR / "series-history.v1.json").read_text()))
    assert [(n["batch"], n["counts"]["succeeded"], n["cache_hits"]) for n in doc["nights"]] == [
        ("n1", 2, 2), ("n2", 2, 1)]
    assert [n["batch"] for n in json.loads(run_cli("history", "vision", "--last", "1", "--format", "json",
                                                   env=env).stdout)["nights"]] == ["n2"]
    md = run_cli("history", "vision", "--format", "md", env=env).stdout
    assert md.startswith("# portq history vision") and "| 2 | n2 |" in md
    assert run_cli("history", "vision", "--format", "html", "-o", str(tmp_path / "h.html"), env=env).returncode == 0
    assert "a (cpu) onnx: p50" in (tmp_path / "h.html").read_text()
    res = run_cli("history", "nope", env=env)
    assert res.returncode == 2 and "no series 'nope'" in res.stderr and "known series: vision" in res.stderr


def test_submit_manifest_problems_exit_2(tmp_path):
    env = {"PORTQ_STORE": str(tmp_path / "store")}
    manifest = tmp_path / "nightly.yaml"
    manifest.write_text("groups:\n  - models: ['*.pt']\n    targetz: [cpu]\n")
    res = run_cli("submit", "--manifest", str(manifest), env=env)
    assert res.returncode == 2
    assert f"[error] [step manifest, file {manifest}] line 3, groups[0].targetz: unknown key 'targetz'" in res.stderr
    res = run_cli("submit", "--manifest", str(manifest), "--format", "pt2", "m.pt", env=env)
    assert res.returncode == 2 and "MODELS, --format cannot be combined with --manifest" in res.stderr
    res = run_cli("submit", env=env)
    assert res.returncode == 2 and "nothing to submit: give model files, or --manifest FILE" in res.stderr
