"""Format steps in a child process: real crashes, hangs and memory hogs cost one format, nothing else."""

import json
import os
import time
from pathlib import Path

import pytest
from portq.tasks.core.contract import Format, JobStatus, StepStatus
from portq.tasks.core.settings import Settings
from portq.tasks.execution.isolation import ChildProcess, InProcess, isolation_for
from portq.tasks.execution.run import run_job
from portq.tasks.state.store import Store

from tests.hostile import ARCH, write_state_dict
from tests.jobs import prepare


def job(store, path, formats, arch=None, arch_kwargs=None):
    options = {"formats": formats, "latency": {"runs": 3, "warmup": 1}}
    if arch:
        options["arch"] = f"{ARCH}:{arch}"
    if arch_kwargs:
        options["arch_kwargs"] = arch_kwargs
    (spec,) = prepare([str(path)], store, batch="iso", options=options, max_bytes=1 << 30).specs
    return spec


def artifacts(report):
    return {a.format: a for a in report.artifacts}


def test_a_segfault_during_export_costs_only_that_format(tmp_path):
    store = Store(str(tmp_path / "store"))
    spec = job(store, write_state_dict(tmp_path / "crash.pt"), [Format.onnx, Format.torchscript], "CrashOnExport")
    pid = os.getpid()
    report = run_job(spec, store, isolation=ChildProcess(time_limit_s=120))
    assert os.getpid() == pid  # this process lived through it
    arts = artifacts(report)
    onnx, ts = arts[Format.onnx], arts[Format.torchscript]
    assert onnx.status is StepStatus.failed and onnx.path is None
    assert "step export:onnx" in onnx.error and "crashed with SIGSEGV" in onnx.error and "crash.pt" in onnx.error
    assert ts.status is StepStatus.succeeded and ts.parity.passed
    # the job is failed (one format failed) and keeps the artifact that worked, and nothing of the dead step
    assert report.status is JobStatus.failed and "onnx" in report.error
    folder = tmp_path / "store" / "failed" / spec.job_id
    assert report.result == str(folder)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == [
        "job.log", "report.html", "report.json", "report.md", "reproduce_inputs.npz", "torchscript",
        "torchscript/model.torchscript.pt", "torchscript/provenance.intoto.json",
        "torchscript/reproduce_torchscript.py"]
    assert ts.path == "torchscript/model.torchscript.pt" and report.url(ts.path) == str(folder / ts.path)
    log = (folder / "job.log").read_text()
    assert "Fatal Python error: Segmentation fault" in log and "hostile.py" in log  # the stack at the crash


def test_a_hung_export_is_killed_at_the_step_time_limit(tmp_path):
    store = Store(str(tmp_path / "store"))
    spec = job(store, write_state_dict(tmp_path / "hang.pt"), [Format.pt2, Format.torchscript], "HangOnExport")
    start = time.monotonic()
    report = run_job(spec, store, isolation=ChildProcess(time_limit_s=4))
    arts = artifacts(report)
    assert "step export:pt2" in arts[Format.pt2].error
    assert "did not finish within its time limit of 4s" in arts[Format.pt2].error
    assert arts[Format.torchscript].status is StepStatus.succeeded
    assert time.monotonic() - start < 60


def test_a_step_over_the_memory_limit_is_killed(tmp_path):
    store = Store(str(tmp_path / "store"))
    spec = job(store, write_state_dict(tmp_path / "hog.pt"), [Format.pt2], "HogOnExport")
    # the child's baseline (torch and the exporters imported) is a few hundred MiB; the hog climbs to 8 GiB
    report = run_job(spec, store, isolation=ChildProcess(time_limit_s=120, memory_limit_bytes=1500 * 2**20))
    (art,) = report.artifacts
    assert art.status is StepStatus.failed
    assert "step export:pt2" in art.error and "over the step limit of 1500 MiB" in art.error


def test_isolated_and_in_process_results_agree(example_models, tmp_path):
    store = Store(str(tmp_path / "store"))
    here = run_job(job(store, example_models["mlp"], [Format.onnx]), store, isolation=InProcess())
    store2 = Store(str(tmp_path / "store2"))
    away = run_job(job(store2, example_models["mlp"], [Format.onnx]), store2, isolation=ChildProcess())
    (a,), (b,) = here.artifacts, away.artifacts
    assert a.status is b.status is StepStatus.succeeded
    assert (a.route, a.opset, a.size_bytes) == (b.route, b.opset, b.size_bytes)
    assert a.parity.max_abs_err == b.parity.max_abs_err and a.parity.samples == b.parity.samples
    assert a.path == b.path == "onnx/model.onnx"
    assert os.path.isfile(away.url(b.path)) and away.result == str(tmp_path / "store2" / "results" / away.job_key)
    on_disk = json.loads((tmp_path / "store2" / "results" / away.job_key / "report.json").read_text())
    assert on_disk["artifacts"][0]["path"] == b.path and on_disk["result"] == away.result


class TimeRunsOutDuringTheSource(ChildProcess):
    def source(self, *args):
        try:
            return super().source(*args)
        finally:
            self.deadline = time.monotonic()


def test_no_time_left_means_the_step_is_not_started(example_models, tmp_path):
    store = Store(str(tmp_path / "store"))
    report = run_job(job(store, example_models["mlp"], [Format.onnx, Format.torchscript]), store,
                     isolation=TimeRunsOutDuringTheSource())
    assert report.timings["source"] > 0  # the source ran; neither step did
    for art in report.artifacts:
        assert art.status is StepStatus.failed and "not started: the job's time limit was used up" in art.error
        assert f"step export:{art.id}" in art.error and "mlp.pt" in art.error
    assert report.status is JobStatus.failed


def test_no_time_left_means_the_source_is_not_started(example_models, tmp_path):
    store = Store(str(tmp_path / "store"))
    report = run_job(job(store, example_models["mlp"], [Format.onnx]), store,
                     isolation=ChildProcess(deadline=time.monotonic()))
    assert report.status is JobStatus.failed and report.artifacts == []
    assert report.failure.step == "load" and "not started: the job's time limit was used up" in report.error


@pytest.mark.parametrize("env, kind", [({"PORTQ_ISOLATE": "0"}, InProcess), ({}, ChildProcess)])
def test_isolation_follows_the_settings(env, kind):
    settings = Settings.resolve(env={**env, "PORTQ_TASK_TIME_LIMIT": "100", "PORTQ_STEP_TIME_LIMIT": "30"})
    iso = isolation_for(settings, started=time.monotonic())
    assert isinstance(iso, kind)
    if kind is ChildProcess:
        assert iso.time_limit_s == 30 and 90 < iso.deadline - time.monotonic() <= 100
        assert iso.budget() == 30


def test_the_step_limit_does_not_count_the_wait_for_a_forkserver_still_starting(example_models, tmp_path):
    """A fresh worker's first job waits for its forkserver's imports (seconds on a busy machine), before it times its
    source: that wait is not the step's, so a step limit shorter than it does not kill a good step. A fresh process
    (its own forkserver) whose forkserver imports a module that sleeps past the step limit."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    (tmp_path / "slow_preload.py").write_text("import time\ntime.sleep(12)\n")
    code = f"""
        import time
        from portq.tasks.execution import forkserver
        forkserver.PRELOAD = (*forkserver.PRELOAD, "slow_preload")
        import os
        from pathlib import Path

        from portq.tasks.core.contract import Format
        from portq.tasks.execution.isolation import ChildProcess
        from portq.tasks.execution.run import run_job
        from portq.tasks.state.store import Store
        from tests.jobs import prepare

        store = Store({str(tmp_path / "store")!r})
        options = {{"formats": [Format.torchscript], "latency": {{"runs": 3, "warmup": 1}}}}
        (spec,) = prepare([{str(example_models["mlp"])!r}], store, batch="iso", options=options,
                          max_bytes=1 << 30).specs
        start = time.monotonic()
        report = run_job(spec, store, isolation=ChildProcess(time_limit_s=6))
        (art,) = report.artifacts
        print("WAITED", report.timings["isolation"], art.timings["isolation"])
        print("RESULT", art.status.value, round(time.monotonic() - start, 1), art.error)
    """
    # the forkserver finds the slow module on its PYTHONPATH (it is not given the parent's sys.path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")} | {"PYTHONPATH": f"{root}:{tmp_path}"}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         cwd=root, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("RESULT")]
    status, seconds, error = line.split(" ", 3)[1:]
    assert float(seconds) > 12  # the job did wait for the forkserver's slow import ...
    assert status == "succeeded", error  # ... and its step was not killed for it
    # the job waited before it timed its source (the imports would have competed with the timing), not in the step
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("WAITED")]
    job_wait, step_wait = map(float, line.split()[1:])
    assert job_wait > 10 and step_wait < 5


def step_pids(record):
    """The pids of the processes other than this one that ran the model (the isolated steps' processes)."""
    return [int(line) for line in record.read_text().split() if int(line) != os.getpid()]


@pytest.mark.parametrize("reuse, leave_thread, processes", [(20, False, 1), (1, False, 6), (20, True, 6)])
def test_a_step_process_runs_the_next_steps_unless_a_step_leaves_something_behind(tmp_path, reuse, leave_thread,
                                                                                 processes):
    """Three formats of two jobs: one process runs all six steps, a fresh one runs each when reuse is off (1), and
    so it does when each step leaves a thread running. Each step still computes what the model does."""
    from portq.tasks.execution import step_process

    step_process.stop_idle()  # this test's steps start from a fresh process
    store = Store(str(tmp_path / "store"))
    record = tmp_path / "pids"
    iso = ChildProcess(time_limit_s=120, reuse=reuse)
    for name in ("a", "b"):
        spec = job(store, write_state_dict(tmp_path / f"{name}.pt"), [Format.torchscript, Format.onnx, Format.pt2],
                   "PidRecorder", {"record": str(record), "leave_thread": leave_thread})
        report = run_job(spec, store, isolation=iso)
        assert report.status is JobStatus.succeeded, report.error
        assert all(a.parity.passed for a in report.artifacts)
    assert len(set(step_pids(record))) == processes


def test_a_step_process_that_crashed_is_replaced_and_the_kept_one_ends_with_its_owner(tmp_path):
    """A crashed step's process is gone; the next step gets a new one, which is kept, and ends when the process
    that owns it exits (multiprocessing's exit handler would otherwise wait for it for ever)."""
    import subprocess
    import sys
    import textwrap

    import psutil

    root = Path(__file__).resolve().parents[3]
    record = tmp_path / "pids"
    code = f"""
        import os
        from pathlib import Path

        from portq.tasks.core.contract import Format
        from portq.tasks.execution.isolation import ChildProcess
        from portq.tasks.execution.run import run_job
        from portq.tasks.state.store import Store
        from tests.hostile import write_state_dict
        from tests.tasks.execution.test_isolation import job

        store = Store({str(tmp_path / "store")!r})
        crash = job(store, write_state_dict(Path({str(tmp_path / "crash.pt")!r})), [Format.onnx], "CrashOnExport")
        good = job(store, write_state_dict(Path({str(tmp_path / "good.pt")!r})), [Format.onnx, Format.torchscript],
                   "PidRecorder", {{"record": {str(record)!r}}})
        iso = ChildProcess(time_limit_s=120)
        (crashed,) = run_job(crash, store, isolation=iso).artifacts
        print("CRASHED", crashed.error)
        print("PARENT", os.getpid())
        print("GOOD", [a.status.value for a in run_job(good, store, isolation=iso).artifacts], flush=True)
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")} | {"PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "crashed with SIGSEGV" in res.stdout and "GOOD ['succeeded', 'succeeded']" in res.stdout, res.stdout
    parent = int(res.stdout.split("PARENT")[1].split()[0])
    kept = {int(pid) for pid in record.read_text().split()} - {parent}
    assert len(kept) == 1  # both steps ran in one process (not the crashed one, which is gone)
    (pid,) = kept
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_source_that_crashes_fails_its_job_and_nothing_else(tmp_path):
    """The source is built and run in the step process: a segfault in its own reference run fails the job, with its
    step and file, and this process (a worker's pool process, or the `portq` command) lives on."""
    store = Store(str(tmp_path / "store"))
    spec = job(store, write_state_dict(tmp_path / "crasher.pt"), [Format.onnx], "CrashUnless",
               {"marker": str(tmp_path / "never")})
    pid = os.getpid()
    report = run_job(spec, store, isolation=ChildProcess(time_limit_s=120))
    assert os.getpid() == pid
    assert report.status is JobStatus.failed and report.artifacts == []
    assert report.failure.step == "source" and report.failure.file.endswith("crasher.pt")
    assert "crashed with SIGSEGV" in report.error and "the job made no artifact" in report.error
    assert report.timings["isolation"] > 0  # the dead process's own stages died with it: the whole wait is here
    log = (tmp_path / "store" / "failed" / spec.job_id / "job.log").read_text()
    assert "isolated step for the source" in log and "Fatal Python error: Segmentation fault" in log


def test_a_source_error_comes_back_as_the_same_error(tmp_path):
    """An error the step process's source stage raises reaches the job as it was raised: its kind, step and file."""
    (tmp_path / "notes.pt").write_text("not a model")
    store = Store(str(tmp_path / "store"))
    here = run_job(job(store, tmp_path / "notes.pt", [Format.onnx]), store, isolation=InProcess())
    store2 = Store(str(tmp_path / "store2"))
    away = run_job(job(store2, tmp_path / "notes.pt", [Format.onnx]), store2, isolation=ChildProcess())
    assert here.status is away.status is JobStatus.failed
    assert here.failure == away.failure and away.failure.step == "load"
    assert "not a PyTorch model file" in away.error and "notes.pt" in away.error
    assert away.timings["load"] > 0 and "isolation" in away.timings


def test_under_isolation_the_job_process_never_imports_torch(example_models, tmp_path):
    """The source's load, inputs and timing run in the step process, which keeps the model for the job's steps: the
    job's own process (a worker's pool process, the `portq` command) imports neither torch nor onnxruntime, and the
    model is built once for the job."""
    import subprocess
    import sys
    import textwrap

    root = Path(__file__).resolve().parents[3]
    record = tmp_path / "pids"
    model = write_state_dict(tmp_path / "m.pt")  # here: tests.hostile imports torch
    code = f"""
        import sys

        from portq.tasks.execution.isolation import ChildProcess
        from portq.tasks.execution.run import run_job
        from portq.tasks.state.store import Store
        from tests.jobs import prepare

        store = Store({str(tmp_path / "store")!r})
        options = {{"formats": ["onnx", "torchscript"], "latency": {{"runs": 3, "warmup": 1}},
                    "arch": "{ARCH}:PidRecorder", "arch_kwargs": {{"record": {str(record)!r}}}}}
        (spec,) = prepare([{str(model)!r}], store, batch="iso", options=options, max_bytes=1 << 30).specs
        report = run_job(spec, store, isolation=ChildProcess(time_limit_s=120))
        print("STATUS", report.status.value, report.error)
        print("IMPORTED", sorted(m for m in ("torch", "onnxruntime", "onnx") if m in sys.modules))
        print("STAGES", sorted(report.timings))
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")} | {"PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    assert lines["STATUS"].startswith("succeeded"), lines["STATUS"]
    assert lines["IMPORTED"] == "[]"
    assert all(s in lines["STAGES"] for s in ("'load'", "'inputs'", "'source'", "'isolation'", "'artifacts'"))
    assert len(set(step_pids(record))) == 1  # the source, its reference runs and both steps: one process
