"""`portq worker` and `portq examples`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from portq.client.console import err, out
from portq.client.options import QueueBrokerOpt, StoreOpt, resolve


class QueueName(str, Enum):
    cpu = "cpu"
    gpu = "gpu"


def worker(
    queue: Annotated[QueueName, typer.Option(help="Queue to consume: cpu, or gpu (one process per GPU).")]
    = QueueName.cpu,
    concurrency: Annotated[int | None, typer.Option(help="Worker processes. [default: CPU count; gpu: GPU "
                                                            "count]")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    name: Annotated[str | None, typer.Option(help="Worker node name (default portq-QUEUE-PID@host).")] = None,
    broker: QueueBrokerOpt = None,
    store: StoreOpt = None,
) -> None:
    """Start a Celery worker consuming one routing queue."""
    from portq.worker.main import run_worker

    settings = resolve(broker, store)
    err.print(f"portq worker: queue {queue.value}, broker {settings.broker_display}, store {settings.store_display}")
    run_worker(settings, queue.value, concurrency=concurrency, loglevel=loglevel, hostname=name)


def examples(
    directory: Annotated[Path, typer.Argument(help="Where to write the example models.")] = Path("models"),
) -> None:
    """Write a few small example models (built in code, nothing downloaded) to try portq on."""
    from portq.tasks.sources.examples import write_examples

    for path in write_examples(directory):
        out.print(str(path))
