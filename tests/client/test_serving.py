"""`portq package --triton` and `portq verify`, and the provenance record beside every artifact, on a small batch run
through the embedded default (no broker). No Triton server runs here: the repository is checked against Triton's
documented layout rules, and its config.pbtxt parsed as Triton's ModelConfig protobuf (tritonclient ships it)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

FAST = ["--runs", "4", "--warmup", "1"]
NUMPY = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP16": np.float16}


@pytest.fixture(scope="module")
def batch(example_models, tmp_path_factory):
    """Batch `srv`: textcls to onnx and torchscript (batch dim dynamic), and a broken file that fails."""
    root = tmp_path_factory.mktemp("serving")
    (root / "broken.pt").write_text("not a model")
    env = {"PORTQ_STORE": str(root / "store")}
    res = run_cli("submit", str(example_models["textcls"]), str(root / "broken.pt"),
                  "-f", "onnx", "-f", "torchscript", "--dynamic", "batch", "--batch", "srv", *FAST, env=env)
    assert res.returncode == 1, res.stderr  # the broken file's job failed; the others succeeded
    return root, env


def _report(env):
    return json.loads(run_cli("report", "srv", "--json", env=env).stdout)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _triton_layout(repo: Path) -> dict[str, object]:
    """Triton's documented model repository rules: one folder per model, named as its config's `name`; a
    config.pbtxt; at least one numeric version folder (not starting with 0), holding the platform's default model
    file. Returns each model's parsed config."""
    from tritonclient.grpc import model_config_pb2

    default_file = {"onnxruntime_onnx": "model.onnx", "pytorch_libtorch": "model.pt"}
    configs = {}
    for model in sorted(p for p in repo.iterdir()):
        assert model.is_dir(), f"{model}: only model folders belong in a repository's top level"
        config = _model_config(model / "config.pbtxt")
        assert config.name == model.name
        versions = [p for p in model.iterdir() if p.is_dir()]
        assert versions and all(v.name.isdigit() and not v.name.startswith("0") for v in versions)
        for version in versions:
            assert (version / default_file[config.platform]).is_file()
        batching = config.max_batch_size > 0
        assert batching == config.HasField("dynamic_batching")
        for tensor in [*config.input, *config.output]:
            assert tensor.data_type != model_config_pb2.TYPE_INVALID and len(tensor.dims) > 0
        configs[model.name] = config
    return configs


def test_every_artifact_has_a_provenance_record(batch):
    root, env = batch
    from portq.tasks.core.toolchain import toolchain

    doc = _report(env)
    jobs = {j["model"]: j for j in doc["jobs"]}
    spec = json.loads((root / "store" / "batches" / "srv" / "specs" / f"{jobs['textcls']['job_id']}.json").read_text())
    result = Path(jobs["textcls"]["result"])
    for art in jobs["textcls"]["artifacts"]:
        assert art["provenance"] == f"{art['id']}/provenance.intoto.json"
        st = json.loads((result / art["provenance"]).read_text())
        assert st["_type"] == "https://in-toto.io/Statement/v1"
        assert st["predicateType"] == "https://slsa.dev/provenance/v1"
        assert st["subject"] == [{"name": art["path"], "digest": {"sha256": _sha256(result / art["path"])}}]
        build, run = st["predicate"]["buildDefinition"], st["predicate"]["runDetails"]
        assert build["buildType"].startswith("urn:portq:")
        assert build["externalParameters"]["options"] == spec["options"]
        assert build["externalParameters"]["artifact"]["id"] == art["id"]
        deps = {d["annotations"]["portq_role"]: d for d in build["resolvedDependencies"]}
        assert deps["model"]["digest"]["sha256"] == spec["source"]["model"]["sha256"]
        assert deps["sample"]["digest"]["sha256"] == spec["options"]["sample"]["sha256"]  # textcls.npz
        assert run["builder"]["id"].startswith("urn:portq:worker:")
        versions = {d["name"]: d["uri"] for d in run["builder"]["builderDependencies"]}
        assert versions["torch"] == f"pkg:pypi/torch@{toolchain()['torch']}"
        assert run["metadata"]["invocationId"] == jobs["textcls"]["job_id"]
        assert run["metadata"]["startedOn"].endswith("Z") and run["metadata"]["finishedOn"].endswith("Z")
        byproducts = {b["name"]: b["digest"]["sha256"] for b in run["byproducts"]}
        assert byproducts["report.json"] == _sha256(result / "report.json")
        checks = st["predicate"]["portq_checks"]
        assert checks["parity"]["passed"] is True and checks["parity"]["max_abs_err"] == art["parity"]["max_abs_err"]
        assert checks["latency"]["p50_ms"] == art["latency"]["p50_ms"] and checks["best"] == art["best"]


def test_package_writes_a_triton_repository_that_matches_the_graphs(batch, tmp_path):
    import onnx
    import onnxruntime as ort

    root, env = batch
    repo = tmp_path / "repo"
    res = run_cli("package", "srv", "--triton", str(repo), env=env)
    assert res.returncode == 0, res.stderr
    assert "skipped broken" in res.stderr and "job failed" in res.stderr
    configs = _triton_layout(repo)
    assert sorted(configs) == ["textcls"]
    jobs = {j["model"]: j for j in _report(env)["jobs"]}
    from tritonclient.grpc import model_config_pb2

    elem = {onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32, onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64}
    for name, config in configs.items():
        best = next(a for a in jobs[name]["artifacts"] if a["best"])
        assert best["format"] == "onnx" and config.platform == "onnxruntime_onnx"
        model_file = repo / name / "1" / "model.onnx"
        assert _sha256(model_file) == _sha256(Path(jobs[name]["result"]) / best["path"])
        assert (repo / name / "1" / "provenance.intoto.json").read_bytes() == \
            (Path(jobs[name]["result"]) / best["provenance"]).read_bytes()  # copied unchanged
        graph = onnx.load(str(model_file)).graph
        assert config.max_batch_size == 8 and config.HasField("dynamic_batching")  # the sweep's largest batch
        for tensors, values in ((config.input, graph.input), (config.output, graph.output)):
            assert [t.name for t in tensors] == [v.name for v in values]
            for t, v in zip(tensors, values):
                shape = v.type.tensor_type.shape.dim
                assert shape[0].dim_param  # the batch dim is dynamic, so the config leaves it out
                assert list(t.dims) == [d.dim_value for d in shape[1:]]
                assert t.data_type == elem[v.type.tensor_type.elem_type]
        # the packaged model runs at a batch size the config allows, from the config's own signature
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        feeds = {t.name: np.ones([3, *t.dims], dtype=NUMPY[model_config_pb2.DataType.Name(t.data_type)])
                 for t in config.input}
        outputs = session.run(None, feeds)
        assert [list(o.shape) for o in outputs] == [[3, *t.dims] for t in config.output]
        readme = (repo / name / "README.md").read_text()
        assert "## Parity" in readme and "passed:" in readme and "## Latency" in readme and "p50" in readme
    res = run_cli("verify", str(repo), env=env)
    assert res.returncode == 0 and "verified 1 file(s) against 1 provenance record(s)" in res.stderr, res.stderr
    # a second package into the same repository refuses to overwrite its models
    again = run_cli("package", "srv", "--triton", str(repo), env=env)
    assert again.returncode == 2 and "already holds model folder(s) textcls" in again.stderr


def test_package_torchscript_follows_libtorch_naming(batch, tmp_path):
    import torch
    from tritonclient.grpc import model_config_pb2

    root, env = batch
    repo = tmp_path / "ts"
    res = run_cli("package", "srv", "--triton", str(repo), "--artifact", "torchscript", "--max-batch-size", "4",
                  env=env)
    assert res.returncode == 0, res.stderr
    config = _triton_layout(repo)["textcls"]
    assert config.platform == "pytorch_libtorch" and config.max_batch_size == 4
    assert [t.name for t in config.input] == ["INPUT__0", "INPUT__1"]
    assert [t.name for t in config.output] == ["OUTPUT__0"]
    assert [list(t.dims) for t in config.input] == [[16], [16]] and list(config.output[0].dims) == [3]
    assert {t.data_type for t in config.input} == {model_config_pb2.TYPE_INT64}
    module = torch.jit.load(str(repo / "textcls" / "1" / "model.pt"))
    out = module(torch.ones(3, 16, dtype=torch.int64), torch.ones(3, 16, dtype=torch.int64))
    assert list(out.shape) == [3, *config.output[0].dims]
    assert "`INPUT__0` | `ids`" in (repo / "textcls" / "README.md").read_text()
    assert run_cli("verify", str(repo / "textcls" / "1" / "model.pt"), env=env).returncode == 0


def test_verify_names_a_changed_or_missing_file(batch, tmp_path):
    root, env = batch
    res = run_cli("verify", "srv", env=env)
    assert res.returncode == 0 and "verified 2 file(s) against 2 provenance record(s)" in res.stderr, res.stderr
    job = next(j for j in _report(env)["jobs"] if j["model"] == "textcls")
    artifact = Path(job["result"]) / job["artifacts"][0]["path"]
    original = artifact.read_bytes()
    try:
        changed = bytearray(original)
        changed[len(changed) // 2] ^= 0x01  # one bit of one byte
        artifact.write_bytes(bytes(changed))
        for target in ("srv", str(artifact), str(Path(job["result"]))):
            res = run_cli("verify", target, env=env)
            assert res.returncode == 1, (target, res.stdout, res.stderr)
            (line,) = res.stdout.splitlines()
            assert line.startswith(f"{artifact}: changed: sha256"), line
        # package refuses to serve it, and leaves nothing behind
        repo = tmp_path / "repo"
        res = run_cli("package", "srv", "--triton", str(repo), env=env)
        assert res.returncode == 1 and "does not match its provenance record" in res.stderr, res.stderr
        assert not repo.exists() and list(tmp_path.iterdir()) == []
    finally:
        artifact.write_bytes(original)
    repo = tmp_path / "repo"
    assert run_cli("package", "srv", "--triton", str(repo), env=env).returncode == 0
    (repo / "textcls" / "1" / "model.onnx").unlink()
    res = run_cli("verify", str(repo), env=env)
    assert res.returncode == 1 and res.stdout.splitlines() == [
        f"{repo / 'textcls' / '1' / 'model.onnx'}: missing (provenance record "
        f"{repo / 'textcls' / '1' / 'provenance.intoto.json'})"]


def test_package_of_only_failed_jobs_exits_1_and_writes_nothing(batch, tmp_path):
    from portq.tasks.state import records
    from portq.tasks.state.store import Store

    root, env = batch
    store = Store(env["PORTQ_STORE"])
    (failed,) = [r for r in records.list_records(store, "srv") if r.status.value == "failed"]
    records.write_record(store, failed.model_copy(update={"batch": "bad"}))  # a batch of only that failed job
    repo = tmp_path / "out" / "repo"
    (tmp_path / "out").mkdir()
    res = run_cli("package", "bad", "--triton", str(repo), env=env)
    assert res.returncode == 1
    assert "skipped broken" in res.stderr and "not a PyTorch model file" in res.stderr
    assert "[error] nothing packaged from batch bad" in res.stderr
    assert list((tmp_path / "out").iterdir()) == []  # no repository, no staging folder


def test_model_names_are_made_safe_for_triton():
    from portq.tasks.reports.triton import Signature, Tensor, config_text, model_name

    taken: set[str] = set()
    assert model_name("resnet 50/v1?", taken) == "resnet_50_v1_"
    assert model_name("..hidden", taken) == "hidden"
    assert model_name("resnet 50/v1?", taken) == "resnet_50_v1__2"
    assert model_name("", taken) == "model"
    # names inside the config are quoted, whatever they hold
    sig = Signature([Tensor('in"put\\', "TYPE_FP32", (-1, 3), "x")], [Tensor("out", "TYPE_FP32", (), "y")])
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_text("m", "onnxruntime_onnx", sig, 0, "cuda"), model_config_pb2.ModelConfig())
    assert config.input[0].name == 'in"put\\' and list(config.input[0].dims) == [-1, 3]
    assert list(config.output[0].dims) == [1] and list(config.output[0].reshape.shape) == []
    assert config.max_batch_size == 0 and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


@pytest.mark.slow
def test_verify_on_an_object_store(example_models, s3_store, s3_env, tmp_path):
    """Provenance through the fsspec store: an ONNX artifact with external data (two subjects) on S3, verified by
    batch and by URL, packaged from there, and a changed object named."""
    from portq.tasks.state.store import Store

    env = {**s3_env, "PORTQ_STORE": s3_store}
    res = run_cli("submit", str(example_models["mlp"]), "--batch", "s3p", "--format", "onnx.external", *FAST,
                  env=env)
    assert res.returncode == 0, res.stderr
    assert run_cli("verify", "s3p", env=env).returncode == 0
    res = run_cli("verify", f"{s3_store}/results", env=env)
    assert res.returncode == 0 and "verified 2 file(s) against 1 provenance record(s)" in res.stderr, res.stderr
    repo = tmp_path / "repo"
    assert run_cli("package", "s3p", "--triton", str(repo), env=env).returncode == 0
    assert sorted(p.name for p in (repo / "mlp" / "1").iterdir()) == ["model.onnx", "model.onnx.data",
                                                                      "provenance.intoto.json"]
    assert run_cli("verify", str(repo), env=env).returncode == 0
    store = Store(s3_store)
    data = next(k for k in store.find("results") if k.endswith("model.onnx.data"))
    store.write_bytes(data, store.read_bytes(data)[:-1] + b"\x00")
    res = run_cli("verify", "s3p", env=env)
    assert res.returncode == 1 and res.stdout.startswith(f"{store.url(data)}: changed"), res.stdout
    shutil.rmtree(repo)
