"""What the source model did on the job's samples: the reference every artifact is held to.

Built once per job (`portq.tasks.execution.source_run`), then read by parity, latency and localisation
in the job's process and in each isolated step's process. Plain data only (numpy arrays, floats,
dataclasses, dicts), so it crosses a process boundary by pickling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from portq.tasks.checks.latency import LatencyStats
from portq.tasks.core.contract import InputSpec, Memory

#: one sample: an array per forward argument, in order
Sample = list[np.ndarray]
#: a model's outputs on one sample, flattened and named (output.0, output.logits, ...)
NamedArrays = list[tuple[str, np.ndarray]]


@dataclass
class SourceEvidence:
    device: str
    samples: list[Sample]
    reference: list[NamedArrays]  # the source's outputs, per sample
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[int, dict[int, str]]  # input position -> {axis: dim name}
    precision: str = "fp32"  # inferred from the source's parameters
    user_samples: int = 0  # how many of `samples` are the user's own (the rest are seeded random draws)
    batch_size: int | None = None  # the size of the dynamic `batch` dim in samples[0], if there is one
    # batch size -> (inputs, the source timed there; None at samples[0]'s size: each comparison times it)
    sweep: dict[int, tuple[Sample, LatencyStats | None]] = field(default_factory=dict)
    memory: Memory | None = None  # while the source ran (its parity samples and the sweep)
    environment: dict[str, Any] = field(default_factory=dict)
    export_index: int = 0  # the sample exporters trace with (dynamic dims at size 2 or more)
    input_specs: list[InputSpec] = field(default_factory=list)  # each input's dtype, shape and dynamic dims
    source_kind: str = ""  # the loaded source's kind (torchscript, exported_program, onnx, ...): what auto searches

    @property
    def export_sample(self) -> Sample:
        return self.samples[self.export_index]

    def sample_shapes(self) -> list[list[list[int]]]:
        return [[list(a.shape) for a in s] for s in self.samples]

    def recipe_options(self) -> dict[str, Any]:
        """What every export recipe reads about the inputs (names, dynamic dims, device)."""
        return {"input_names": list(self.input_names), "output_names": list(self.output_names),
                "dynamic": {i: dict(axes) for i, axes in self.dynamic.items()}, "device": self.device}
