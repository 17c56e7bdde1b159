"""One artifact's step in a child process: a crash, hang or runaway memory costs only that artifact.

Converters crash processes in practice: on an H200 with torch 2.11, AOTInductor compiling a
half-precision model segfaulted the whole process. `ChildProcess` runs one format step (export,
session creation, parity and latency runs) in a step process and turns its death into a failed
`ArtifactReport` that says which step died and how ("[step export:aoti, ...] crashed with SIGSEGV");
the job keeps its other artifacts and reports, and the worker carries on.

The step process is forked from a *forkserver* (`portq.tasks.execution.forkserver`): a process started once (per
worker process) that has torch and the exporters imported but has never touched CUDA. Forking a process after
CUDA was initialised is broken; a forkserver child starts clean, and fast because the heavy imports are
already done. A step process runs one step at a time and is kept for the next step until it has run
PORTQ_STEP_REUSE of them, a step leaves something behind in it, its memory grows, or it dies
(`portq.tasks.execution.step_process`). It receives the step's context without the model (models do not pickle
reliably), builds the source again through the job's source builder (once per job), writes into a private folder,
and sends the `ArtifactReport` back as JSON. The folder becomes the artifact's folder only when the step produced
an artifact; a dead step's partial files are discarded. Its output (and, on a crash, the Python stack from
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
from typing import TYPE_CHECKING, Protocol

from portq.tasks.core.contract import ArtifactReport, StepStatus
from portq.tasks.core.errors import IsolatedStepCrash
from portq.tasks.core.settings import Settings
from portq.tasks.execution.forkserver import warm_up
from portq.tasks.execution.step_process import StepProcess, keep, take, tree_rss

if TYPE_CHECKING:
    from portq.tasks.execution.steps import StepContext

#: `portq.tasks.execution.steps.run_artifact`: (context) -> the artifact's report
Step = Callable[["StepContext"], ArtifactReport]

#: Seconds kept back from the job's time limit for what follows the steps (reports, publishing).
JOB_MARGIN_S = 5.0

#: Seconds a step's process that has sent its result gets to exit by itself before it is killed.
EXIT_GRACE_S = 10.0

#: A step process whose memory grew by more than this since its first step is replaced after its current step.
REUSE_MEMORY_GROWTH = 512 * 2**20

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

    def settle(self) -> None: ...

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

    def settle(self) -> None:
        pass

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
    reuse: int = 20  # steps one process runs before a fresh one replaces it (`step_process`)

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

    def settle(self) -> None:
        """Before the source is timed: wait for a step process to be ready, and keep it for the first step. A
        forkserver still importing (seconds, on a command's or a fresh pool process's first job) would otherwise
        compete with the timing for the cores: on 2 cores, a tiny BERT's source timed at p90 31 ms against a p50
        of 0.9 ms."""
        keep(take())

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
        process = self._send(step, ctx, log_path)
        # The step's own limit counts from here: the wait for a forkserver still importing (seconds on a busy
        # machine, for a worker's first steps) is not the step's; the job's deadline still bounds both.
        start = time.monotonic()
        budget = self.budget()
        budget = None if budget is None else max(0.0, budget)
        phase = ctx.step("export")
        killed: str | None = None
        outcome: ArtifactReport | None = None
        reusable = False
        try:
            while True:
                if process.conn.poll(self.poll_s):
                    try:
                        message = process.conn.recv()
                    except (EOFError, OSError):
                        break  # the process exited (or died) without a result
                    kind = message[0]
                    if kind == "phase":
                        phase = message[1]
                        if on_phase is not None:
                            on_phase(phase)
                        continue
                    if kind == "result":
                        outcome = ArtifactReport.model_validate_json(message[1])
                        reusable = message[2] is None
                        break
                    return IsolatedStepCrash(f"failed in its own process: {message[1]}", step=phase)
                if budget is not None and time.monotonic() - start > budget:
                    killed = (f"did not finish within its time limit of {budget:.0f}s; its process was killed "
                              "(PORTQ_STEP_TIME_LIMIT, bounded by what is left of PORTQ_TASK_TIME_LIMIT)")
                    break
                if self.memory_limit_bytes:
                    rss = tree_rss(process.proc.pid)
                    if rss > self.memory_limit_bytes:
                        killed = (f"used {rss / 2**20:.0f} MiB of memory, over the step limit of "
                                  f"{self.memory_limit_bytes / 2**20:.0f} MiB (PORTQ_STEP_MEMORY_LIMIT); its process "
                                  "was killed")
                        break
        finally:
            if killed:
                process.kill()
            elif reusable and self._keeps(process):
                keep(process)
            else:
                # a process that has reported (or failed) ends on its own: its exit runs the finalizers that release
                # what its libraries made (multiprocessing semaphores, which the shared resource tracker would
                # otherwise report as leaked at shutdown); only one that hangs on the way out is killed
                if outcome is not None:
                    process.stop(EXIT_GRACE_S)  # done with it: told to stop (one that left something exits already)
                else:
                    process.wait(EXIT_GRACE_S)
        if outcome is not None:
            return outcome
        if killed:
            return IsolatedStepCrash(killed, step=phase, hint="the job's other artifacts are unaffected")
        return IsolatedStepCrash(_death(process.proc.exitcode), step=phase,
                                 hint="job.log holds the step's output and, for a crash, the Python stack at the "
                                      "crash; the job's other artifacts are unaffected")

    def _send(self, step: Step, ctx: StepContext, log_path: Path) -> StepProcess:
        """The step, sent to the kept step process (or a new one: the kept one may have died since its last step)."""
        message = ("step", step, ctx, str(log_path), self.threads)
        process = take()
        try:
            process.conn.send(message)  # pickled whole before anything is written
        except (OSError, EOFError):  # it died between its last step and this one
            process.kill()
            process = StepProcess.start()
            process.conn.send(message)
        except BaseException:  # the message did not pickle: nothing was sent, the process is as it was
            keep(process)
            raise
        return process

    def _keeps(self, process: StepProcess) -> bool:
        """Whether a process that ran a clean step runs the next one: not when it has run its share of steps, nor
        when its memory grew by more than `REUSE_MEMORY_GROWTH` since its first step or fills half the step memory
        limit (the next step would start with less room)."""
        process.steps += 1
        if process.steps >= self.reuse:
            return False
        rss = tree_rss(process.proc.pid)
        if process.first_rss is None:
            process.first_rss = rss
        if rss - process.first_rss > REUSE_MEMORY_GROWTH:
            return False
        return not (self.memory_limit_bytes and rss > self.memory_limit_bytes / 2)


def isolation_for(settings: Settings, started: float | None = None) -> Isolation:
    """The isolation a job started at `started` (time.monotonic()) runs its steps under."""
    from portq.tasks.checks.threads import job_threads

    threads = job_threads(settings.threads)
    if not settings.isolate:
        return InProcess(threads=threads)
    start = time.monotonic() if started is None else started
    margin = min(JOB_MARGIN_S, settings.task_time_limit / 4)
    return ChildProcess(time_limit_s=settings.step_time_limit, memory_limit_bytes=settings.step_memory_limit,
                        deadline=start + settings.task_time_limit - margin, threads=threads, reuse=settings.step_reuse)


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
