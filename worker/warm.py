"""A warm pool: each prefork child imports the job code and starts its step forkserver (and waits for the
forkserver's own imports), as soon as it starts, in the background, so the first job a child takes does not pay
for them; the forkserver also runs one tiny export (`portq.tasks.execution.step_exercise`), so no step's process
pays the exporters' first-call work. With step isolation off, the child imports torch and the runtimes itself
instead (its jobs run in it); with it on, the child never imports them: its jobs' sources and steps run in step
processes. It logs "pool process warm" when done.

`portq.worker.app` starts it from each child's `worker_process_init`, connected after `portq.worker.gpu`'s
pinning (signal receivers run in the order they were connected), so torch is imported with the child's
CUDA_VISIBLE_DEVICES already set; nothing here touches CUDA. This module does not import the app: the app
hands it the one setting it reads.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("portq.worker")

#: imported in each child ahead of its first job (what a job imports on its way to its source and first step)
MODULES = ("portq.tasks.execution.run", "portq.tasks.execution.source_run", "portq.tasks.execution.steps",
           "portq.tasks.formats", "portq.tasks.checks.parity", "portq.tasks.checks.latency")
#: ... and, when its jobs run in it (PORTQ_ISOLATE=0), what they compute with
IN_PROCESS_MODULES = ("torch", "onnx", "onnxruntime")


def warm_child(isolate: bool) -> None:
    """Import what a job imports on its way (and, with step isolation, start the step forkserver and wait for it)."""
    import importlib

    start = time.monotonic()
    try:
        for name in MODULES if isolate else MODULES + IN_PROCESS_MODULES:
            importlib.import_module(name)
        if isolate:
            from portq.tasks.execution.forkserver import warm_up

            warm_up(wait=True)  # with the warm-up export (`_warm`)
    except Exception as e:  # a warm-up that fails costs only time: the first job does it instead
        log.warning("warming up this pool process failed (%s); its first job will do it", e)
        return
    log.info("pool process warm in %.1fs (%s)", time.monotonic() - start,
             "job code and the step forkserver" if isolate else "job code, torch and the runtimes")


def start(isolate: bool) -> None:
    """Warm this pool process in the background."""
    from portq.tasks.execution.forkserver import exercise_on_start

    exercise_on_start()  # before any job: a job that arrives before the warm-up thread starts it the same way
    threading.Thread(target=warm_child, args=(isolate,), name="portq-warm", daemon=True).start()
