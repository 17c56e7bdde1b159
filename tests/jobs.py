"""Building jobs in tests: `prepare` with the options as one flat dict, the way the CLI's flags read.

`formats` (formats or artifact ids) and `opset` become artifact requests, `arch`, `arch_kwargs` and
`trust_pickle` the convert source's fields (`task`, `trust_remote_code`, `sequence_length`, `batch_size` a Hugging
Face folder's), `force` the spec's flag; the rest are JobOptions fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from portq.tasks.core.contract import ArtifactRequest
from portq.tasks.core.requests import HF_LOAD_FIELDS
from portq.tasks.state.store import Store
from portq.tasks.state.submission import Submission
from portq.tasks.state.submission import prepare as prepare_v2

LOAD_KEYS = ("arch", "arch_kwargs", "trust_pickle", *HF_LOAD_FIELDS)


def artifacts(formats: list[Any], opset: int | None = None) -> list[dict[str, Any]]:
    requests = []
    for f in formats:
        request = ArtifactRequest.parse(getattr(f, "value", f))
        if opset is not None and request.format.value == "onnx" and request.variant == "default":
            request = request.model_copy(update={"options": {"opset": opset}})
        requests.append(request.model_dump(mode="json"))
    return requests


def prepare(paths: list[str | Path], store: Store, *, batch: str, options: dict[str, Any] | None = None,
            max_bytes: int = 1 << 30, **kw: Any) -> Submission:
    flat = dict(options or {})
    load = {k: flat.pop(k) for k in LOAD_KEYS if k in flat}
    force = bool(flat.pop("force", False))
    opset = flat.pop("opset", None)
    if "formats" in flat:
        flat["artifacts"] = artifacts(flat.pop("formats"), opset)
    elif opset is not None:
        flat["artifacts"] = artifacts(["onnx"], opset)
    return prepare_v2([str(p) for p in paths], store, batch=batch, options=flat, load=load, force=force,
                      max_bytes=max_bytes, **kw)
