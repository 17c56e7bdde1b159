"""Starting a worker: `portq worker --queue cpu|gpu` (or `celery -A portq.worker.app worker -Q cpu`).

GPU workers run prefork with one child process per GPU. The parent never imports torch or touches
CUDA; each child is pinned to one GPU through CUDA_VISIBLE_DEVICES when it starts (before torch is
imported in it, or in its step processes), and is recycled after `Settings.tasks_per_child` jobs so GPU
memory is returned. Under step isolation (the default) the child itself never touches CUDA: its jobs'
sources and steps run in step processes, which are replaced every PORTQ_STEP_REUSE steps.
"""

from __future__ import annotations

import os

from portq.tasks.core.errors import ConfigError
from portq.tasks.core.settings import Settings
from portq.worker.gpu import GPU_LIST_ENV, visible_gpus


def worker_argv(queue: str, concurrency: int | None, loglevel: str, hostname: str | None) -> list[str]:
    argv = ["worker", "-Q", queue, "--pool", "prefork", "--loglevel", loglevel, "-E",
            "-n", hostname or f"portq-{queue}-{os.getpid()}@%h"]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    return argv


def run_worker(settings: Settings, queue: str, concurrency: int | None = None, loglevel: str = "INFO",
               hostname: str | None = None) -> None:
    if settings.embedded:
        raise ConfigError("a worker needs a broker: set PORTQ_BROKER_URL or --broker (redis://host:6379/0)",
                          step="worker")
    if queue == "gpu":
        gpus = visible_gpus()
        if gpus:
            os.environ[GPU_LIST_ENV] = ",".join(gpus)
            concurrency = concurrency or len(gpus)
        concurrency = concurrency or 1
    from portq.worker.app import make_app

    make_app(settings).worker_main(worker_argv(queue, concurrency, loglevel, hostname))
