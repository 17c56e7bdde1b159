"""`portq report` in every format, through the real entry point (embedded mode, no broker)."""

import json
import xml.etree.ElementTree as ET

import jsonschema
import pytest
from portq.tasks.core.schema_files import SCHEMA_DIR

from tests.conftest import run_cli

FAST = ["--runs", "4", "--warmup", "1"]


@pytest.fixture(scope="module")
def batch(example_models, tmp_path_factory):
    store = tmp_path_factory.mktemp("inspect") / "store"
    env = {"PORTQ_STORE": str(store)}
    res = run_cli("submit", str(example_models["mlp"]), "--format", "onnx", "--format", "torchscript",
                  "--dynamic", "batch", "--batch-sizes", "1,2", "--output-tol", "output:atol=1e-3,mode=max",
                  "--batch", "rep", *FAST, env=env)
    assert res.returncode == 0, res.stderr
    return env


def test_json_carries_best_and_the_new_evidence(batch):
    doc = json.loads(run_cli("report", "rep", "--json", env=batch).stdout)
    jsonschema.validate(doc, json.loads((SCHEMA_DIR / "batch-report.v3.json").read_text()))
    assert doc == json.loads(run_cli("report", "rep", "--format", "json", env=batch).stdout)
    (job,) = doc["jobs"]
    arts = {a["id"]: a for a in job["artifacts"]}
    fastest = min(arts.values(), key=lambda a: a["latency"]["p50_ms"])
    assert job["best"] == fastest["id"] and fastest["best"] is True
    assert sum(a["best"] for a in arts.values()) == 1
    onnx = arts["onnx"]
    (out,) = onnx["parity"]["outputs"]
    assert out["tolerance"]["mode"] == "max" and out["tolerance"]["atol"] == 1e-3
    assert "override 'output'" in out["tolerance"]["origin"]
    assert out["top1_agreement"] == 1.0 and out["cosine_similarity"] > 0.999999
    lat = onnx["latency"]
    assert [p["batch_size"] for p in lat["sweep"]] == [1, 2]
    assert lat["artifact"]["runs"] >= 4 and lat["source"]["p50_ms"] == lat["source_p50_ms"]
    assert lat["providers"] == ["CPUExecutionProvider"] and lat["memory"]["rss_peak_mb"] > 0
    # the sweep at the sample's own batch size is the headline measurement
    assert onnx["parity"]["sample_shapes"][0][0] == [4, 64]


def test_table_markdown_and_html(batch, tmp_path):
    table = run_cli("report", "rep", env=batch)
    assert table.returncode == 0 and "best" in table.stdout
    md = run_cli("report", "rep", "--format", "md", env=batch).stdout
    assert md.startswith("# portq batch rep") and "| model | source | target | job status | artifact |" in md
    res = run_cli("report", "rep", "--format", "html", "-o", str(tmp_path / "s.html"), env=batch)
    assert res.returncode == 0
    page = (tmp_path / "s.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "report.html" in page
    for svg in page.split("<svg")[1:]:
        ET.fromstring("<svg" + svg.split("</svg>")[0] + "</svg>")  # well-formed inline SVG


def test_job_html_has_the_plots(batch):
    doc = json.loads(run_cli("report", "rep", "--json", env=batch).stdout)
    html_path = doc["jobs"][0]["report"].replace("report.json", "report.html")
    page = open(html_path).read()
    assert "latency of onnx artifact" in page and "latency of source" in page and "|error| of output" in page
    assert page.count("<svg") >= 6  # per artifact: two latency plots and an error histogram


@pytest.mark.parametrize("flag, message", [
    (["--output-tol", "output"], "is not of the form NAME:"),
    (["--output-tol", "output:atol"], "is not KEY=VALUE"),
    (["--output-tol", "output:atol=big"], "needs a number"),
    (["--tolerance-mode", "p99"], "Invalid value for '--tolerance-mode'"),
    (["--batch-sizes", "1,x"], "comma-separated list of integers"),
    (["--quantile", "2"], "quantile"),
])
def test_bad_tolerance_and_latency_flags_exit_2(example_models, tmp_path, flag, message):
    res = run_cli("submit", str(example_models["mlp"]), *flag, env={"PORTQ_STORE": str(tmp_path / "s")})
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_a_store_written_by_version_1_is_named_as_such(tmp_path):
    """`portq report` on an older portq's batch says so in one line, instead of a validation dump."""
    store = tmp_path / "old-store"
    (store / "batches" / "old" / "jobs").mkdir(parents=True)
    (store / "results" / "k1").mkdir(parents=True)
    (store / "batches" / "old" / "jobs" / "j1.json").write_text(json.dumps({
        "job_id": "j1", "batch": "old", "model": "mlp", "source": "mlp.pt", "target": "cpu", "status": "succeeded",
        "result": "results/k1", "attempts": 1}))
    (store / "results" / "k1" / "report.json").write_text(json.dumps({
        "schema_version": 1, "job_id": "j1", "batch": "old", "model": "mlp", "source": "mlp.pt", "target": "cpu",
        "status": "succeeded", "best": "onnx", "artifacts": [{"format": "onnx", "status": "succeeded",
                                                              "path": "/old/results/k1/model.onnx"}]}))
    res = run_cli("report", "old", env={"PORTQ_STORE": str(store)})
    assert res.returncode == 1
    assert "is a job report of schema version 1, written by an older portq; this portq reads version 3" in res.stderr
    assert "submit the models again" in res.stderr and "Traceback" not in res.stderr
    assert "validation error" not in res.stderr.lower() and res.stderr.count("\n") <= 3
