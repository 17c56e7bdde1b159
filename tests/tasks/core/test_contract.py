import json
from pathlib import Path

import pytest
from portq.tasks.core.contract import (
    SCHEMAS,
    Format,
    InputSpec,
    JobSpec,
    SourceRef,
    Target,
    json_schema,
    route_for,
    safe_name,
)
from pydantic import ValidationError

SCHEMA_DIR = Path(__file__).resolve().parents[3] / "tasks" / "core" / "schemas"


def spec(**kw):
    base = dict(job_id="j1", batch_id="b1", model="m",
                source=SourceRef(key="inputs/abc.pt", name="m.pt", sha256="abc", size=3))
    return JobSpec(**(base | kw))


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
    assert s.version == 1 and s.formats == [Format.onnx] and s.queue == "cpu"
    roundtrip = JobSpec.model_validate(json.loads(s.model_dump_json()))
    assert roundtrip == s
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**s.model_dump(mode="json"), "version": 2})
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**s.model_dump(mode="json"), "surprise": 1})
    with pytest.raises(ValidationError, match="valid id"):
        spec(batch_id="../escape")
    with pytest.raises(ValidationError, match="safe path component"):
        spec(model="../../x")


def test_job_key_depends_on_content_options_and_toolchain_only():
    tools = {"torch": "2.13.0"}
    a = spec()
    assert a.job_key(tools) == spec(job_id="j2", batch_id="other", model="renamed").job_key(tools)
    assert a.job_key(tools) != spec(source=SourceRef(key="k", name="m.pt", sha256="def", size=3)).job_key(tools)
    assert a.job_key(tools) != spec(formats=[Format.onnx, Format.pt2]).job_key(tools)
    assert a.job_key(tools) != spec(tolerance={"atol": 1e-3}).job_key(tools)
    assert a.job_key(tools) != a.job_key({"torch": "2.14.0"})


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
