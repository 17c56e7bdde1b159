"""Schema versions: the published JSON Schema files, and reading stored data written by another portq."""

from __future__ import annotations

from typing import Any, TypeVar

from portq.tasks.core.contract.nightly import NIGHTLY_SCHEMA_VERSION, Comparison, SeriesEntry, SeriesHistory
from portq.tasks.core.contract.report import REPORT_SCHEMA_VERSION, BatchReport, JobReport
from portq.tasks.core.contract.spec import JOB_SPEC_VERSION, JobSpec
from portq.tasks.core.errors import OlderVersionError
from pydantic import BaseModel

SCHEMAS: dict[str, type[BaseModel]] = {
    f"batch-report.v{REPORT_SCHEMA_VERSION}.json": BatchReport,
    f"job-report.v{REPORT_SCHEMA_VERSION}.json": JobReport,
    f"job-spec.v{JOB_SPEC_VERSION}.json": JobSpec,
    f"comparison.v{NIGHTLY_SCHEMA_VERSION}.json": Comparison,
    f"series-history.v{NIGHTLY_SCHEMA_VERSION}.json": SeriesHistory,
}

_M = TypeVar("_M", bound=BaseModel)

#: Older versions this portq still reads, because the newer one only added optional fields: a report of version 2
#: (before paired timing) reads as version 3 without a speedup interval.
STILL_READ: dict[type[BaseModel], set[int]] = {JobReport: {2}, BatchReport: {2}}


def read_versioned(model: type[_M], data: Any, where: str) -> _M:
    """Validate stored data, telling an older portq's file apart from a damaged one.

    Jobs and reports carry their schema version (`version` in a spec, `schema_version` in a report); data
    written by another version is refused with a sentence that says so, not with a validation dump.
    """
    field = "version" if "version" in model.model_fields else "schema_version"
    expected = model.model_fields[field].default
    found = data.get(field) if isinstance(data, dict) else None
    if isinstance(found, int) and found in STILL_READ.get(model, set()):
        data = upgraded(data, field, expected)
    elif isinstance(found, int) and found != expected:
        what = {JobSpec: "job spec", JobReport: "job report", BatchReport: "batch report",
                SeriesEntry: "series entry"}.get(model, model.__name__)
        age = "an older" if found < expected else "a newer"
        raise OlderVersionError(
            f"{where} is a {what} of schema version {found}, written by {age} portq; this portq reads version "
            f"{expected}", step="read", file=where,
            hint=f"submit the models again (a new batch) to get version-{expected} results, or read this store "
                 "with the portq that wrote it" if found < expected else "upgrade portq to read it")
    return model.model_validate(data)


def upgraded(data: dict[str, Any], field: str, version: int) -> dict[str, Any]:
    """An older report as the current version: its own fields, and the newer version's number (recursively for a
    batch's job reports)."""
    out = {**data, field: version}
    for key, value in out.items():
        if isinstance(value, list):
            out[key] = [upgraded(v, field, version) if isinstance(v, dict) and field in v else v for v in value]
    return out


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
