"""The process an isolated step runs in, kept for the next step: forked once from the step forkserver, it runs one
step after another (`portq.tasks.execution.isolation`) until it has run its share (PORTQ_STEP_REUSE), a step
leaves something behind in it, or it dies.

Why: a fresh process for every step paid, on every step, its fork and start, the source's rebuild, the exporters'
and runtimes' first-call work (the first torch.export, TorchScript run and onnxruntime session of a process cost
several times the later ones), and the wait for its exit. For small models that was a third of a batch's time
(`benchmarks/load.py`); a kept process pays them once.

What isolation still gives:

- A crash, a hang or a memory hog kills the process and costs the step in it, nothing else: no other step is in
  it, and the next step gets a fresh process.
- A step that changes the process for the next one retires it: threads or child processes left running, torch's
  default dtype, grad mode, determinism or thread count, the environment, the working directory
  (`_left_behind`). So does a step that raised out of the step function, and a process whose memory grew (the
  parent's rule, `isolation.ChildProcess`).
- A job's source is built, given its inputs, run and timed here too (`_job_source`), first, and the model is kept
  for the job's steps, as a job running in-process shares it between its steps; the next job builds its own. The
  job's own process never loads a model or imports torch, and a source that crashes its process fails its job,
  not the worker.

Its output goes to each step's own log while the step runs, and nowhere between steps.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from portq.tasks.execution.forkserver import allow_children, forkserver, main_not_reimported, mark_used

if TYPE_CHECKING:
    from portq.tasks.core.contract import JobSpec
    from portq.tasks.execution.steps import StepContext
    from portq.tasks.state.store import Store


@dataclass
class StepProcess:
    """The parent's handle on one step process: the process, its end of the pipe, the steps it has run."""

    proc: Any
    conn: Any
    steps: int = 0
    first_rss: int | None = None  # the process tree's memory after its first step (`isolation.ChildProcess`)

    @classmethod
    def start(cls) -> StepProcess:
        """Fork a new one; returns once the forkserver has forked (after its imports, if it is still starting)."""
        mark_used()
        _stop_at_exit()
        ctx = forkserver()
        mine, theirs = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_serve, name="portq-step", args=(theirs,))
        allow_children(proc)
        with main_not_reimported():
            proc.start()
        theirs.close()  # the child holds the only other end now: EOF on `conn` means it is gone
        return cls(proc, mine)

    def stop(self, grace_s: float) -> None:
        """Ask it to end (it exits between steps, running its exit handlers), wait `grace_s`, then kill it."""
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.wait(grace_s)

    def wait(self, grace_s: float) -> None:
        """Let it end by itself within `grace_s` (its exit releases what its libraries made), else kill it."""
        self.proc.join(grace_s)
        self.kill()

    def kill(self) -> None:
        """SIGKILL it and whatever it started (compilers, for one)."""
        if self.proc.is_alive():
            kill_tree(self.proc)
        self.proc.join(10)
        self.conn.close()


# --------------------------------------------------------------------------- the one kept between steps


_IDLE: StepProcess | None = None
_LOCK = threading.Lock()

#: Seconds an idle step process gets to exit when its owner does.
STOP_GRACE_S = 5.0


def set_aside() -> StepProcess | None:
    """The kept step process, out of the slot (the caller's own from now on), or None if none is kept."""
    global _IDLE
    with _LOCK:
        kept, _IDLE = _IDLE, None
    return kept


def take() -> StepProcess:
    """The kept step process if it is still alive, else a new one. A caller's own from now on: `keep` it after
    a clean step, or stop it."""
    kept = set_aside()
    if kept is not None:
        if kept.proc.is_alive():
            return kept
        kept.kill()  # died while idle (the out-of-memory killer, for one)
    return StepProcess.start()


def keep(process: StepProcess) -> None:
    """Keep `process` for the next step (one is kept per process; a second is stopped)."""
    global _IDLE
    with _LOCK:
        if _IDLE is None:
            _IDLE = process
            return
    process.stop(STOP_GRACE_S)


def stop_idle() -> None:
    """Stop the kept step process, if any (at exit; and for a caller that wants fresh processes from here)."""
    kept = set_aside()
    if kept is not None:
        kept.stop(STOP_GRACE_S)


def _stop_at_exit() -> None:
    # multiprocessing's exit handler joins a process's children: an idle step process, waiting for its next step,
    # would hold the exit for ever. Registered (once: unregister drops an earlier registration) after
    # multiprocessing's own, so it runs first.
    atexit.unregister(stop_idle)
    atexit.register(stop_idle)


def kill_tree(proc: Any) -> None:
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


def tree_rss(pid: int) -> int:
    """Resident memory of the process `pid` and its descendants, bytes (0 if it is gone)."""
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


# ------------------------------------------------------------------------------------------- in the child


_FAULT_FILE: Any = None  # the file faulthandler writes a crash's stack to: the running step's log
_SOURCE: tuple[Any, Any] | None = None  # (which job's source, the loaded model): kept for the job's next step


def _serve(conn: Any) -> None:
    """The step process's life: build and time a job's source, or run a step, as it is told, until told to stop, or
    until one leaves something behind (then it reports that and exits)."""
    _quiet()
    _die_with_parent()
    _no_progress_monitor()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "step":
            _, step, ctx, log_path, threads = message
            work = partial(_step, step, ctx)
        elif message[0] == "source":
            _, spec, store, log_path, threads = message
            work = partial(_job_source, spec, store)
        else:
            return
        if not _run(conn, work, log_path, threads):
            return


def _run(conn: Any, work: Callable[[Callable[..., None]], tuple[str, Any]], log_path: str,
         threads: int | None) -> bool:
    """One piece of work: its output into `log_path`, its answer (or what broke) to the parent. True when the
    process may run another."""
    from portq.tasks.core.errors import first_line

    def send(kind: str, *value: Any) -> None:
        conn.send((kind, *value))

    before = _state()
    _to_log(log_path)
    try:
        from portq.tasks.checks import threads as cpu_threads

        cpu_threads.apply(threads)
        kind, answer = work(send)
    except BaseException as e:  # this process is the work's boundary: say what broke, then exit
        traceback.print_exc()  # into the log, which joins the job's
        _quiet()
        send("error", f"{type(e).__name__}: {first_line(e)}")
        return False
    gc.collect()  # what the work made, freed now rather than during the next step
    _release_device_memory()
    _quiet()
    left = _left_behind(before, threads)
    send(kind, answer, left)
    return left is None


def _step(step: Any, ctx: StepContext, send: Callable[..., None]) -> tuple[str, Any]:
    """One artifact's step, on the job's source: its report, as JSON."""
    send("phase", ctx.step("load"))
    ctx.source = _source(ctx)
    ctx.on_phase = lambda name: send("phase", name)  # export, session, parity, latency, localise
    try:
        return "result", step(ctx).model_dump_json()
    finally:
        ctx.source = ctx.on_phase = None


def _job_source(spec: JobSpec, store: Store, send: Callable[..., None]) -> tuple[str, Any]:
    """The job's source, built, run and timed (`source_run.run_source`), and kept for the job's steps: the evidence
    ("result"), or the error that stopped it ("failed"), each with the stages' seconds."""
    global _SOURCE
    from portq.tasks.core.errors import PortqError
    from portq.tasks.execution.source_run import run_source
    from portq.tasks.execution.timings import Stopwatch

    _SOURCE = None  # the previous job's, freed before this one's is built
    clock = Stopwatch()
    try:
        run = run_source(spec, store, clock, lambda phase: send("phase", phase))
    except PortqError as e:
        return "failed", (e, clock.stages)
    assert run.model is not None
    _SOURCE = (_source_key(spec, run.evidence.device), run.model)
    return "result", (replace(run, model=None), clock.stages)


def _source(ctx: StepContext) -> Any:
    """The job's source model: the one its source stage or previous step built here, else built again through its
    builder."""
    global _SOURCE
    from portq.tasks.sources.builders import build_source

    key = _source_key(ctx.spec, ctx.evidence.device)
    if _SOURCE is not None and _SOURCE[0] == key:
        return _SOURCE[1]
    _SOURCE = None  # the previous job's, freed before this one's is built
    model = build_source(ctx.spec, ctx.store, ctx.evidence.device)
    _SOURCE = (key, model)
    return model


def _source_key(spec: JobSpec, device: str) -> tuple[Any, ...]:
    return spec.job_id, spec.kind, spec.source.model_dump_json(), device


def _state() -> tuple[Any, ...]:
    """What one step could change for the next in this process."""
    import psutil
    import torch

    return (("threads", sorted(t.name for t in threading.enumerate())),
            ("child processes", sorted(c.pid for c in psutil.Process().children())),
            ("torch's default dtype", torch.get_default_dtype()), ("grad mode", torch.is_grad_enabled()),
            ("deterministic algorithms", torch.are_deterministic_algorithms_enabled()),
            ("the environment", dict(os.environ)), ("the working directory", os.getcwd()))


def _left_behind(before: tuple[Any, ...], threads: int | None) -> str | None:
    """What the step changed that the next step would inherit, or None."""
    import torch

    changed = [name if name != "threads" else f"threads ({', '.join(sorted(set(b) - set(a)))})"
               for (name, a), (_, b) in zip(before, _state(), strict=True) if a != b]
    if threads is not None and torch.get_num_threads() != threads:
        changed.append("torch's thread count")
    return ", ".join(changed) or None


def _no_progress_monitor() -> None:
    """tqdm's monitor thread off: the exporters' progress bars (into a step's log) would start one, which outlives
    the step and so would retire the process after every export that shows one."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.monitor_interval = 0


def _release_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _to_log(log_path: str) -> None:
    """Send this process's output (descriptors 1 and 2, and faulthandler's crash stack) to the step's log."""
    _point_output(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))


def _quiet() -> None:
    """Between steps, output goes nowhere (a step's log is read once the step has reported)."""
    _point_output(os.open(os.devnull, os.O_WRONLY))


def _point_output(fd: int) -> None:
    import faulthandler

    global _FAULT_FILE
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # On SIGSEGV/SIGABRT/...: the Python stack goes to the log, through a descriptor of its own, since the
    # export routes point 1 and 2 elsewhere while they run (formats.base.native_output_to_log).
    previous, _FAULT_FILE = _FAULT_FILE, os.fdopen(fd, "a")
    faulthandler.enable(file=_FAULT_FILE, all_threads=True)
    if previous is not None:
        previous.close()


def _die_with_parent() -> None:
    """Linux: die when the forkserver dies, which happens when the worker process that owns it dies."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
