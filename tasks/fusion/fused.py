"""A fused source model as the `fuse` job holds it: its members as loaded, the data it read, and what the
report says about how it was made. The builder (`portq.tasks.fusion.builder`) makes one; the report's
comparison (`portq.tasks.fusion.comparison`) reads it, and neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from portq.tasks.core.contract import FinetuneReport, FuseMember, SourceRef
from portq.tasks.fusion.methods import FusionMethod
from portq.tasks.sources.loading import LoadedModel

if TYPE_CHECKING:
    import numpy as np


@dataclass
class Member:
    """One model of the fusion as loaded: its label, its file and how it was loaded."""

    spec: FuseMember
    loaded: LoadedModel
    role: str = "member"

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Data:
    """An .npz the fusion reads, as arrays."""

    ref: SourceRef
    inputs: list[np.ndarray]
    labels: np.ndarray | None

    def tensors(self, rows: int | None = None) -> tuple[tuple[Any, ...], Any]:
        from portq.tasks.fusion.recipe import tensors_of

        cut = slice(None) if rows is None else slice(0, rows)
        labels = None if self.labels is None else tensors_of([self.labels[cut]])[0]
        return tensors_of([a[cut] for a in self.inputs]), labels


@dataclass
class FusedModel(LoadedModel):
    """The fused source model, with what the report says about how it was made."""

    method: FusionMethod | None = None
    params: dict[str, Any] = field(default_factory=dict)
    members: list[Member] = field(default_factory=list)
    base: Member | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # the method's own account (portq.tasks.fusion.recipe)
    eval_data: Data | None = None
    finetune: FinetuneReport | None = None
    device: str = "cpu"
    trace_example: list[dict[str, Any]] | None = None
