"""One artifact's step in a child process: a crash, hang or runaway memory costs only that artifact.

Converters crash processes in practice: on an H200 with torch 2.11, AOTInductor compiling a
half-precision model segfaulted the whole process. `ChildProcess` runs one format step (export,
session creation, parity and latency runs) in a fresh process and turns its death into a failed
`ArtifactReport` that says which step died and how ("[step export:aoti, ...] crashed with SIGSEGV");
the job keeps its other artifacts and reports, and the worker carries on.

The child is forked from a *forkserver* (`portq.tasks.execution.forkserver`): a process started once (per
worker process) that has torch and the exporters imported but has never touched CUDA. Forking a process after
CUDA was initialised is broken; a forkserver child starts clean, and fast because the heavy imports are
already done. The child receives the step's context without the model (models do not pickle reliably), builds
the source again through the job's source builder, writes into a private folder, and sends the
`ArtifactReport` back as JSON. The folder becomes the artifact's folder only when the step produced an
artifact; a dead step's partial files are discarded. Its output (and, on a crash, the Python stack from
`faulthandler`) is appended to the job's `job.log`.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from portq.tasks.core.contract import ArtifactReport, StepStatus
from portq.tasks.core.errors import IsolatedStepCrash, first_line
from portq.tasks.core.settings import Settings
from portq.tasks.execution.forkserver import allow_children, forkserver, main_not_reimported, mark_used, warm_up

if TYPE_CHECKING:
    from portq.tasks.execution.steps import StepContext

#: `portq.tasks.execution.steps.run_artifact`: (context) -> the artifact's report
Step = Callable[["StepContext"], ArtifactReport]

#: Seconds kept back from the job's time limit for what follows the steps (reports, publishing).
JOB_MARGIN_S = 5.0

#: Seconds a step's process that has sent its result gets to exit by itself before it is killed.
EXIT_GRACE_S = 10.0

_SIGNAL_MEANING = {
    "SIGSEGV": "segmentation fault in native code",
    "SIGABRT": "aborted, typically a failed C++ assertion or an uncaught C++ exception",
    "SIGBUS": "bus error in native code",
    "SIGFPE": "arithmetic fault in native code",
    "SIGILL": "illegal instruction (a kernel built for another CPU or GPU?)",
    "SIGKILL": "killed from outside, often by the out-of-memory killer",
}


class Isolation(Protocol):
    """How a job runs each of its artifact steps."""

    def prepare(self) -> None: ...

    def run_step(self, step: Step, ctx: StepContext) -> ArtifactReport: ...


@dataclass
class InProcess:
    """Run the step right here (PORTQ_ISOLATE=0): no overhead, no protection.

    `threads`: the job's CPU threads (`portq.tasks.checks.threads`); None leaves the libraries' defaults.
    """

    threads: int | None = None

    def prepare(self) -> None:
        from portq.tasks.checks import threads

        threads.apply(self.threads)

    def run_step(self, step: Step, ctx: StepContext) -> ArtifactReport:
        return step(ctx)


@dataclass
class ChildProcess:
    """Run each step in a forkserver child, within a time limit and optionally a memory limit.

    `deadline` (a `time.monotonic()` value) is when the job's own time limit runs out: a step never gets
    more time than is left, so the job always lives to record what happened.
    """

    time_limit_s: float | None = None
    memory_limit_bytes: int | None = None
    deadline: float | None = None
    poll_s: float = 0.05
    threads: int | None = None

    def budget(self) -> float | None:
        """Seconds the next step may run, or None for no limit."""
        limits = [self.time_limit_s] if self.time_limit_s else []
        if self.deadline is not None:
            limits.append(self.deadline - time.monotonic())
        return min(limits) if limits else None

    def prepare(self) -> None:
        """The job will run steps: start the forkserver now, while the job builds and times its source."""
        from portq.tasks.checks import threads

        warm_up()
        threads.apply(self.threads)  # the source is timed in this process, with the steps' thread count

    def run_step(self, step: Step, ctx: StepContext) -> ArtifactReport:
        budget = self.budget()
        if budget is not None and budget <= 1:
            return _failed(ctx, IsolatedStepCrash(
                "not started: the job's time limit was used up by the steps before it", step=ctx.step("export"),
                file=ctx.display, hint="raise PORTQ_TASK_TIME_LIMIT (and PORTQ_VISIBILITY_TIMEOUT above it)"))
        final_dir = ctx.out_dir
        workdir = final_dir.parent
        staging = workdir / f".step-{ctx.artifact_id}"
        log_path = workdir / f".step-{ctx.artifact_id}.log"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            outcome = self._run_child(step, ctx.without_source(staging), log_path, ctx.on_phase)
            if isinstance(outcome, ArtifactReport):
                if outcome.path:  # an artifact was written: its folder joins the job's files
                    shutil.rmtree(final_dir, ignore_errors=True)
                    os.replace(staging, final_dir)
                return outcome
            return _failed(ctx, outcome.at(file=ctx.display))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            _append_log(log_path, workdir, ctx.artifact_id)

    def _run_child(self, step: Step, ctx: StepContext, log_path: Path,
                   on_phase: Callable[[str], None] | None = None) -> ArtifactReport | IsolatedStepCrash:
        mark_used()
        proc_ctx = forkserver()
        recv, send = proc_ctx.Pipe(duplex=False)
        proc = proc_ctx.Process(target=_child_main, name=f"portq-step-{ctx.artifact_id}",
                                args=(send, step, ctx, str(log_path), self.threads))
        phase = ctx.step("export")
        allow_children(proc)
        with main_not_reimported():
            proc.start()  # returns once the forkserver has forked: after its imports, if it is still starting
        # The step's own limit counts from here: the wait for a forkserver still importing (seconds on a busy
        # machine, for a worker's first steps) is not the step's; the job's deadline still bounds both.
        start = time.monotonic()
        budget = self.budget()
        budget = None if budget is None else max(0.0, budget)
        send.close()  # the child holds the only writer now: EOF on `recv` means it is gone
        killed: str | None = None
        peak = 0
        try:
            while True:
                if recv.poll(self.poll_s):
                    try:
                        kind, value = recv.recv()
                    except (EOFError, OSError):
                        break  # the child exited (or died) without a result
                    if kind == "phase":
                        phase = value
                        if on_phase is not None:
                            on_phase(value)
                        continue
                    if kind == "result":
                        return ArtifactReport.model_validate_json(value)
                    return IsolatedStepCrash(f"failed in its own process: {value}", step=phase)
                if budget is not None and time.monotonic() - start > budget:
                    killed = (f"did not finish within its time limit of {budget:.0f}s; its process was killed "
                              "(PORTQ_STEP_TIME_LIMIT, bounded by what is left of PORTQ_TASK_TIME_LIMIT)")
                    break
                if self.memory_limit_bytes:
                    rss = _tree_rss(proc.pid)
                    peak = max(peak, rss)
                    if rss > self.memory_limit_bytes:
                        killed = (f"used {rss / 2**20:.0f} MiB of memory, over the step limit of "
                                  f"{self.memory_limit_bytes / 2**20:.0f} MiB (PORTQ_STEP_MEMORY_LIMIT); its process "
                                  "was killed")
                        break
        finally:
            if not killed:
                # a child that has reported ends on its own: its exit runs the finalizers that release what its
                # libraries made (multiprocessing semaphores, which the shared resource tracker would otherwise
                # report as leaked at shutdown); only one that hangs on the way out is killed
                proc.join(EXIT_GRACE_S)
            if killed or proc.is_alive():
                _kill_tree(proc)
            proc.join(10)
            recv.close()
        if killed:
            return IsolatedStepCrash(killed, step=phase, hint="the job's other artifacts are unaffected")
        return IsolatedStepCrash(_death(proc.exitcode), step=phase,
                                 hint="job.log holds the step's output and, for a crash, the Python stack at the "
                                      "crash; the job's other artifacts are unaffected")


def isolation_for(settings: Settings, started: float | None = None) -> Isolation:
    """The isolation a job started at `started` (time.monotonic()) runs its steps under."""
    from portq.tasks.checks.threads import job_threads

    threads = job_threads(settings.threads)
    if not settings.isolate:
        return InProcess(threads=threads)
    start = time.monotonic() if started is None else started
    margin = min(JOB_MARGIN_S, settings.task_time_limit / 4)
    return ChildProcess(time_limit_s=settings.step_time_limit, memory_limit_bytes=settings.step_memory_limit,
                        deadline=start + settings.task_time_limit - margin, threads=threads)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        meaning = _SIGNAL_MEANING.get(name)
        return f"crashed with {name}" + (f" ({meaning})" if meaning else "")
    if exitcode:
        return f"its process exited with code {exitcode} before reporting a result"
    return "its process ended without reporting a result"


def _failed(ctx: StepContext, e: IsolatedStepCrash) -> ArtifactReport:
    from portq.tasks.execution.steps import new_report

    return new_report(ctx.request, StepStatus.failed, e.message, options=ctx.options)


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def _kill_tree(proc: Any) -> None:
    """SIGKILL the step's process and whatever it started (compilers, for one)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for p in children:
        try:
            p.kill()
        except psutil.Error:
            continue
    if proc.is_alive():
        proc.kill()


def _append_log(log_path: Path, workdir: Path, artifact_id: str) -> None:
    from portq.tasks.execution.run import LOG_FILE

    if not log_path.exists():
        return
    text = log_path.read_text(errors="replace")
    log_path.unlink()
    if text.strip():
        with open(workdir / LOG_FILE, "a") as f:
            f.write(f"--- isolated step for {artifact_id} ---\n{text}")
            if not text.endswith("\n"):
                f.write("\n")


# ------------------------------------------------------------------------------------------- in the child


_FAULT_LOG: Any = None  # kept open for faulthandler for the child's lifetime


def _child_main(conn: Any, step: Step, ctx: StepContext, log_path: str, threads: int | None = None) -> None:
    """Runs in the forkserver child: build the source again, run the step, send the report (or what broke)."""
    import faulthandler

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # On SIGSEGV/SIGABRT/...: the Python stack goes to the log, through a descriptor of its own, since the
    # export routes point 1 and 2 elsewhere while they run (formats.base.native_output_to_log).
    global _FAULT_LOG
    _FAULT_LOG = os.fdopen(fd, "a")
    faulthandler.enable(file=_FAULT_LOG, all_threads=True)
    _die_with_parent()

    def send(kind: str, value: str) -> None:
        conn.send((kind, value))

    try:
        from portq.tasks.checks import threads as cpu_threads
        from portq.tasks.sources.builders import build_source

        cpu_threads.apply(threads)

        send("phase", ctx.step("load"))
        ctx.source = build_source(ctx.spec, ctx.store, ctx.evidence.device)
        ctx.on_phase = lambda name: send("phase", name)  # export, session, parity, latency, localise
        send("result", step(ctx).model_dump_json())
    except BaseException as e:  # this process is the step's boundary: say what broke, then exit
        send("error", f"{type(e).__name__}: {first_line(e)}")
    finally:
        conn.close()


def _die_with_parent() -> None:
    """Linux: die when the forkserver dies, which happens when the worker process that owns it dies."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
