"""The source's evidence and a step's context are plain data: they survive a pickle round trip (an artifact's
step may run in a child process), and the context travels without the loaded model."""

import pickle
from pathlib import Path

import numpy as np
from portq.tasks.checks.evidence import SourceEvidence
from portq.tasks.core.contract import ArtifactRequest, ConvertSource, JobOptions, JobSpec, SourceRef
from portq.tasks.execution.source_run import gather_evidence
from portq.tasks.execution.steps import StepContext
from portq.tasks.sources.inputs import apply_dynamic, load_npz, resolve_signature
from portq.tasks.sources.loading import LoadRequest, load_model
from portq.tasks.state.store import Store


def test_source_evidence_and_step_context_pickle(example_models, tmp_path):
    path = example_models["mlp"]
    model = load_model(LoadRequest(path=path, display="mlp.pt"))
    sig = resolve_signature([], load_npz(path.with_suffix(".npz"), "mlp.npz"), None, model.input_names, "mlp.pt")
    apply_dynamic(sig, ["batch"])
    spec = JobSpec(job_id="j", batch_id="b", model="mlp",
                   source=ConvertSource(model=SourceRef(key="k", name="mlp.pt", sha256="x", size=1)),
                   options=JobOptions(latency={"warmup": 1, "runs": 2, "windows": 2, "min_window_ms": 0,
                                               "batch_sizes": [1, 3]}))
    ev = gather_evidence(spec, model, sig, "cpu")
    assert isinstance(ev, SourceEvidence)
    again = pickle.loads(pickle.dumps(ev))
    assert again.batch_size == 4 and sorted(again.sweep) == [1, 3]
    assert again.sweep[3][0][0].shape == (3, 64) and again.sweep[3][1].batch_size == 3
    assert again.precision == "fp32" and again.user_samples == 1
    np.testing.assert_array_equal(again.reference[0][0][1], ev.reference[0][0][1])
    # no timing of the source alone on the sample: each comparison times it beside its artifact
    assert not hasattr(again, "latency") and again.memory == ev.memory
    assert again.sweep[1][1].p50_ms == ev.sweep[1][1].p50_ms
    assert again.environment["versions"] == ev.environment["versions"]

    ctx = StepContext(spec=spec, request=ArtifactRequest.parse("onnx.opset17"), options={"opset": 17},
                      evidence=ev, out_dir=tmp_path / "onnx.opset17", store=Store(str(tmp_path / "store")),
                      source=model)
    sent = pickle.loads(pickle.dumps(ctx.without_source(tmp_path / ".step")))
    assert sent.source is None and sent.out_dir == Path(tmp_path / ".step")
    assert sent.store.root == ctx.store.root and sent.step("parity") == "parity:onnx.opset17"
    assert sent.spec == spec and sent.options == {"opset": 17}
