import json
from pathlib import Path

import pytest
from portq.tasks.core.contract import (
    SAFE_ID,
    SCHEMAS,
    ArtifactReport,
    ArtifactRequest,
    ConvertSource,
    FinetuneOptions,
    FuseMember,
    FuseSource,
    InputSpec,
    JobKind,
    JobOptions,
    JobReport,
    JobSpec,
    ParityReport,
    SourceRef,
    StepStatus,
    Target,
    json_schema,
    read_versioned,
    route_for,
    safe_name,
)
from portq.tasks.core.errors import OlderVersionError
from pydantic import ValidationError

SCHEMA_DIR = Path(__file__).resolve().parents[3] / "tasks" / "core" / "schemas"


def spec(source_ref=None, **options):
    ref = source_ref or SourceRef(key="inputs/abc.pt", name="m.pt", sha256="abc", size=3)
    identity = {k: options.pop(k) for k in ("job_id", "batch_id", "model") if k in options}
    base = dict(job_id="j1", batch_id="b1", model="m", source=ConvertSource(model=ref))
    return JobSpec(**(base | identity), options=JobOptions(**options))


def test_route_for_maps_targets_to_queues():
    assert route_for(Target.cpu) == "cpu"
    assert route_for("cuda") == "gpu"
    with pytest.raises(ValueError):
        route_for("tpu")


@pytest.mark.parametrize("text, name, dtype, shape, dynamic, low, high", [
    ("x:float32[1,3,224,224]", "x", "float32", [1, 3, 224, 224], {}, None, None),
    ("ids:int64[2,16]{0,30000}", "ids", "int64", [2, 16], {}, 0, 30000),
    ("ids:int64[batch=2,seq=16]{0,100}", "ids", "int64", [2, 16], {0: "batch", 1: "seq"}, 0, 100),
    (" m : bool [4] ", "m", "bool", [4], {}, None, None),
])
def test_input_spec_parses(text, name, dtype, shape, dynamic, low, high):
    s = InputSpec.parse(text)
    assert (s.name, s.dtype, s.shape, s.dynamic, s.low, s.high) == (name, dtype, shape, dynamic, low, high)


@pytest.mark.parametrize("text, fragment", [
    ("ids:int64[2,16]", "need a value range"),
    ("x:float33[1]", "unknown dtype"),
    ("x[1,2]", "not of the form"),
    ("x:float32[0,2]", "not a positive integer"),
    ("x:float32[1]{5,1}", "low must be below high"),
])
def test_input_spec_rejects_with_reason(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        InputSpec.parse(text)


def test_job_spec_is_strict_and_versioned():
    s = spec()
    assert s.version == 2 and s.kind is JobKind.convert and s.queue == "cpu"
    assert [a.id for a in s.options.artifacts] == ["onnx"]
    roundtrip = JobSpec.model_validate(json.loads(s.model_dump_json()))
    assert roundtrip == s
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**s.model_dump(mode="json"), "version": 1})
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**s.model_dump(mode="json"), "surprise": 1})
    with pytest.raises(ValidationError):  # format options live in the artifact requests now
        JobSpec.model_validate({**s.model_dump(mode="json"), "opset": 17})
    with pytest.raises(ValidationError, match="valid id"):
        spec(batch_id="../escape")
    with pytest.raises(ValidationError, match="safe path component"):
        spec(model="../../x")


def test_identity_stays_apart_from_the_options():
    s = spec(target="cuda", dynamic=["batch"])
    assert set(JobSpec.model_fields) >= {"job_id", "batch_id", "model", "submitted_at", "kind", "source", "options"}
    assert s.target is Target.cuda and s.queue == "gpu" and s.options.dynamic == ["batch"]
    assert "job_id" not in JobOptions.model_fields and s.options.version == 2


def test_job_key_depends_on_content_options_and_toolchain_only():
    tools = {"torch": "2.13.0"}
    a = spec()
    assert a.job_key(tools) == spec(job_id="j2", batch_id="other", model="renamed").job_key(tools)
    renamed_file = SourceRef(key="inputs/abc.pt", name="elsewhere/m2.pt", sha256="abc", size=3)
    assert a.job_key(tools) == spec(source_ref=renamed_file).job_key(tools)
    assert a.job_key(tools) != spec(source_ref=SourceRef(key="k", name="m.pt", sha256="def", size=3)).job_key(tools)
    assert a.job_key(tools) != spec(artifacts=[{"format": "onnx"}, {"format": "pt2"}]).job_key(tools)
    assert a.job_key(tools) != spec(artifacts=[{"format": "onnx", "variant": "opset17"}]).job_key(tools)
    assert a.job_key(tools) != spec(artifacts=[{"format": "onnx", "options": {"opset": 17}}]).job_key(tools)
    assert a.job_key(tools) != spec(tolerance={"atol": 1e-3}).job_key(tools)
    assert a.job_key(tools) != a.job_key({"torch": "2.14.0"})


def ref(name, sha=None, size=3):
    return SourceRef(key=f"inputs/{sha or name}.pt", name=f"models/{name}", sha256=sha or name, size=size)


def fuse_spec(**source):
    fields = {"members": [FuseMember(model=ref("a.pt"), name="a.pt"), FuseMember(model=ref("b.pt"), name="b.pt")],
              "method": "soup", **source}
    return JobSpec(job_id="j1", batch_id="b1", model="soup-a-b", kind=JobKind.fuse, source=FuseSource(**fields))


def test_a_fuse_job_carries_its_members_method_and_data_and_travels_as_json():
    s = fuse_spec(base=FuseMember(model=ref("base.pt"), name="base.pt", arch="pkg.mod:Net"), method="ties",
                  params={"density": 0.5}, eval_data=ref("eval.npz"), calibration=ref("calib.npz"),
                  finetune=FinetuneOptions(data=ref("tune.npz"), epochs=3, lr=0.01))
    assert s.kind is JobKind.fuse and s.display == "fuse(ties: a.pt, b.pt; base base.pt)"
    assert [f.name for f in s.source.model_files()] == ["models/a.pt", "models/b.pt", "models/base.pt"]
    assert [f.name for f in s.source.data_files()] == ["models/eval.npz", "models/calib.npz", "models/tune.npz"]
    assert s.source.files() == [*s.source.model_files(), *s.source.data_files()]
    roundtrip = JobSpec.model_validate(json.loads(s.model_dump_json()))
    assert roundtrip == s and isinstance(roundtrip.source, FuseSource)
    assert not s.source.trust_pickle and spec().source.files() == [spec().source.model]
    with pytest.raises(ValidationError, match="a fuse job carries a convert source description"):
        JobSpec(job_id="j", batch_id="b", model="m", kind=JobKind.fuse, source=ConvertSource(model=ref("a.pt")))
    with pytest.raises(ValidationError):  # the kind tells the source descriptions apart
        JobSpec.model_validate({**s.model_dump(mode="json"), "source": {**s.source.model_dump(mode="json"),
                                                                       "kind": "convert"}})


def test_a_fuse_jobs_key_is_its_members_content_method_and_parameters():
    tools = {"torch": "2.13.0"}
    a = fuse_spec()
    relabelled = [m.model_copy(update={"name": f"new-{m.name}", "model": ref("moved/" + m.name, m.model.sha256)})
                  for m in a.source.members]
    assert a.job_key(tools) == fuse_spec(members=relabelled).job_key(tools)
    assert a.job_key(tools) != fuse_spec(members=a.source.members[::-1]).job_key(tools)  # order matters (weights)
    assert a.job_key(tools) != fuse_spec(method="ensemble").job_key(tools)
    assert a.job_key(tools) != fuse_spec(params={"weights": [0.25, 0.75]}).job_key(tools)
    assert a.job_key(tools) != fuse_spec(eval_data=ref("eval.npz")).job_key(tools)
    assert a.job_key(tools) != fuse_spec(finetune=FinetuneOptions(data=ref("t.npz"))).job_key(tools)
    assert a.job_key(tools) != fuse_spec(finetune=FinetuneOptions(data=ref("t.npz"), seed=1)).job_key(tools)
    changed = [a.source.members[0], FuseMember(model=ref("b.pt", "other"), name="b.pt")]
    assert a.job_key(tools) != fuse_spec(members=changed).job_key(tools)


@pytest.mark.parametrize("text, fmt, variant, artifact_id", [
    ("onnx", "onnx", "default", "onnx"),
    ("onnx.opset17", "onnx", "opset17", "onnx.opset17"),
    ("torchscript", "torchscript", "default", "torchscript"),
    ("aoti.max-autotune", "aoti", "max-autotune", "aoti.max-autotune"),
])
def test_artifact_ids_name_a_format_and_a_variant(text, fmt, variant, artifact_id):
    request = ArtifactRequest.parse(text)
    assert (request.format.value, request.variant, request.id) == (fmt, variant, artifact_id)
    assert SAFE_ID.match(request.id)


@pytest.mark.parametrize("text, fragment", [
    ("tflite", "not an artifact"),
    ("onnx.Opset17", "not a valid name"),
    ("onnx./x", "not a valid name"),
    ("onnx.a/b", "not a valid name"),
])
def test_artifact_requests_refuse_what_cannot_be_a_path_component(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        ArtifactRequest.parse(text)


def test_an_artifact_asked_twice_differently_is_refused():
    with pytest.raises(ValidationError, match="requested twice"):
        JobOptions(artifacts=[{"format": "onnx", "options": {"opset": 17}}, {"format": "onnx"}])
    assert len(JobOptions(artifacts=[{"format": "onnx"}, {"format": "onnx"}]).artifacts) == 1


def test_data_from_an_older_portq_is_refused_in_a_sentence():
    v1_report = {"schema_version": 1, "job_id": "j", "batch": "b", "model": "m", "source": "m.pt", "target": "cpu",
                 "status": "succeeded", "best": "onnx", "artifacts": [{"format": "onnx", "status": "succeeded"}]}
    with pytest.raises(OlderVersionError) as e:
        read_versioned(JobReport, v1_report, "store/results/x/report.json")
    assert "schema version 1, written by an older portq; this portq reads version 3" in e.value.message
    assert "store/results/x/report.json" in e.value.message and "submit the models again" in e.value.message
    v1_spec = {"version": 1, "job_id": "j", "batch_id": "b", "model": "m", "formats": ["onnx"]}
    with pytest.raises(OlderVersionError, match="job spec of schema version 1"):
        read_versioned(JobSpec, v1_spec, "specs/j.json")
    current = spec()  # one spec: two would differ in submitted_at whenever a millisecond ticks between them
    assert read_versioned(JobSpec, current.model_dump(mode="json"), "x") == current


def test_safe_name_cannot_escape():
    for raw in ["../../x", "..", "/etc/passwd", "a/../../b", ".hidden", ""]:
        name = safe_name(raw)
        assert "/" not in name and ".." not in name and not name.startswith(".") and name


@pytest.mark.parametrize("filename", sorted(SCHEMAS))
def test_published_schemas_match_the_models(filename):
    published = json.loads((SCHEMA_DIR / filename).read_text())
    assert published == json_schema(SCHEMAS[filename]), (
        f"tasks/core/schemas/{filename} is stale: run `python -m portq.tasks.core.schema_files` and bump the "
        "version if a key was removed or changed")


@pytest.mark.parametrize("status, passed, good", [
    (StepStatus.succeeded, True, True),
    (StepStatus.succeeded, False, False),  # converted, but computes something else
    (StepStatus.succeeded, None, False),  # no parity check: nothing says it is right
    (StepStatus.failed, True, False),  # parity passed, then a later stage (latency) failed
    (StepStatus.skipped, None, False),
])
def test_an_artifact_is_good_when_it_converted_and_passed_parity(status, passed, good):
    parity = None if passed is None else ParityReport(passed=passed, atol=1e-4, rtol=1e-3, samples=1, seed=0,
                                                      device="cpu", max_abs_err=0.0, max_rel_err=0.0, outputs=[])
    artifact = ArtifactReport(id="onnx", format="onnx", status=status, parity=parity)
    assert artifact.good is good
    assert "good" not in artifact.model_dump()  # decided from the report, never stored in it


def test_a_version_2_report_reads_as_version_3_without_an_interval():
    latency = {"device": "cpu", "warmup": 1, "runs": 3, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "mean_ms": 1.0,
               "source_p50_ms": 2.0, "source_p90_ms": 2.0, "source_p99_ms": 2.0, "source_mean_ms": 2.0,
               "speedup": 2.0, "stable": True}
    v2 = {"schema_version": 2, "job_id": "j", "batch": "b", "model": "m", "source": "m.pt", "target": "cpu",
          "status": "succeeded", "best": "onnx",
          "artifacts": [{"id": "onnx", "format": "onnx", "status": "succeeded", "latency": latency}]}
    report = read_versioned(JobReport, v2, "store/results/x/report.json")
    assert report.schema_version == 3
    (art,) = report.artifacts
    assert art.latency.speedup == 2.0 and art.latency.speedup_interval is None and not art.latency.inconclusive
    with pytest.raises(OlderVersionError, match="a newer portq"):
        read_versioned(JobReport, {**v2, "schema_version": 4}, "x")
