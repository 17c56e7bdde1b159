"""`portq fuse A B [C ...] --method M`: one job that fuses several models into one, then converts, checks
and times it like any model, on the queue or here. The work is `portq.fuse` (`portq.client.fusion`); each
refusal says exactly what is wrong and exits 2.
"""

from __future__ import annotations

from typing import Annotated

import typer
from portq.client import api
from portq.client.console import err
from portq.client.fusion import exact_output_tolerance  # noqa: F401  (tests.tasks.fusion.helpers)
from portq.client.options import BrokerOpt, JsonOpt, StoreOpt, takes
from portq.client.render import ProgressView
from portq.client.submit import Say, started
from portq.tasks.core.requests import FuseRequest


@takes(FuseRequest, step="fuse")
def fuse(
    models: Annotated[list[str], typer.Argument(help="The models to fuse (two or more; for task-arithmetic and "
                                                     "ties, the fine-tuned models, with --base).")],
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
    *,
    request: FuseRequest,
) -> None:
    """Fuse models into one (an ensemble, a chain, a merge of their weights), optionally fine-tune it, then
    convert and check it like any model: one job, on the queue or here."""
    say = Say(as_json)
    with ProgressView(err) as view:
        report = api.fuse(models, request, broker=broker, store=store, progress=view, on_submitted=say.submitted,
                          on_started=started)
    say.conclude(report)

