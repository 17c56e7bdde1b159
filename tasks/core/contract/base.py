"""The two pydantic bases of the contract: requests and reports both refuse fields they do not know."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A request model (job spec, options, source description): unknown fields are an error, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class ReportModel(BaseModel):
    """A report model (job, batch, comparison, history): what portq writes and reads back, nothing else."""

    model_config = ConfigDict(extra="forbid")
