"""One prefork child per GPU: the parent lists GPUs without initialising CUDA, each child pins itself to one."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from celery.signals import worker_process_init

GPU_LIST_ENV = "PORTQ_GPUS"

log = logging.getLogger("portq.worker")


def visible_gpus() -> list[str]:
    """GPU ids for this worker without initialising CUDA: PORTQ_GPUS, else CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    for var in (GPU_LIST_ENV, "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None:
            return [g.strip() for g in value.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
    return []


@worker_process_init.connect
def _pin_child_to_gpu(**_: object) -> None:
    """In each prefork child: take GPU number `index` of PORTQ_GPUS before anything imports torch."""
    gpus = os.environ.get(GPU_LIST_ENV)
    if not gpus:
        return
    from billiard.process import current_process

    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    # billiard numbers pool slots 0..N-1 and gives a recycled child its predecessor's slot, so a slot
    # keeps its GPU for the worker's lifetime and N children cover N GPUs.
    index = getattr(current_process(), "index", None) or 0
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
    log.info("pool process %d (slot %d) pinned to GPU %s (CUDA_VISIBLE_DEVICES=%s)", os.getpid(), index,
             ids[index % len(ids)], os.environ["CUDA_VISIBLE_DEVICES"])
