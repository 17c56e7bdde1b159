"""Artifact formats, one package each (`onnx`, `torchscript`, `exported_program`, `aoti`), registered by name in
`FORMATS`. Each package holds its handler, export recipes, variants (with their configs), and localisation; beside
them sit the registry (`base`), planning (`selection`), hardware checks, the shared export recipes (`recipes`,
`rewrites`, `unfuse`) and the reproduce-script writer (`reproduce`).

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
