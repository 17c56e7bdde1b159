"""A fuse request turned into its one job (`portq.fuse`, `portq fuse`).

The request is checked before anything is uploaded or runs (the method and its parameters against
`FUSION_METHODS`, the data files' arrays, every file's size): each refusal says exactly what is wrong. What needs
the models loaded (architectures, output shapes, labels against outputs) is checked when the job starts, before
any conversion, and fails the job at step `fuse`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from portq.tasks.core.errors import ConfigError, validation_problems
from portq.tasks.core.requests import FuseRequest
from portq.tasks.core.settings import Settings
from portq.tasks.fusion.data import read_data
from portq.tasks.fusion.methods import FusionMethod, validate_request
from portq.tasks.state.store import Store
from portq.tasks.state.submission import FusionRequest, Submission, claim_batch, prepare_fusion
from pydantic import ValidationError

STEP = "fuse"


def exact_output_tolerance(method: FusionMethod, options: dict[str, Any], user_overrides: bool) -> None:
    """A method returning class indices (vote) is held to exact equality: an index off by one is a different
    class, however small the relative error (unless the user set per-output tolerances)."""
    if method.exact_outputs and not user_overrides:
        tolerance = options.setdefault("tolerance", {})
        tolerance.setdefault("outputs", {})["*"] = {"mode": "elementwise", "atol": 0.0, "rtol": 0.0}


def prepare_fusion_jobs(models: list[str], req: FuseRequest, settings: Settings, st: Store,
                        job: tuple[dict[str, Any], dict[str, Any]]) -> Submission:
    """The fusion's job, prepared in the store (its files uploaded), after every check that needs no model
    loaded; `job` is the request's (JobOptions fields, load fields)."""
    tune = req.finetune_options()
    fusion, applied = validate_request(req.method, len(models), req.fusion_params(), base=req.base is not None,
                                       eval_data=req.eval_data is not None, calibration=req.calibration is not None,
                                       finetune=tune is not None)
    for path, flag, labels in ((req.eval_data, "--eval-data", True), (req.calibration, "--calibration", False),
                               (req.finetune, "--finetune", True)):
        if path is not None and Path(path).is_file():  # a missing file is refused with the others, below
            read_data(Path(path), path, flag, labels, ConfigError, STEP)
    options, load = job
    exact_output_tolerance(fusion, options, bool(req.output_tol))
    request = FusionRequest(members=models, method=fusion.name, params=applied, base=req.base,
                            eval_data=req.eval_data, calibration=req.calibration, finetune=tune, name=req.name)
    try:
        notes = claim_batch(st, req.batch)
        sub = prepare_fusion(request, st, batch=req.batch, options=options, load=load, force=req.force,
                             max_bytes=settings.max_model_bytes, max_sample_bytes=settings.max_sample_bytes)
        sub.notes = notes
        return sub
    except ValidationError as e:  # pydantic validation of the options
        raise ConfigError(validation_problems(e), step=STEP) from None
