"""`portq optimize`: optimization variants of an existing ONNX file, held to the file itself."""

import json

from tests.conftest import run_cli


def test_a_portq_artifact_is_optimized_against_itself_with_its_jobs_inputs(example_models, tmp_path):
    env = {"PORTQ_STORE": str(tmp_path / "store")}
    first = run_cli("submit", str(example_models["textcls"]), "--batch", "one", "--runs", "6", env=env)
    assert first.returncode == 0, first.stderr
    (job,) = json.loads(run_cli("report", "one", "--json", env=env).stdout)["jobs"]
    onnx_file = f"{job['result']}/onnx/model.onnx"
    res = run_cli("optimize", onnx_file, "--optimize", "ort-all,int8-dynamic", "--precision", "int8", "--batch",
                  "two", env=env)
    assert res.returncode == 0, res.stderr
    (again,) = json.loads(run_cli("report", "two", "--json", env=env).stdout)["jobs"]
    arts = {a["id"]: a for a in again["artifacts"]}
    assert arts["onnx"]["route"] == "passthrough" and arts["onnx"]["parity"]["max_abs_err"] == 0.0
    assert arts["onnx.int8-dynamic"]["parity"]["passed"] and arts["onnx.ort-all"]["parity"]["passed"]
    # the artifact's job gave the inputs: integer token ids within their range, the same shapes
    report = json.loads(open(f"{again['result']}/report.json").read())
    assert [(i["name"], i["dtype"], i["high"]) for i in report["inputs"]] == \
        [(i["name"], i["dtype"], i["high"]) for i in json.loads(open(f"{job['result']}/report.json").read())["inputs"]]


def test_a_file_that_is_not_onnx_is_refused_before_work_starts(example_models, tmp_path):
    res = run_cli("optimize", str(example_models["mlp"]), env={"PORTQ_STORE": str(tmp_path / "store")})
    assert res.returncode == 2
    assert f"{example_models['mlp']} is not an ONNX file" in res.stderr
    assert "portq submit MODEL --optimize" in res.stderr
    assert not (tmp_path / "store").exists()
