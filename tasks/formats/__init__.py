"""Artifact formats, one module each, registered by name in `FORMATS`.

Importing this package registers every format; none of the modules imports torch at load time.
"""

from portq.tasks.formats import aoti, exported_program, onnx, torchscript  # noqa: F401  (registration)
from portq.tasks.formats.base import (
    FORMATS,
    ExportRequest,
    ExportResult,
    FormatHandler,
    Route,
    RoutesExhausted,
    artifact_requests,
    attempt_reports,
)

__all__ = ["FORMATS", "ExportRequest", "ExportResult", "FormatHandler", "Route",
           "RoutesExhausted", "artifact_requests", "attempt_reports"]
