"""Fuse jobs end to end in process (run_job, the embedded default's code): every method fused, converted and
reported; what needs the models loaded refused at step `fuse`; a fine-tune rebuilt identically in a step's
child process."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from portq.tasks.core.contract import JobStatus, StepStatus
from portq.tasks.execution.isolation import ChildProcess
from portq.tasks.execution.run import run_job
from portq.tasks.fusion.methods import FUSION_METHODS
from portq.tasks.state.store import Store
from torch import nn

from tests.tasks.fusion.helpers import (
    ARCH,
    SmallNet,
    fine_tunes,
    fuse_spec,
    ref_vote,
    save_data,
    save_scripts,
    save_state_dicts,
    separable_data,
)

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base classifier and three fine-tunes of it (state dicts), eval data labelled by the base."""
    d = tmp_path_factory.mktemp("fuse")
    torch.manual_seed(0)
    base = SmallNet().eval()
    tunes = fine_tunes(base, 3)
    with torch.no_grad():
        labels = base(X).argmax(1)
    return {"base": save_state_dicts(d / "base", [base], "base")[0],
            "members": save_state_dicts(d / "tunes", tunes), "modules": tunes,
            "eval": save_data(d / "eval.npz", X, labels), "dir": d}


CASES = {  # method -> (members (from the fine-tunes), extra request)
    "ensemble": (3, {"params": {"weights": [1.0, 2.0, 1.0]}}),
    "vote": (3, {}),
    "concat": (2, {}),
    "stack": (2, {}),
    "soup": (3, {}),
    "greedy-soup": (3, {"eval": True}),
    "slerp": (2, {"params": {"t": 0.3}}),
    "task-arithmetic": (2, {"base": True, "params": {"scale": 0.8}}),
    "ties": (3, {"base": True, "params": {"density": 0.5}}),
    "breadcrumbs": (2, {"base": True, "params": {"density": 0.8, "gamma": 0.1}}),
}


def _job_outputs(report, artifact_id: str) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """The job's parity samples and the ONNX artifact's outputs on them."""
    data = np.load(f"{report.result}/reproduce_inputs.npz")
    samples = [[data[f"s{i}_0"]] for i in range(len({k.split('_')[0] for k in data.files}))]
    session = ort.InferenceSession(report.url(report.artifact(artifact_id).path), providers=["CPUExecutionProvider"])
    return samples, [session.run(None, {"x": s[0]})[0] for s in samples]


def _combine(method: str, outs: list[np.ndarray], params: dict) -> np.ndarray:
    """What the members' outputs, run one by one here, combine to: written apart from portq's own check."""
    if method == "ensemble":
        w = np.asarray(params["weights"]) / np.sum(params["weights"])
        return sum(wi * o for wi, o in zip(w, outs))
    if method == "vote":
        return ref_vote(outs)
    if method == "concat":
        return np.concatenate(outs, axis=-1)
    return np.stack(outs, axis=1)


@pytest.mark.parametrize("method", sorted(CASES))
def test_every_method_fuses_converts_and_reports(method, files, tmp_path):
    count, extra = CASES[method]
    store = Store(str(tmp_path / "store"))
    spec = fuse_spec(store, files["members"][:count], method, params=extra.get("params"),
                     base=files["base"] if extra.get("base") else None,
                     eval_data=files["eval"] if extra.get("eval") else None, formats=["onnx", "torchscript"])
    report = run_job(spec, store)
    assert report.status is JobStatus.succeeded, report.error
    assert report.source == f"fuse({method}: " + ", ".join(f"m{i}.pt" for i in range(count)) + \
        ("; base base0.pt)" if extra.get("base") else ")")
    assert all(a.status is StepStatus.succeeded and a.parity.passed for a in report.artifacts)
    fusion = report.fusion
    assert fusion is not None and fusion.method == method and [m.name for m in fusion.members] == \
        [f"m{i}.pt" for i in range(count)]
    assert fusion.space == FUSION_METHODS.get(method).space
    samples, got = _job_outputs(report, "onnx")
    if fusion.space == "output":  # one graph computing what the members compute together
        assert fusion.combine_check.passed and fusion.combine_check.samples == len(samples)
        for sample, out in zip(samples, got):
            with torch.no_grad():
                member_outs = [m(torch.from_numpy(sample[0])).numpy() for m in files["modules"][:count]]
            expected = _combine(method, member_outs, fusion.params)
            if method == "vote":
                assert out.dtype == np.int64 and np.array_equal(out, expected)
            else:
                np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    else:  # one model, at a measured distance from each member
        assert fusion.bn_stats == "none" and fusion.combine_check is None
        assert all(m.max_abs_diff is not None and m.max_abs_diff > 0 and m.top1_agreement is not None
                   for m in fusion.members)
    if method == "greedy-soup":
        assert fusion.metric == "accuracy" and fusion.soup_score is not None and fusion.greedy_steps
        assert fusion.fused_score == pytest.approx(fusion.soup_score)
        assert all(m.score is not None and m.kept is not None for m in fusion.members)
    if FUSION_METHODS.get(method).needs_base:
        assert fusion.base.name == "base0.pt" and fusion.base.max_abs_diff is not None
    text = open(f"{report.result}/report.md").read()
    assert "## fusion" in text and f"- method: **{method}, " in text


def test_chain_feeds_one_member_into_the_next(tmp_path):
    torch.manual_seed(0)
    enc, head = nn.Sequential(nn.Linear(4, 5), nn.Tanh()).eval(), SmallNet(d_in=5).eval()
    paths = save_scripts(tmp_path / "m", [enc], torch.randn(6, 4), stem="enc") + \
        save_scripts(tmp_path / "m", [head], torch.randn(6, 5), stem="head")
    store = Store(str(tmp_path / "store"))
    report = run_job(fuse_spec(store, paths, "chain", arch=False, formats=["onnx", "pt2"]), store)
    assert report.status is JobStatus.succeeded, report.error
    assert report.fusion.combine_check.passed
    samples, got = _job_outputs(report, "onnx")
    with torch.no_grad():
        for sample, out in zip(samples, got):
            np.testing.assert_allclose(out, head(enc(torch.from_numpy(sample[0]))).numpy(), rtol=1e-4, atol=1e-5)
    # TorchScript members: the fused model is traced, and every format converts it
    assert {a.id: a.route for a in report.artifacts} == {"onnx": "torchscript", "pt2": "export"}


def test_greedy_soup_report_shows_the_member_that_hurts_left_out(tmp_path):
    x, y = separable_data(n=64)
    weights = {"okay": ([[-1.0, -1.0], [1.0, 1.0]], [0.5, -0.5]), "bad": ([[5.0, 5.0], [-5.0, -5.0]], [0.0, 0.0]),
               "good": ([[-1.0, -1.0], [1.0, 1.0]], [0.0, 0.0])}
    paths = []
    for name, (w, b) in weights.items():
        torch.save({"weight": torch.tensor(w), "bias": torch.tensor(b)}, tmp_path / f"{name}.pt")
        paths.append(str(tmp_path / f"{name}.pt"))
    store = Store(str(tmp_path / "store"))
    spec = fuse_spec(store, paths, "greedy-soup", eval_data=save_data(tmp_path / "eval.npz", x, y),
                     params={"metric": "accuracy"}, formats=["torchscript"],
                     load={"arch": "torch.nn:Linear", "arch_kwargs": {"in_features": 2, "out_features": 2}},
                     options={"inputs": [{"name": "x", "dtype": "float32", "shape": [4, 2]}], "dynamic": []})
    report = run_job(spec, store)
    assert report.status is JobStatus.succeeded, report.error
    f = report.fusion
    assert {m.name: m.kept for m in f.members} == {"okay.pt": True, "bad.pt": False, "good.pt": True}
    assert [s.candidate for s in f.greedy_steps] == ["good.pt", "okay.pt", "bad.pt"]
    assert [s.accepted for s in f.greedy_steps] == [True, True, False]
    assert {m.name: m.score for m in f.members}["bad.pt"] == 0.0 and f.soup_score == 1.0 == f.fused_score


def test_a_fine_tune_lowers_the_loss_and_a_steps_child_rebuilds_the_same_model(files, tmp_path):
    x = torch.randn(128, 4, generator=torch.Generator().manual_seed(11))
    y = (x[:, 0] > x[:, 1]).long() + (x[:, 2] > 1).long()  # a task the fine-tunes were not made for
    store = Store(str(tmp_path / "store"))
    spec = fuse_spec(store, files["members"], "soup", eval_data=save_data(tmp_path / "eval.npz", x, y),
                     finetune={"data": save_data(tmp_path / "tune.npz", x, y), "epochs": 15, "lr": 0.05, "seed": 0},
                     formats=["onnx"])
    report = run_job(spec, store, isolation=ChildProcess())  # the step's process fuses and fine-tunes again
    assert report.status is JobStatus.succeeded, report.error
    (art,) = report.artifacts
    assert art.parity.passed and art.parity.max_abs_err < 1e-4  # the artifact of the child's model = the parent's
    t = report.fusion.finetune
    assert t.loss == "cross-entropy" and t.epochs == 15 and len(t.curve) == 15 and t.examples == 128
    assert t.curve[-1] < 0.7 * t.curve[0]
    assert report.fusion.fused_score > max(m.score for m in report.fusion.members)
    html = open(f"{report.result}/report.html").read()
    assert "fine-tune: mean cross-entropy loss per epoch" in html and "<polyline" in html


# ---------------------------------------------------------------------------- refused when the job starts


def _failure(tmp_path, paths, method, **kw):
    store = Store(str(tmp_path / "store"))
    report = run_job(fuse_spec(store, paths, method, arch=False, formats=["onnx"], **kw), store)
    assert report.status is JobStatus.failed and report.artifacts == [] and report.failure.step == "fuse"
    return report


def test_mismatched_architectures_name_the_parameter_and_both_shapes(tmp_path):
    paths = save_scripts(tmp_path, [SmallNet(hidden=8), SmallNet(hidden=6)], torch.randn(6, 4))
    report = _failure(tmp_path, paths, "soup")
    assert report.failure.file == "ts0.pt, ts1.pt"
    assert report.failure.cause == ("soup: architecture mismatch: parameter 'fc1.weight' has shape (8, 4) in "
                                    "'ts0.pt' but (6, 4) in 'ts1.pt'")


def test_incompatible_outputs_name_the_members_and_shapes(tmp_path):
    paths = save_scripts(tmp_path, [SmallNet(d_out=3), SmallNet(d_out=5)], torch.randn(6, 4))
    report = _failure(tmp_path, paths, "ensemble")
    assert report.failure.cause == ("ensemble: member 'ts1.pt' output has shape (6, 5) but member 'ts0.pt' output "
                                    "has shape (6, 3); ensemble needs identical output shapes")
    report = _failure(tmp_path, paths[::-1], "chain")
    assert report.failure.cause.startswith("chain: output of member 'ts1.pt' has shape (6, 5), which member "
                                           "'ts0.pt' cannot accept: ")


def test_labels_that_do_not_fit_the_outputs(tmp_path):
    paths = save_scripts(tmp_path, fine_tunes(SmallNet(), 2), torch.randn(6, 4))
    labels = torch.tensor([0, 1, 2, 7] * 4)
    report = _failure(tmp_path, paths, "soup", eval_data=save_data(tmp_path / "e.npz", torch.randn(16, 4), labels))
    assert report.failure.cause == "labels: label 7 is out of range for 3 classes (valid 0..2)"
    report = _failure(tmp_path, paths, "ensemble", finetune={
        "data": save_data(tmp_path / "t.npz", torch.randn(16, 4), torch.zeros(16, 2)), "epochs": 1})
    assert report.failure.cause == "finetune labels: target shape (16, 2) does not match output shape (16, 3)"


def test_calibration_recomputes_batch_norm_statistics(tmp_path):
    torch.manual_seed(0)
    nets = fine_tunes(SmallNet(bn=True).eval(), 2)
    paths = save_state_dicts(tmp_path / "m", nets)
    store = Store(str(tmp_path / "store"))
    spec = fuse_spec(store, paths, "soup", calibration=save_data(tmp_path / "c.npz", X), formats=["torchscript"],
                     load={"arch": ARCH, "arch_kwargs": {"bn": True}})
    report = run_job(spec, store)
    assert report.status is JobStatus.succeeded, report.error
    assert report.fusion.bn_stats == "recomputed"
    assert any("recomputed on 1 calibration batch" in n for n in report.fusion.notes)
