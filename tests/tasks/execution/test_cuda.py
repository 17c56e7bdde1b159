"""CUDA paths, run only where a CUDA device is visible (`pytest -m gpu`); skipped on CPU machines and in CI.

What they check: a cuda job really runs on the GPU (source and artifacts), TorchScript, ExportedProgram
and AOTInductor artifacts pass parity there, the ONNX step either runs on onnxruntime's CUDA provider or
fails saying it has none (never CPU numbers reported as GPU numbers), and a step in an isolated child
process can use CUDA although the worker process already initialised it.
"""

import pytest
import torch
from portq.tasks.core.contract import Format, JobStatus, StepStatus
from portq.tasks.core.settings import Settings
from portq.tasks.execution.isolation import isolation_for
from portq.tasks.execution.run import run_job
from portq.tasks.state.store import Store

from tests.jobs import prepare

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("isolate", [False, True])
def test_cuda_job_runs_on_the_gpu(example_models, tmp_path, isolate):
    store = Store(str(tmp_path / "store"))
    formats = [Format.onnx, Format.torchscript, Format.pt2, Format.aoti]
    sub = prepare([str(example_models["convnet"])], store, batch="cuda", max_bytes=1 << 30,
                  options={"target": "cuda", "formats": formats})
    settings = Settings.resolve(env={}, isolate=isolate)
    torch.zeros(1, device="cuda")  # the calling process has CUDA initialised, as a GPU worker's would
    report = run_job(sub.specs[0], store, isolation=isolation_for(settings))
    assert_ran_on_the_gpu(report)


def assert_ran_on_the_gpu(report) -> None:
    """What proves the GPU ran, not just that the job asked for it: the GPU in the fingerprint, CUDA memory
    allocated while the source and each artifact ran, and onnxruntime's CUDA provider (or its refusal)."""
    gpu = report.environment.get("gpu") or {}
    assert gpu.get("name") and gpu.get("cuda_runtime"), report.environment
    by_format = {a.format: a for a in report.artifacts}
    for fmt in (Format.torchscript, Format.pt2, Format.aoti):
        art = by_format[fmt]
        assert art.status is StepStatus.succeeded, art.error
        assert art.parity.passed and art.parity.device == "cuda"
        assert art.latency.device == "cuda" and art.latency.p50_ms > 0
        assert art.latency.memory.cuda_peak_mb > 0 and art.latency.source_memory.cuda_peak_mb > 0
    onnx = by_format[Format.onnx]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert onnx.status is StepStatus.succeeded and onnx.latency.device == "cuda"
        assert onnx.latency.providers[0] == "CUDAExecutionProvider"
    else:
        assert onnx.status is StepStatus.failed and "no CUDAExecutionProvider" in onnx.error
        assert report.status is JobStatus.failed
