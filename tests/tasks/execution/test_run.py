"""run_job end to end, in process: real torch, real onnxruntime, small models built in code."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from portq.tasks.core.contract import Format, InputSpec, JobStatus, StepStatus
from portq.tasks.execution.run import run_job
from portq.tasks.state import delivery
from portq.tasks.state import records as batches
from portq.tasks.state.store import Store

from tests.jobs import prepare


def submit(paths, store, **options):
    sub = prepare([str(p) for p in paths], store, batch="t", options=options, max_bytes=1 << 30)
    return sub


def test_examples_convert_to_onnx_with_passing_parity(example_models, tmp_path):
    store = Store(str(tmp_path / "store"))
    sub = submit(example_models.values(), store)
    for spec in sub.specs:
        report = run_job(spec, store)
        assert report.status is JobStatus.succeeded, report.error
        (art,) = report.artifacts
        assert art.format is Format.onnx and art.status is StepStatus.succeeded
        assert art.parity.passed and art.parity.samples >= 3
        assert art.latency.p50_ms > 0 and art.latency.source_p50_ms > 0
        # the source's numbers beside the artifact are those its comparison timed, not another moment's
        assert art.latency.source.window_medians_ms == art.latency.comparison.source_blocks_ms
        assert art.latency.source.first_run_ms is not None and art.latency.source.runs >= art.latency.comparison.pairs
        # the artifact is where the report says, loads in onnxruntime and runs on the recorded inputs
        assert art.path == "onnx/model.onnx" and report.result == store.url(f"results/{report.job_key}")
        session = ort.InferenceSession(report.url(art.path), providers=["CPUExecutionProvider"])
        assert len(session.get_outputs()) == len(art.parity.outputs)
        on_disk = json.loads(open(store.url(f"results/{report.job_key}/report.json")).read())
        assert on_disk["status"] == "succeeded" and on_disk["artifacts"][0]["path"] == "onnx/model.onnx"


def test_reference_is_independent_of_portq(tmp_path):
    """Parity numbers agree with a direct torch-vs-onnxruntime computation."""
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x @ x.transpose(0, 1))

    x = np.random.default_rng(3).standard_normal((3, 5)).astype(np.float32)
    torch.jit.save(torch.jit.trace(M(), torch.from_numpy(x)), tmp_path / "m.pt")
    np.savez(tmp_path / "m.npz", x=x)
    store = Store(str(tmp_path / "store"))
    (spec,) = submit([tmp_path / "m.pt"], store, parity={"random_samples": 0}).specs
    report = run_job(spec, store)
    (art,) = report.artifacts
    expected = np.tanh(x @ x.T)
    got = ort.InferenceSession(report.url(art.path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert art.parity.samples == 1
    assert art.parity.max_abs_err == pytest.approx(float(np.abs(got - expected).max()), abs=1e-6)


def test_all_formats_on_a_program(example_models, tmp_path):
    store = Store(str(tmp_path / "store"))
    (spec,) = submit([example_models["convnet"]], store,
                     formats=[Format.onnx, Format.torchscript, Format.pt2]).specs
    report = run_job(spec, store)
    assert report.status is JobStatus.succeeded, report.error
    assert {a.format for a in report.artifacts} == {Format.onnx, Format.torchscript, Format.pt2}
    assert all(a.parity.passed for a in report.artifacts)


def test_second_run_is_served_from_the_cache(example_models, tmp_path):
    store = Store(str(tmp_path / "store"))
    first = run_job(submit([example_models["mlp"]], store).specs[0], store)
    second = run_job(submit([example_models["mlp"]], store).specs[0], store)
    assert not first.cached and second.cached
    assert second.url(second.artifacts[0].path) == first.url(first.artifacts[0].path)
    forced = run_job(submit([example_models["mlp"]], store, force=True).specs[0], store)
    assert not forced.cached and forced.result != first.result
    assert forced.artifacts[0].path == first.artifacts[0].path  # relative inside each job's folder


def test_redelivery_of_a_finished_job_does_not_run_it_again(example_models, tmp_path):
    from portq.client.dispatch import run_here

    store = Store(str(tmp_path / "store"))
    (spec,) = submit([example_models["mlp"]], store).specs
    first = run_job(spec, store)
    assert not delivery.admit(store, spec, max_attempts=3).run
    run_here([spec], store)  # the embedded default asks the same question
    record = batches.read_record(store, spec.batch_id, spec.job_id)
    assert record.attempts == 1 and record.status is JobStatus.succeeded
    assert batches.read_report(store, record).finished_at == first.finished_at


def test_a_variant_is_an_artifact_of_its_own(example_models, tmp_path):
    """onnx.opset17 goes through the same path as onnx: its own folder, script, report entry and options."""
    import onnx

    store = Store(str(tmp_path / "store"))
    (spec,) = submit([example_models["mlp"]], store, formats=["onnx", "onnx.opset17"]).specs
    report = run_job(spec, store)
    assert report.status is JobStatus.succeeded, report.error
    arts = {a.id: a for a in report.artifacts}
    assert set(arts) == {"onnx", "onnx.opset17"}
    v17 = arts["onnx.opset17"]
    assert (v17.format, v17.variant, v17.options["opset"], v17.opset) == (Format.onnx, "opset17", 17, 17)
    assert v17.path == "onnx.opset17/model.onnx" and v17.reproduce == "onnx.opset17/reproduce_onnx.opset17.py"
    versions = {i: [o.version for o in onnx.load(report.url(a.path)).opset_import if o.domain in ("", "ai.onnx")]
                for i, a in arts.items()}
    assert versions == {"onnx": [18], "onnx.opset17": [17]}
    assert report.best in arts and arts[report.best].best


def test_inputs_that_do_not_fit_the_model(example_models, tmp_path):
    store = Store(str(tmp_path / "store"))
    bad = InputSpec.parse("x:float32[4,63]")
    (spec,) = submit([example_models["mlp"]], store, inputs=[bad]).specs
    # the sidecar .npz wins for the sample; give a wrong one instead
    spec.options.sample = None
    report = run_job(spec, store)
    assert report.status is JobStatus.failed
    assert report.failure.step == "inputs" and "mlp.pt" in report.error and "x:float32[4, 63]" in report.error
    assert store.exists(f"failed/{spec.job_id}/report.json")


def test_missing_inputs_say_what_to_do(tmp_path):
    m = torch.nn.Linear(3, 2)
    torch.jit.save(torch.jit.trace(m, torch.randn(1, 3)), tmp_path / "lin.pt")
    store = Store(str(tmp_path / "store"))
    report = run_job(submit([tmp_path / "lin.pt"], store).specs[0], store)
    assert report.status is JobStatus.failed
    assert "no example inputs" in report.error and "--input" in report.error and "lin.pt" in report.error


def test_bad_files_fail_alone(example_models, tmp_path):
    (tmp_path / "notes.pt").write_text("not a model")
    store = Store(str(tmp_path / "store"))
    sub = submit([tmp_path / "notes.pt", tmp_path / "absent.pt", example_models["mlp"]], store)
    assert [r.error for r in sub.rejected] == [f"[step submit, file {tmp_path / 'absent.pt'}] file does not exist"]
    reports = {s.model: run_job(s, store) for s in sub.specs}
    assert reports["mlp"].status is JobStatus.succeeded
    assert reports["notes"].status is JobStatus.failed
    assert reports["notes"].failure.step == "load" and "not a PyTorch model file" in reports["notes"].error
    states = {r.model: r.status for r in batches.list_records(store, "t")}
    assert states == {"notes": JobStatus.failed, "absent": JobStatus.failed, "mlp": JobStatus.succeeded}


def test_cuda_target_without_cuda_fails_clearly(example_models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    store = Store(str(tmp_path / "store"))
    (spec,) = submit([example_models["mlp"]], store, target="cuda").specs
    report = run_job(spec, store)
    assert report.status is JobStatus.failed and report.failure.kind == "device"
    assert "no CUDA device" in report.error and report.artifacts == []


def test_a_format_that_cannot_run_here_is_skipped_with_its_reason(example_models, tmp_path, monkeypatch):
    import portq.tasks.formats.aoti as aoti

    monkeypatch.setattr(aoti.shutil, "which", lambda name: None)  # a worker without a C++ compiler
    store = Store(str(tmp_path / "store"))
    (spec,) = submit([example_models["mlp"]], store, formats=[Format.onnx, Format.aoti]).specs
    report = run_job(spec, store)
    arts = {a.format: a for a in report.artifacts}
    aoti_art = arts[Format.aoti]
    assert aoti_art.id == "aoti" and aoti_art.status is StepStatus.skipped and "C++ compiler" in aoti_art.error
    assert arts[Format.onnx].status is StepStatus.succeeded
    assert report.status is JobStatus.succeeded  # a skipped format is reported, not a failure
