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
(`portq.tasks.execution.step_process`). A job's source is built and timed there first (`ChildProcess.source`): the
evidence comes back pickled and the model stays in that process for the job's steps (models do not pickle reliably;
a step in a new process builds the source again through the job's source builder). A step receives its context
without the model, writes into a private folder, and sends the `ArtifactReport` back as JSON. The folder becomes the
artifact's folder only when the step produced an artifact; a dead step's partial files are discarded. Its output
(and, on a crash, the Python stack from `faulthandler`) is appended to the job's `job.log`.
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
from portq.tasks.core.errors import IsolatedStepCrash
from portq.tasks.core.settings import Settings
from portq.tasks.execution.capture import LOG_FILE
from portq.tasks.execution.forkserver import warm_up
from portq.tasks.execution.step_process import StepProcess, keep, take, tree_rss

if TYPE_CHECKING:
    from portq.tasks.core.contract import JobSpec
    from portq.tasks.execution.source_run import SourceRun
    from portq.tasks.execution.steps import StepContext
    from portq.tasks.execution.timings import Stopwatch
    from portq.tasks.state.store import Store

#: `portq.tasks.execution.steps.run_artifact`: (context) -> the artifact's report
Step = Callable[["StepContext"], ArtifactReport]

#: Seconds kept back from the job's time limit for what follows the steps (reports, publishing).
JOB_MARGIN_S = 5.0

#: Seconds a step's process that has sent its result gets to exit by itself before it is killed.
EXIT_GRACE_S = 10.0

#: A step process whose memory grew by more than this since its first step is replaced after its current step.
REUSE_MEMORY_GROWTH = 512 * 2**20

NOT_STARTED = "not started: the job's time limit was used up by the steps before it"
TIME_LIMIT_HINT = "raise PORTQ_TASK_TIME_LIMIT (and PORTQ_VISIBILITY_TIMEOUT above it)"

_SIGNAL_MEANING = {
    "SIGSEGV": "segmentation fault in native code",
    "SIGABRT": "aborted, typically a failed C++ assertion or an uncaught C++ exception",
    "SIGBUS": "bus error in native code",
    "SIGFPE": "arithmetic fault in native code",
    "SIGILL": "illegal instruction (a kernel built for another CPU or GPU?)",
    "SIGKILL": "killed from outside, often by the out-of-memory killer",
}


class Isolation(Protocol):
    """Where a job builds and times its source, and runs each of its artifact steps."""

    def prepare(self) -> None: ...

    def source(self, spec: JobSpec, store: Store, workdir: Path, clock: Stopwatch,
               on_phase: Callable[[str], None]) -> SourceRun: ...

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

    def source(self, spec: JobSpec, store: Store, workdir: Path, clock: Stopwatch,
               on_phase: Callable[[str], None]) -> SourceRun:
        from portq.tasks.execution.source_run import run_source

        return run_source(spec, store, clock, on_phase)

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
        """The job will run steps: start the forkserver now, while the job looks at its cache and store."""
        warm_up()

    def source(self, spec: JobSpec, store: Store, workdir: Path, clock: Stopwatch,
               on_phase: Callable[[str], None]) -> SourceRun:
        """The job's source, built and timed in the step process its first step will run in (which keeps the model
        for the job's steps): the job's process never loads the model, and the source's own crashes and hangs fail
        the job instead of the worker. The step process's stages join `clock`; what the trip cost (the wait for a
        forkserver still importing, the evidence's transfer) is the job's `isolation` stage. Raises what stopped the
        source, as the job's error."""
        budget = self.budget()
        if budget is not None and budget <= 1:
            raise IsolatedStepCrash(NOT_STARTED, step="load", file=spec.display, hint=TIME_LIMIT_HINT)
        log_path = workdir / ".source.log"
        start = time.perf_counter()
        stages: dict[str, float] = {}
        try:
            kind, (outcome, stages) = self._exchange(("source", spec, store, str(log_path), self.threads),
                                                     "load", on_phase, "the job made no artifact")
        except IsolatedStepCrash as e:
            raise e.at(file=spec.display) from None
        finally:
            for name, seconds in stages.items():
                clock.add(name, seconds)
            clock.add("isolation", max(time.perf_counter() - start - sum(stages.values()), 0.0))
            _append_log(log_path, workdir, "the source")
        if kind == "failed":
            raise outcome
        return outcome

    def run_step(self, step: Step, ctx: StepContext) -> ArtifactReport:
        budget = self.budget()
        if budget is not None and budget <= 1:
            return _failed(ctx, IsolatedStepCrash(NOT_STARTED, step=ctx.step("export"), file=ctx.display,
                                                  hint=TIME_LIMIT_HINT))
        final_dir = ctx.out_dir
        workdir = final_dir.parent
        staging = workdir / f".step-{ctx.artifact_id}"
        log_path = workdir / f".step-{ctx.artifact_id}.log"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            try:
                _, report = self._exchange(("step", step, ctx.without_source(staging), str(log_path), self.threads),
                                           ctx.step("export"), ctx.on_phase, "the job's other artifacts are unaffected")
            except IsolatedStepCrash as e:
                return _failed(ctx, e.at(file=ctx.display))
            outcome = ArtifactReport.model_validate_json(report)
            if outcome.path:  # an artifact was written: its folder joins the job's files
                shutil.rmtree(final_dir, ignore_errors=True)
                os.replace(staging, final_dir)
            return outcome
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            _append_log(log_path, workdir, ctx.artifact_id)

    def _exchange(self, message: tuple[Any, ...], phase: str, on_phase: Callable[[str], None] | None,
                  consequence: str) -> tuple[str, Any]:
        """Send `message` (a step, or the job's source) to a step process and follow it to its end: the kind of its
        answer ("result", or "failed" with the error it stopped on) and what came with it. Raises
        `IsolatedStepCrash` when the process dies, hangs past the budget or runs over the memory limit; `phase`
        (the step it was in) is updated from the process as it goes, and passed on to `on_phase`."""
        process = self._send(message)
        # The step's own limit counts from here: the wait for a forkserver still importing (seconds on a busy
        # machine, for a worker's first steps) is not the step's; the job's deadline still bounds both.
        start = time.monotonic()
        budget = self.budget()
        budget = None if budget is None else max(0.0, budget)
        killed: str | None = None
        answer: tuple[str, Any] | None = None
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
                    if kind in ("result", "failed"):
                        answer = (kind, message[1])
                        reusable = message[2] is None
                        break
                    raise IsolatedStepCrash(f"failed in its own process: {message[1]}", step=phase,
                                            hint="job.log holds its Python stack")
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
                if answer is not None:
                    process.stop(EXIT_GRACE_S)  # done with it: told to stop (one that left something exits already)
                else:
                    process.wait(EXIT_GRACE_S)
        if answer is not None:
            return answer
        if killed:
            raise IsolatedStepCrash(killed, step=phase, hint=consequence)
        raise IsolatedStepCrash(_death(process.proc.exitcode), step=phase,
                                hint=f"job.log holds its output and, for a crash, the Python stack at the crash; "
                                     f"{consequence}")

    def _send(self, message: tuple[Any, ...]) -> StepProcess:
        """The message, sent to the kept step process (or a new one: the kept one may have died since its last
        step). A step counts toward the steps a process runs (PORTQ_STEP_REUSE); a job's source does not: it stays
        with the job's first step."""
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
        if message[0] == "step":
            process.steps += 1
        return process

    def _keeps(self, process: StepProcess) -> bool:
        """Whether a process that ran a clean step runs the next one: not when it has run its share of steps, nor
        when its memory grew by more than `REUSE_MEMORY_GROWTH` since its first step or fills half the step memory
        limit (the next step would start with less room)."""
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


def _append_log(log_path: Path, workdir: Path, what: str) -> None:
    if not log_path.exists():
        return
    text = log_path.read_text(errors="replace")
    log_path.unlink()
    if text.strip():
        with open(workdir / LOG_FILE, "a") as f:
            f.write(f"--- isolated step for {what} ---\n{text}")
            if not text.endswith("\n"):
                f.write("\n")
