"""`portq cancel`, `portq retry` and `portq workers`: operating a batch and the worker pool.

Cancel and retry act on the batch's records in the store (what every worker checks before it runs a
job), and tell the workers through Celery's remote control where there is a broker. `workers` asks
each worker over the broker what it consumes and what it is running.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from portq.client.console import err, out
from portq.client.options import JsonOpt, QueueBrokerOpt, StoreOpt, resolve
from portq.tasks.core.contract import JobRecord, JobSpec, JobStatus
from portq.tasks.core.errors import InputError
from portq.tasks.state import delivery, lifecycle
from portq.tasks.state import records as batches
from portq.tasks.state.keys import dead_letter_key, failed_key
from portq.tasks.state.store import Store
from rich.markup import escape
from rich.table import Table


def cancel(
    batch: Annotated[str, typer.Argument(help="Batch id, as printed by `portq submit`.")],
    terminate: Annotated[bool, typer.Option("--terminate", help="Also kill the worker processes running this "
                                                                "batch's jobs (they are recorded cancelled).")]
    = False,
    broker: QueueBrokerOpt = None,
    store: StoreOpt = None,
) -> None:
    """Stop a batch's queued jobs: workers skip them. Running jobs finish unless --terminate."""
    settings = resolve(broker, store)
    st = Store(settings.store)
    records = batches.require_batch(st, batch, "cancel")
    queued = [r for r in records if r.status is JobStatus.queued]
    running = [r for r in records if r.status is JobStatus.running]
    for r in queued:
        _mark_cancelled(st, r, "cancelled before it started (portq cancel)")
    killed: list[JobRecord] = []
    if not settings.embedded:
        from portq.client.dispatch import inspect_workers, revoke

        revoke(settings, [r.job_id for r in queued])  # workers drop these messages unopened
        if terminate and running:
            ids = {r.job_id for r in running}
            tasks = [(t["id"], _job_id(t)) for w in inspect_workers(settings).values()
                     for t in (w["active"] or []) if _job_id(t) in ids]
            revoke(settings, [task_id for task_id, _ in tasks], terminate=True)
            hit = {job_id for _, job_id in tasks}
            killed = [r for r in running if r.job_id in hit]
            for r in killed:
                _mark_cancelled(st, r, "cancelled while running: its process was killed (portq cancel --terminate)")
    out.print(f"cancelled {len(queued)} queued job(s)" + (f" and {len(killed)} running job(s)" if killed else ""))
    left = len(running) - len(killed)
    if left:
        err.print(f"{left} running job(s) will finish" + ("" if terminate else "; --terminate stops them too"))


def retry(
    batch: Annotated[str, typer.Argument(help="Batch id, as printed by `portq submit`.")],
    jobs: Annotated[list[str] | None, typer.Option("--job", help="Resubmit this job (id); repeatable. "
                                                                 "[default: the batch's dead letters]")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Resubmit every failed job, not only dead letters.")]
    = False,
    cancelled: Annotated[bool, typer.Option("--cancelled", help="Resubmit cancelled jobs as well.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the batch until it finishes; exit 1 if a job "
                                                      "failed.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds (exit 3).")] = 0,
    broker: QueueBrokerOpt = None,
    store: StoreOpt = None,
) -> None:
    """Resubmit a batch's dead letters (jobs whose worker died, that ran out of time or could not be queued)."""
    settings = resolve(broker, store)
    st = Store(settings.store)
    records = batches.require_batch(st, batch, "retry")
    wanted = set(jobs or [])
    unknown = wanted - {r.job_id for r in records}
    if unknown:
        raise InputError(f"batch {batch} has no job {', '.join(sorted(unknown))}", step="retry",
                         hint="`portq report BATCH --json` lists the job ids")
    chosen = [r for r in records if r.job_id in wanted or (not wanted and (
        r.dead_letter or (failed and r.status is JobStatus.failed) or (cancelled and r.status is JobStatus.cancelled)))]
    specs: list[JobSpec] = []
    for r in chosen:
        if r.status in (JobStatus.queued, JobStatus.running):
            err.print(f"skipping {r.model} ({r.job_id}): it is {r.status.value}")
            continue
        spec = delivery.read_spec(st, batch, r.job_id)
        if spec is None:
            err.print(f"skipping {r.model} ({r.job_id}): no spec stored for it (it never reached the queue); "
                      "submit the file again")
            continue
        _reset(st, r)
        specs.append(spec)
    if not specs:
        out.print(f"nothing to retry in batch {batch}" + ("" if failed else " (no dead letters; --failed retries "
                                                                             "every failed job)"))
        return
    if settings.embedded:
        from portq.client.dispatch import run_here

        run_here(specs, st, settings)
    else:
        from portq.client.dispatch import enqueue

        enqueue(specs, settings, st, resubmit=True)
    out.print(f"resubmitted {len(specs)} job(s): " + ", ".join(s.model for s in specs))
    if wait or settings.embedded:
        from portq.client.submit import see_through

        raise typer.Exit(see_through(batch, timeout, store=st.root))


def wait(
    batch: Annotated[str, typer.Argument(help="Batch id, as printed by `portq submit`.")],
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds (exit 3).", min=0)] = 0,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow a batch until every job finished, then print its summary; exit 1 if a job failed.

    It reads the store only, so it picks up a batch from any client, after any restart, broker up or down.
    """
    from portq.client.submit import see_through

    raise typer.Exit(see_through(batch, timeout, store=store, as_json=as_json))


def workers(
    as_json: Annotated[bool, typer.Option("--json", help="Print the replies as one JSON document.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the workers' replies.")] = 2.0,
    broker: QueueBrokerOpt = None,
) -> None:
    """Who is consuming which queue, and what each worker is running (asked over the broker). Exit 1 if none."""
    settings = resolve(broker)
    if settings.embedded:
        raise InputError("no broker configured, so there are no workers: jobs run in the CLI's own process",
                         step="workers", hint="set PORTQ_BROKER_URL or --broker")
    from portq.client.dispatch import inspect_workers

    replies = inspect_workers(settings, timeout=timeout)
    rows = [_worker_row(name, reply) for name, reply in replies.items()]
    if as_json:
        typer.echo(json.dumps({"broker": settings.broker_display, "workers": rows}, indent=2))
    elif rows:
        table = Table(title=f"workers on {settings.broker_display}", title_justify="left")
        for col in ("worker", "queues", "processes", "running", "reserved", "done"):
            table.add_column(col, overflow="fold")
        for row in rows:
            running = "\n".join(f"{j['model']} ({j['batch']}, {j['seconds']:.0f}s, pid {j['pid']})"
                                for j in row["running"]) or "-"
            table.add_row(escape(row["worker"]), ", ".join(row["queues"]), str(row["processes"]), escape(running),
                          str(len(row["reserved"])), str(row["done"]))
        out.print(table)
    if not rows:
        err.print(f"no worker answered within {timeout:g}s on {settings.broker_display}")
        raise typer.Exit(1)


def _worker_row(name: str, reply: dict[str, Any]) -> dict[str, Any]:
    stats = reply.get("stats") or {}
    pool = stats.get("pool") or {}
    now = time.time()

    def job(t: dict[str, Any]) -> dict[str, Any]:
        spec = (t.get("kwargs") or {}).get("spec") or {}
        start = t.get("time_start")
        return {"job_id": spec.get("job_id"), "batch": spec.get("batch_id"), "model": spec.get("model"),
                "task_id": t.get("id"), "pid": t.get("worker_pid"),
                "seconds": round(now - start, 1) if isinstance(start, (int, float)) else 0.0}

    return {
        "worker": name,
        "queues": sorted(q["name"] for q in (reply.get("queues") or [])),
        "processes": pool.get("max-concurrency", len(pool.get("processes") or [])),
        "running": [job(t) for t in (reply.get("active") or [])],
        "reserved": [job(t) for t in (reply.get("reserved") or [])],
        "done": sum((stats.get("total") or {}).values()),
    }


def _job_id(task: dict[str, Any]) -> str | None:
    return ((task.get("kwargs") or {}).get("spec") or {}).get("job_id")


def _mark_cancelled(st: Store, record: JobRecord, why: str) -> None:
    lifecycle.cancelled(st, record, why)


def _reset(st: Store, record: JobRecord) -> None:
    """Back to queued, as if new: the old attempt's failed result and dead letter go."""
    st.delete(dead_letter_key(record.batch, record.job_id))
    st.delete(failed_key(record.job_id))
    lifecycle.reset(st, record)
