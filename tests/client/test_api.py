"""`import portq`: the Python API, in this process (the embedded default) and through Redis and a real worker.

Same settings resolution and errors as the CLI (which is built on it): keyword arguments, then PORTQ_*
variables, then defaults; PortqError subclasses, never a pydantic dump or a sys.exit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import portq
import pytest
import torch
from torch import nn

FAST = {"runs": 3, "warmup": 1}


@pytest.fixture
def here(monkeypatch: pytest.MonkeyPatch, store_dir: Path) -> Path:
    """The embedded default, steps in this process (PORTQ_ISOLATE=0, read from the environment)."""
    for var in ("PORTQ_BROKER_URL", "PORTQ_STORE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PORTQ_ISOLATE", "0")
    return store_dir


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).relu()


def test_files_and_an_in_memory_module_in_one_batch(here: Path, example_models: dict[str, Path]) -> None:
    seen: list[portq.BatchProgress] = []
    report = portq.submit([example_models["mlp"], Tagger()], example_inputs=(torch.randn(2, 8),), batch="api",
                          formats=["onnx", "torchscript"], dynamic=["batch"], store=str(here), progress=seen.append,
                          **FAST)
    assert isinstance(report, portq.BatchReport) and report.batch == "api" and report.store == str(here)
    assert report.counts["succeeded"] == 2, [j.error for j in report.jobs]
    by_model = {job.model: job for job in report.jobs}
    assert by_model["mlp"].source == str(example_models["mlp"])
    tagger = by_model["tagger"]
    assert tagger.source == "<in-memory Tagger> (saved by torch.export)"
    assert {a.id for a in tagger.artifacts} == {"onnx", "torchscript"} and all(a.parity.passed for a in
                                                                               tagger.artifacts)
    assert tagger.artifacts[0].parity.samples >= 3  # the dynamic batch was exported dynamic: parity at two sizes
    # the progress callback saw every job finish, once
    assert sorted(r.model for state in seen for r in state.finished_now) == ["mlp", "tagger"]
    # status, report and wait read the same batch back (wait returns at once: it has finished)
    assert [r.status.value for r in portq.status("api", store=str(here))] == ["succeeded", "succeeded"]
    assert portq.report("api", store=str(here)) == portq.wait("api", store=str(here), timeout=5)
    assert Path(portq.summary_pages("api", store=str(here))["html"]).is_file()


def test_errors_are_portqs(here: Path, example_models: dict[str, Path]) -> None:
    with pytest.raises(portq.ConfigError, match=r"\[step submit\] latency.runs: Input should be greater") as e:
        portq.submit([example_models["mlp"]], runs=0, store=str(here))
    assert "pydantic" not in e.value.message and "Value error" not in e.value.message
    with pytest.raises(portq.ConfigError, match="batch name '../x' is not a valid id"):
        portq.submit([example_models["mlp"]], batch="../x", store=str(here))
    with pytest.raises(portq.InputError, match="needs example inputs") as missing:
        portq.submit([Tagger()], store=str(here))
    assert "example_inputs=(tensor, ...)" in missing.value.message
    with pytest.raises(portq.ConfigError, match="no batch 'nosuch'"):
        portq.status("nosuch", store=str(here))
    with pytest.raises(portq.ConfigError, match=r"\[step settings\] broker_url: broker URL must be redis://"):
        portq.submit([example_models["mlp"]], broker="http://nope", store=str(here))
    assert not (here / "batches" / "../x").exists()


def test_optimize_fuse_and_compare_check_their_requests_as_the_commands_do(here: Path,
                                                                          example_models: dict[str, Path]) -> None:
    mlp = str(example_models["mlp"])
    with pytest.raises(portq.ConfigError, match=r"\[step optimize\] .*mlp.* is not an ONNX file"):
        portq.optimize([mlp], store=str(here))
    with pytest.raises(portq.ConfigError,
                       match=r"\[step fuse\] unknown fusion method 'blend'; known: breadcrumbs, chain"):
        portq.fuse([mlp, mlp], method="blend", store=str(here))
    with pytest.raises(portq.ConfigError, match=r"\[step fuse\] method: Field required"):
        portq.fuse([mlp, mlp], store=str(here))
    with pytest.raises(portq.PortqError, match=r"\[step compare\] no batch 'a'"):
        portq.compare("a", "b", store=str(here))
    with pytest.raises(portq.ConfigError, match=r"timeout: Input should be greater than or equal to 0"):
        portq.submit([mlp], timeout=-1, store=str(here))
    assert not (here / "batches").exists()


@pytest.mark.queue
def test_through_redis_and_a_worker(example_models: dict[str, Path], start_worker, queue_db: str,
                                    store_dir: Path) -> None:
    start_worker("cpu")
    states: list[portq.BatchProgress] = []
    report = portq.submit([example_models["mlp"], example_models["textcls"]], batch="q", broker=queue_db,
                          store=str(store_dir), progress=states.append, timeout=240, **FAST)
    assert report.counts["succeeded"] == 2, [j.error for j in report.jobs]
    assert all(job.result and job.artifacts[0].parity.passed for job in report.jobs)
    # the records carried the step each running job was in
    steps = {r.step for s in states for r in s.running}
    assert {"load", "source"} & steps or any(s and s.startswith(("export:", "parity:", "latency:")) for s in steps)


@pytest.mark.queue
def test_wait_times_out_with_the_jobs_left(example_models: dict[str, Path], queue_db: str, store_dir: Path) -> None:
    queued = portq.submit([example_models["mlp"]], batch="nobody", broker=queue_db, store=str(store_dir), wait=False)
    assert [j.status.value for j in queued.jobs] == ["queued"]  # no worker is listening
    with pytest.raises(portq.WaitTimeout, match="1 job\\(s\\) still unfinished"):
        portq.wait("nobody", store=str(store_dir), timeout=1)


def test_a_script_without_a_main_guard_runs_isolated_steps_once(tmp_path: Path) -> None:
    """A user's script that calls portq.submit at its top level (no `if __name__ == "__main__":`): each isolated
    step's process must not import the script again (multiprocessing's default), which submitted the batch
    again from inside the step and failed it."""
    import os
    import subprocess
    import sys

    script = tmp_path / "convert.py"
    marker = tmp_path / "runs.txt"
    script.write_text(
        "import torch, portq\n"
        f"open({str(marker)!r}, 'a').write('run\\n')\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 3))\n"
        f"report = portq.submit(model, example_inputs=torch.randn(2, 4), store={str(tmp_path / 'store')!r},"
        " runs=3, warmup=1)\n"
        "print('STATUS', report.jobs[0].status.value, report.jobs[0].error)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTQ_")}  # isolated steps: the default
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert "STATUS succeeded None" in res.stdout, res.stdout + res.stderr[-3000:]
    assert marker.read_text() == "run\n"  # the script ran once: no step process imported it again


def test_import_portq_loads_nothing_until_a_name_is_used():
    code = ("import sys, portq; assert 'portq.client.api' not in sys.modules; "
            "from portq import submit, JobStatus, Settings; assert 'portq.client.api' in sys.modules; "
            "assert portq.submit is submit and JobStatus.succeeded.value == 'succeeded'; "
            "assert set(portq.__all__) <= set(dir(portq)); assert portq.client.api.submit is submit; "
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_a_hugging_face_folder_takes_its_options_as_keyword_arguments(here: Path, tmp_path: Path) -> None:
    """The folder's options reach its source description; a task the model has no head for is refused, one line."""
    from portq.client.api import job_options
    from portq.tasks.core.requests import ConvertRequest

    _, load = job_options(ConvertRequest(task="fill-mask", sequence_length=64, batch_size=4, trust_remote_code=True))
    assert {k: load[k] for k in ("task", "sequence_length", "batch_size", "trust_remote_code")} == {
        "task": "fill-mask", "sequence_length": 64, "batch_size": 4, "trust_remote_code": True}
    folder = tmp_path / "my-bert"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    (folder / "model.safetensors").write_bytes(b"never read: the task is refused first")
    with pytest.raises(portq.ConfigError) as e:  # a path mistake: refused before anything is queued
        portq.submit(folder, task="image-classification", batch="hf", store=str(here))
    assert e.value.message == (f"[step submit, file {folder}] BertForSequenceClassification does not support --task "
                               "image-classification; it supports: text-classification, feature-extraction")
    assert not (here / "batches" / "hf").exists()
