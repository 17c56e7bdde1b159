"""portq: convert PyTorch models to ONNX, TorchScript, ExportedProgram and AOTInductor, with parity and latency
evidence, on a job queue or right here.

    import portq

    report = portq.submit(["models/bert.pt2"], formats=["onnx"], wait=True)
    print(report.counts, [(job.model, job.best) for job in report.jobs])

`submit`, `optimize`, `fuse`, `compare`, `status`, `report`, `wait`, `package` and `verify` are
`portq.client.api`'s (the `portq` command uses the same functions); their options are the request models' fields
(`ConvertRequest`, `OptimizeRequest`, `FuseRequest`, `PackageRequest`: the flags of the commands of the same
names), their results the job contract's typed objects, and their errors the `PortqError` hierarchy. Importing
portq imports neither torch nor Celery, nor anything else until a name is used: every process that imports any
part of portq (the command, a worker, a step's forkserver) starts without loading the API it may not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from portq.client.api import (
        ModelSource,
        compare,
        fuse,
        optimize,
        package,
        report,
        settings,
        status,
        submit,
        summary_pages,
        verify,
        wait,
    )
    from portq.client.progress import BatchProgress
    from portq.tasks.core.contract import (
        ArtifactReport,
        BatchJob,
        BatchReport,
        Format,
        JobRecord,
        JobReport,
        JobStatus,
        Precision,
        Target,
        ToleranceMode,
    )
    from portq.tasks.core.errors import (
        ConfigError,
        ConversionError,
        InputError,
        ModelLoadError,
        PortqError,
        StoreError,
        TransientError,
        WaitTimeout,
    )
    from portq.tasks.core.requests import ConvertRequest, FuseRequest, OptimizeRequest, PackageRequest
    from portq.tasks.core.settings import Settings

__version__ = "0.1.0"

#: where each public name lives, imported on first use (PEP 562)
_HOMES = {
    **dict.fromkeys(["ModelSource", "compare", "fuse", "optimize", "package", "report", "settings", "status",
                     "submit", "summary_pages", "verify", "wait"], "portq.client.api"),
    **dict.fromkeys(["ConvertRequest", "FuseRequest", "OptimizeRequest", "PackageRequest"],
                    "portq.tasks.core.requests"),
    "BatchProgress": "portq.client.progress",
    **dict.fromkeys(["ArtifactReport", "BatchJob", "BatchReport", "Format", "JobRecord", "JobReport", "JobStatus",
                     "Precision", "Target", "ToleranceMode"], "portq.tasks.core.contract"),
    **dict.fromkeys(["ConfigError", "ConversionError", "InputError", "ModelLoadError", "PortqError", "StoreError",
                     "TransientError", "WaitTimeout"], "portq.tasks.core.errors"),
    "Settings": "portq.tasks.core.settings",
}

__all__ = [
    "ArtifactReport", "BatchJob", "BatchProgress", "BatchReport", "ConfigError", "ConversionError", "ConvertRequest",
    "Format", "FuseRequest", "InputError", "JobRecord", "JobReport", "JobStatus", "ModelLoadError", "ModelSource",
    "OptimizeRequest", "PackageRequest", "PortqError", "Precision", "Settings", "StoreError", "Target",
    "ToleranceMode", "TransientError", "WaitTimeout", "compare", "fuse", "optimize", "package", "report", "settings",
    "status", "submit", "summary_pages", "verify", "wait",
]
assert sorted(__all__) == sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in ("client", "tasks", "worker"):  # the subpackages, as attributes, before anything imported them
        return importlib.import_module(f"portq.{name}")
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'portq' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next use is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
