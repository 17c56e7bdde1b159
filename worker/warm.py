"""A warm pool: each prefork child imports the job code and torch, and starts its step forkserver (and waits
for the forkserver's own imports), as soon as it starts, in the background, so the first job a child takes
does not pay for them (a job that arrives sooner waits for the warm-up to end: `until_warm`); the forkserver
also runs one tiny export (`portq.tasks.execution.step_exercise`), so no step's process pays the exporters'
first-call work. It logs "pool process warm" when done.

Connected after `portq.worker.gpu`'s pinning (signal receivers run in the order they were connected), so
torch is imported with the child's CUDA_VISIBLE_DEVICES already set; nothing here touches CUDA.
"""

from __future__ import annotations

import logging
import threading
import time

from celery.signals import worker_process_init

log = logging.getLogger("portq.worker")

#: imported in each child ahead of its first job (what a job imports on its way to the first step); torch.export's
#: loader imports its compiler stack (torch._dynamo): 2-3 s of the first job's load on each pool process without it
MODULES = ("portq.tasks.execution.run", "portq.tasks.execution.source_run", "portq.tasks.execution.steps",
           "portq.tasks.formats", "portq.tasks.checks.parity", "portq.tasks.checks.latency", "torch", "onnx",
           "onnxruntime", "torch._dynamo", "torch._export.serde.serialize", "torch.export.pt2_archive._package",
           "torch.export._unlift",
           "portq.tasks.sources.loading", "portq.tasks.sources.inputs", "portq.tasks.reports.content",
           "portq.tasks.reports.html")


#: seconds a job waits at most for its pool process's warm-up to end (`until_warm`)
WAIT_S = 300.0

#: whether this process started a warm-up, and when the warm-up's imports ended (done or failed)
_STARTED = False
_IMPORTED = threading.Event()


def until_warm(timeout: float = WAIT_S) -> None:
    """Return once this pool process's warm-up has done its imports (at once where none was started).

    A job imports what the warm-up imports. Two threads importing torch's compiler stack at once can meet one of
    its modules half-initialised (its imports are circular): a job that arrived during the warm-up failed its load
    with "cannot load the ExportedProgram: 'torch._dynamo'", and the warm-up failed with it. Waiting costs the job
    nothing it would not spend importing. The rest of the warm-up (the step forkserver, another process) goes on
    beside the job, whose first step waits for the forkserver as it would anyway.
    """
    if _STARTED and not _IMPORTED.wait(timeout):
        log.warning("this pool process's warm-up has not done its imports after %.0fs; the job runs anyway", timeout)


def warm_child() -> None:
    import importlib

    start = time.monotonic()
    try:
        try:
            for name in MODULES:
                importlib.import_module(name)
        finally:
            _IMPORTED.set()
        from portq.worker.app import app

        if app.portq_settings.isolate:  # type: ignore[attr-defined]
            from portq.tasks.execution.forkserver import warm_up

            warm_up(wait=True, exercise=True)
    except Exception as e:  # a warm-up that fails costs only time: the first job does it instead
        log.warning("warming up this pool process failed (%s); its first job will do it", e)
        return
    log.info("pool process warm in %.1fs (job code, torch and the step forkserver)", time.monotonic() - start)


@worker_process_init.connect
def _warm(**_: object) -> None:
    global _STARTED
    _STARTED = True  # before the thread, and before this process takes its first job
    threading.Thread(target=warm_child, name="portq-warm", daemon=True).start()
