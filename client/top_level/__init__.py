"""portq: convert PyTorch models to ONNX, TorchScript, ExportedProgram and AOTInductor, with parity and latency
evidence, on a job queue or right here.

    import portq

    report = portq.submit(["models/bert.pt2"], formats=["onnx"], wait=True)
    print(report.counts, [(job.model, job.best) for job in report.jobs])

`submit`, `status`, `report` and `wait` are `portq.client.api`'s (the `portq` command uses the same functions);
their results are the job contract's typed objects, and their errors the `PortqError` hierarchy. Importing
portq imports neither torch nor Celery.
"""

from portq.client.api import ModelSource, report, settings, status, submit, summary_pages, wait
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
from portq.tasks.core.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "ArtifactReport", "BatchJob", "BatchProgress", "BatchReport", "ConfigError", "ConversionError", "Format",
    "InputError", "JobRecord", "JobReport", "JobStatus", "ModelLoadError", "ModelSource", "PortqError", "Precision",
    "Settings", "StoreError", "Target", "ToleranceMode", "TransientError", "WaitTimeout", "report", "settings",
    "status", "submit", "summary_pages", "wait",
]
