"""The source's evidence is plain data: it survives a pickle round trip (formats may run in a child process)."""

import pickle

import numpy as np
from portq.tasks.core.contract import JobSpec, SourceRef
from portq.tasks.execution.run import _run_source
from portq.tasks.sources.inputs import apply_dynamic, load_npz, resolve_signature
from portq.tasks.sources.loading import LoadRequest, load_model


def test_source_evidence_pickles(example_models):
    path = example_models["mlp"]
    model = load_model(LoadRequest(path=path, display="mlp.pt"))
    sig = resolve_signature([], load_npz(path.with_suffix(".npz"), "mlp.npz"), None, model.input_names, "mlp.pt")
    apply_dynamic(sig, ["batch"])
    spec = JobSpec(job_id="j", batch_id="b", model="mlp", source=SourceRef(key="k", name="mlp.pt", sha256="x", size=1),
                   latency={"warmup": 1, "runs": 2, "windows": 2, "min_window_ms": 0, "batch_sizes": [1, 3]})
    ev = _run_source(spec, model, sig, "cpu", "mlp.pt")
    again = pickle.loads(pickle.dumps(ev))
    assert again.batch_size == 4 and sorted(again.sweep) == [1, 3]
    assert again.sweep[3][0][0].shape == (3, 64) and again.sweep[3][1].batch_size == 3
    assert again.precision == "fp32" and again.user_samples == 1
    np.testing.assert_array_equal(again.reference[0][0][1], ev.reference[0][0][1])
    assert again.latency.p50_ms == ev.latency.p50_ms and again.memory == ev.memory
    assert again.environment["versions"] == ev.environment["versions"]
