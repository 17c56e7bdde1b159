"""The CLI in embedded mode (no broker): exit codes and outputs, through the real entry point."""

import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
from portq.tasks.core.schema_files import SCHEMA_DIR

from tests.conftest import run_cli


@pytest.fixture
def env(store_dir):
    return {"PORTQ_STORE": str(store_dir)}


def test_submit_runs_here_and_reports(example_models, env):
    paths = [str(p) for p in example_models.values()]
    res = run_cli("submit", *paths, "--batch", "demo", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "batch demo"
    assert "running 3 job(s) here" in res.stderr
    for model, path in example_models.items():
        assert re.search(rf"{model}\s+│\s+{re.escape(str(path))}\s+│\s+cpu\s+│\s+succeeded\s+│\s+onnx\s+│\s+succeeded"
                         rf"\s+│\s+pass", res.stdout)

    rep = run_cli("report", "demo", "--json", env=env)
    assert rep.returncode == 0
    doc = json.loads(rep.stdout)
    jsonschema.validate(doc, json.loads((SCHEMA_DIR / "batch-report.v3.json").read_text()))
    assert doc["batch"] == "demo" and doc["counts"]["succeeded"] == 3 and doc["schema_version"] == 3
    for job in doc["jobs"]:
        (art,) = job["artifacts"]
        assert (art["id"], art["format"], art["variant"]) == ("onnx", "onnx", "default")
        assert art["parity"]["passed"] is True and job["best"] == "onnx"
        assert art["path"] == "onnx/model.onnx" and os.path.isfile(os.path.join(job["result"], art["path"]))
        assert art["latency"]["p50_ms"] > 0 and art["latency"]["source_p50_ms"] > 0

    st = run_cli("status", "demo", env=env)
    assert st.returncode == 0 and "succeeded 3" in st.stdout
    st = run_cli("status", "demo", "--json", env=env)
    doc = json.loads(st.stdout)
    assert st.returncode == 0 and doc["counts"]["succeeded"] == 3 and doc["batch"] == "demo"
    assert sorted(j["model"] for j in doc["jobs"]) == sorted(example_models)


def test_failed_job_gives_exit_1_and_others_complete(example_models, tmp_path, env):
    (tmp_path / "broken.pt").write_text("hello")
    res = run_cli("submit", str(tmp_path / "broken.pt"), str(example_models["mlp"]), "--batch", "mixed", env=env)
    assert res.returncode == 1
    doc = json.loads(run_cli("report", "mixed", "--json", env=env).stdout)
    by_model = {j["model"]: j for j in doc["jobs"]}
    assert by_model["mlp"]["status"] == "succeeded"
    assert by_model["broken"]["status"] == "failed"
    assert "not a PyTorch model file" in by_model["broken"]["error"] and "broken.pt" in by_model["broken"]["error"]
    assert run_cli("status", "mixed", env=env).returncode == 1


def test_resubmitting_a_batch_name_replaces_the_finished_batch(example_models, env):
    """The quick start run twice: the second run's batch is the batch (3 jobs, served from the cache), not 6 rows."""
    paths = [str(p) for p in example_models.values()]
    assert run_cli("submit", *paths, "--batch", "again", env=env).returncode == 0
    res = run_cli("submit", *paths, "--batch", "again", "--json", env=env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)  # --json: the batch report alone on stdout
    assert doc["batch"] == "again" and doc["counts"]["total"] == 3 and all(j["cached"] for j in doc["jobs"])
    assert "[warning] batch again: replaced 3 finished job(s) of the same model file(s)" in res.stderr
    status = json.loads(run_cli("status", "again", "--json", env=env).stdout)
    assert status["counts"]["total"] == 3
    # a batch built over two submissions keeps both (only the same file's job is replaced)
    assert run_cli("submit", paths[0], "--batch", "built", env=env).returncode == 0
    res = run_cli("submit", *paths[1:], "--batch", "built", "--json", env=env)
    assert res.returncode == 0 and "replaced" not in res.stderr, res.stderr
    status = json.loads(run_cli("status", "built", "--json", env=env).stdout)
    assert status["counts"]["total"] == 3
def test_input_spec_and_tolerance_flags(tmp_path, env):
    import torch

    m = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Flatten(), torch.nn.Linear(32, 2))
    torch.jit.save(torch.jit.trace(m, torch.randint(0, 50, (2, 4))), tmp_path / "emb.pt")
    res = run_cli("submit", str(tmp_path / "emb.pt"), "--input", "ids:int64[2,4]{0,50}", "--atol", "1e-5",
                  "--batch", "spec", env=env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(run_cli("report", "spec", "--json", env=env).stdout)
    parity = doc["jobs"][0]["artifacts"][0]["parity"]
    assert parity["atol"] == 1e-5 and parity["passed"]


@pytest.mark.parametrize("args, message", [
    (["--input", "ids:int64[2,4]"], "need a value range"),
    (["--format", "gif"], "'gif' is not an artifact: a format (onnx, torchscript, pt2, aoti)"),
    (["--format", "onnx.opset99"], "artifact onnx.opset99: unknown onnx variant 'opset99'; known: default, external, "
                                   "fp16, fp16-mixed"),
    (["--format", "onnx.opset17", "--format", "onnx", "--opset", "3"], "artifact onnx: option opset: Input should be "
                                                                        "greater than or equal to 7"),
    (["--target", "tpu"], "Invalid value for '--target'"),
])
def test_bad_options_exit_2(example_models, env, args, message):
    res = run_cli("submit", str(example_models["mlp"]), *args, env=env)
    assert res.returncode == 2 and message in res.stderr


def test_unknown_batch(env):
    res = run_cli("report", "nosuch", env=env)
    assert res.returncode == 2 and "no batch 'nosuch'" in res.stderr


def test_unreachable_broker_is_a_clear_error(example_models, env):
    res = run_cli("submit", str(example_models["mlp"]), env={**env, "PORTQ_BROKER_URL": "redis://:pw@127.0.0.1:1/0"})
    assert res.returncode == 2
    assert "cannot reach the broker at redis://***@127.0.0.1:1/0" in res.stderr and ":pw@" not in res.stderr


def test_report_markdown_file(example_models, env, tmp_path):
    run_cli("submit", str(example_models["mlp"]), "--batch", "md", env=env)
    res = run_cli("report", "md", "--format", "md", "--output", str(tmp_path / "r.md"), env=env)
    assert res.returncode == 0
    text = (tmp_path / "r.md").read_text()
    assert text.startswith("# portq batch md")
    assert f"| mlp | {example_models['mlp']} | cpu | succeeded | onnx | succeeded | pass |" in text


def test_two_files_of_one_name_progress_reports_and_a_quiet_exit(tmp_path, env):
    """albert.pt and albert.pt2 are two jobs named albert: the table, `status` and --json say which file each came
    from. Each job's result is printed as it finishes, then where the reports are; nothing alarming at exit."""
    import numpy as np
    import torch

    model, x = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh()).eval(), torch.randn(2, 6)
    torch.jit.save(torch.jit.trace(model, x), tmp_path / "albert.pt")
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "albert.pt2")
    np.savez(tmp_path / "albert.npz", x=x.numpy())  # the sidecar both files share
    pt, pt2 = "albert.pt", "albert.pt2"  # as the user typed them: `portq submit albert.pt*`
    res = run_cli("submit", pt, pt2, "--batch", "twins", "--runs", "3", "--warmup", "1", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for path in (pt, pt2):
        assert re.search(rf"albert\s+│\s+{re.escape(path)}\s+│\s+cpu\s+│\s+succeeded", res.stdout)
        assert f"✓ albert ({path}): succeeded" in res.stderr
    store = env["PORTQ_STORE"]
    assert f"reports: summary page {store}/batches/twins/summary.html (Markdown: {store}/batches/twins/summary.md)" \
        in res.stderr
    assert "portq report twins --format html -o summary.html" in res.stderr
    assert "leaked" not in res.stderr and "Traceback" not in res.stderr and "warn" not in res.stderr.lower()

    page = (tmp_path / "store" / "batches" / "twins" / "summary.html").read_text()
    links = re.findall(r'href="([^"]+)"', page)
    assert len(links) == 2 and all(link.startswith("../../results/") and link.endswith("/report.html")
                                   for link in links)
    assert all((tmp_path / "store" / "batches" / "twins" / link).resolve().is_file() for link in links)

    status = run_cli("status", "twins", env=env)
    assert status.returncode == 0
    assert re.search(r"albert\s+│\s+albert.pt\s+│", status.stdout) and re.search(r"albert\s+│\s+albert.pt2\s+│",
                                                                                 status.stdout)
    doc = json.loads(run_cli("report", "twins", "--json", env=env).stdout)
    assert sorted(job["source"] for job in doc["jobs"]) == [pt, pt2]


def test_help_documents_every_exit_code_and_completion_is_on():
    res = run_cli("--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for code in ("0 success", "1 a job failed", "2 bad usage", "3 --timeout expired", "130 interrupted"):
        assert code in text
    assert "--install-completion" in res.stdout and "--show-completion" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--batch", "../../etc"], "[error] [step submit] batch name '../../etc' is not a valid id"),
    (["--runs", "0"], "[error] [step submit] latency.runs: Input should be greater than or equal to 1"),
])
def test_refusals_read_like_portqs_errors(example_models, env, args, message):
    res = run_cli("submit", str(example_models["mlp"]), *args, env=env)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "pydantic" not in res.stderr and "Value error" not in res.stderr and res.stderr.count("\n") == 1
    assert not (Path(env["PORTQ_STORE"]).parent / "etc").exists()
