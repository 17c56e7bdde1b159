"""`portq fuse` through the real entry point: bad requests refused before anything runs (exit 2, exact
messages), and a fusion run here (no broker) that shows up in status and report like any job."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from portq.tasks.core.schema_files import SCHEMA_DIR

from tests.conftest import run_cli
from tests.tasks.fusion.helpers import SmallNet, fine_tunes, save_data, save_scripts


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    d = tmp_path_factory.mktemp("members")
    torch.manual_seed(0)
    paths = save_scripts(d, fine_tunes(SmallNet().eval(), 3), torch.randn(6, 4))
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    return {"paths": paths, "dir": d, "inputs_only": save_data(d / "inputs.npz", x),
            "eval": save_data(d / "eval.npz", x, torch.randint(0, 3, (32,)))}


@pytest.fixture
def env(store_dir):
    return {"PORTQ_STORE": str(store_dir)}


REFUSALS = [  # (arguments after the member files, how many members, the message after "[error] [step fuse] ")
    (["--method", "soup"], 1, "soup: needs at least 2 models, got 1"),
    (["--method", "slerp"], 3, "slerp: needs exactly 2 models, got 3"),
    (["--method", "blend"], 2, "unknown fusion method 'blend'; known: breadcrumbs, chain, concat, ensemble, "
                               "greedy-soup, slerp, soup, stack, task-arithmetic, ties, vote"),
    (["--method", "ensemble", "--weights", "1,2,3"], 2, "ensemble: got 3 weights for 2 members"),
    (["--method", "soup", "--weights", "1,-1"], 2, "soup: weights must sum to a positive value, got sum 0.0"),
    (["--method", "soup", "--weights", "1,x"], 2, "--weights '1,x' is not a comma-separated list of numbers, e.g. "
                                                  "0.7,0.3"),
    (["--method", "greedy-soup"], 2, "greedy-soup: needs --eval-data (an .npz of inputs and labels) to score the "
                                     "members"),
    (["--method", "soup", "--epochs", "3", "--lr", "0.1"], 2, "--epochs, --lr set up a fine-tune: give its data with "
                                                              "--finetune DATA.npz (an .npz of inputs and labels)"),
    (["--method", "ties"], 2, "ties: needs a base model (--base BASE) to compute task vectors"),
    (["--method", "task-arithmetic"], 2, "task-arithmetic: needs a base model (--base BASE) to compute task vectors"),
    (["--method", "slerp", "--t", "1.5"], 2, "slerp: --t must be in [0, 1], got 1.5"),
    (["--method", "ties", "--base", "{m0}", "--density", "0"], 2, "ties: --density must be in (0, 1], got 0.0"),
    (["--method", "soup", "--t", "0.3"], 2, "soup: takes no --t (its parameters: --metric, --weights)"),
    (["--method", "vote", "--finetune", "{eval}"], 2, "vote: cannot be fine-tuned: its output (class indices) has "
                                                      "no gradient; fine-tune the members first, or use --method "
                                                      "ensemble"),
]


@pytest.mark.parametrize("args, count, message", REFUSALS, ids=[r[2][:40] for r in REFUSALS])
def test_bad_requests_are_refused_before_anything_runs(members, env, store_dir, args, count, message):
    args = [a.format(m0=members["paths"][0], eval=members["eval"]) for a in args]
    res = run_cli("fuse", *members["paths"][:count], *args, env=env)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == f"[error] [step fuse] {message}"
    assert not (store_dir / "batches").exists()  # nothing uploaded, no job recorded


def test_bad_files_are_refused_naming_them(members, env, store_dir):
    paths = members["paths"][:2]
    res = run_cli("fuse", *paths, "--method", "greedy-soup", "--eval-data", members["inputs_only"], env=env)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"[error] [step fuse, file {members['inputs_only']}] --eval-data: holds no 'labels' array: save the labels "
        "with the inputs, e.g. numpy.savez(path, x=inputs, labels=labels)")
    gone = str(members["dir"] / "gone.pt")
    res = run_cli("fuse", paths[0], gone, "--method", "soup", env=env)
    assert res.returncode == 2 and res.stderr.strip() == f"[error] [step fuse, file {gone}] file does not exist"
    assert not (store_dir / "batches").exists()


def test_a_fusion_runs_here_and_reports_like_any_job(members, env, tmp_path):
    res = run_cli("fuse", *members["paths"], "--method", "ensemble", "--weights", "2,1,1", "--eval-data",
                  members["eval"], "--format", "onnx", "--format", "pt2", "--input", "x:float32[batch=4,4]",
                  "--dynamic", "batch", "--runs", "3", "--batch", "fz", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "batch fz" and "running 1 job(s) here" in res.stderr
    doc = json.loads(run_cli("report", "fz", "--json", env=env).stdout)
    jsonschema.validate(doc, json.loads((SCHEMA_DIR / "batch-report.v3.json").read_text()))
    (job,) = doc["jobs"]
    assert job["kind"] == "fuse" and job["model"] == "ensemble-ts0-ts1-ts2"
    assert job["source"] == "fuse(ensemble: ts0.pt, ts1.pt, ts2.pt)" and job["status"] == "succeeded"
    assert [a["id"] for a in job["artifacts"]] == ["onnx", "pt2"] and all(a["parity"]["passed"]
                                                                            for a in job["artifacts"])
    report = json.loads(open(job["report"]).read())
    jsonschema.validate(report, json.loads((SCHEMA_DIR / "job-report.v3.json").read_text()))
    fusion = report["fusion"]
    assert fusion["params"]["weights"] == [0.5, 0.25, 0.25] and fusion["combine_check"]["passed"]
    assert fusion["metric"] == "accuracy" and all(m["score"] is not None for m in fusion["members"])
    status = run_cli("status", "fz", env=env)
    assert status.returncode == 0 and "succeeded 1" in status.stdout
    md = run_cli("report", "fz", "--format", "md", env=env)
    assert "ensemble-ts0-ts1-ts2" in md.stdout
    text = open(job["report"].replace("report.json", "report.md")).read()
    assert "## fusion" in text and "fused vs its members run separately: equal within the job's tolerance" in text
