"""The fusion methods portq knows, each with its parameter model, and the checks a fusion request passes
before anything runs.

`FUSION_METHODS` is a registry keyed by the CLI name (`--method`): an unknown name fails with the known
ones. `validate_request` checks a request as the client has it (member count, base, data, parameters)
and returns the method with its parameters, defaults filled in; the client calls it before uploading
anything, and the fuse builder again when the job starts, so a message from elsewhere is held to the same
rules. Every refusal is a `ConfigError` whose message says exactly what is wrong.

This module imports neither torch nor numpy: the CLI loads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from portq.tasks.core.errors import ConfigError, UnknownNameError
from portq.tasks.core.registry import Registry
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Space = Literal["output", "weight"]

#: each parameter's command-line flag, for messages
FLAGS = {"weights": "--weights", "t": "--t", "density": "--density", "scale": "--scale", "metric": "--metric",
         "tie_break": "--tie-break", "dim": "--dim", "strict": "--strict"}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: Literal["accuracy", "loss"] | None = Field(
        None, description="how members and the fused model are scored on --eval-data: accuracy (classifiers) or "
                          "the loss (cross-entropy for class labels, else MSE); default: accuracy for class labels")


class Weighted(_Params):
    weights: list[float] | None = Field(None, description="one weight per member (default: equal weights)")


class EnsembleParams(Weighted):
    pass


class VoteParams(Weighted):
    tie_break: Literal["probability", "lowest-index"] = Field(
        "probability", description="tied classes: the highest summed member probability wins, or the lowest index")


class NoParams(_Params):
    pass


class StackParams(_Params):
    dim: Literal[0, 1] = Field(1, description="the new dim: 1 gives (N, members, ...), 0 (members, N, ...)")


class SoupParams(Weighted):
    pass


class GreedySoupParams(_Params):
    strict: bool = Field(False, description="keep a member only if the soup improves (>), not if it stays (>=)")


class SlerpParams(_Params):
    t: float = Field(0.5, description="0 gives the first model, 1 the second")


class TaskArithmeticParams(Weighted):
    scale: float = Field(1.0, allow_inf_nan=False, description="lambda: the sum of task vectors is scaled by it")


class TiesParams(Weighted):
    density: float = Field(0.2, description="the share of each task vector's entries kept (by magnitude)")
    scale: float = Field(1.0, allow_inf_nan=False, description="lambda: the merged task vector is scaled by it")


@dataclass(frozen=True)
class FusionMethod:
    """A fusion method: what it combines, its parameters, and what it needs."""

    name: str
    space: Space
    summary: str
    params: type[_Params]
    min_members: int = 2
    max_members: int | None = None
    needs_base: bool = False
    needs_eval_data: bool = False
    #: weights are normalised to sum 1 (and must sum to a positive value); task arithmetic keeps them raw
    normalize_weights: bool = True
    positive_sum: bool = True
    #: the fused model has a gradient to fine-tune with (a vote's class indices have none)
    trainable: bool = True
    #: the fused model returns class indices, which parity compares exactly
    exact_outputs: bool = False

    @property
    def member_rule(self) -> str:
        """`at least 2 models`, `exactly 2 models`, `at least 1 model`."""
        count = "exactly" if self.max_members == self.min_members else "at least"
        return f"{count} {self.min_members} model{'s' if self.min_members != 1 else ''}"


FUSION_METHODS: Registry[FusionMethod] = Registry("fusion method")

for _method in (
    FusionMethod("ensemble", "output", "the weighted mean of the members' outputs", EnsembleParams),
    FusionMethod("vote", "output", "a majority vote of classifiers (argmax), as int64 class indices", VoteParams,
                 trainable=False, exact_outputs=True),
    FusionMethod("concat", "output", "the members' outputs concatenated along the last dim", NoParams),
    FusionMethod("stack", "output", "the members' outputs stacked along a new dim", StackParams),
    FusionMethod("chain", "output", "each member's output fed to the next member", NoParams),
    FusionMethod("soup", "weight", "the uniform or weighted average of the parameters", SoupParams),
    FusionMethod("greedy-soup", "weight", "members added by score while the soup does not get worse",
                 GreedySoupParams, needs_eval_data=True),
    FusionMethod("slerp", "weight", "spherical interpolation of two models' parameters", SlerpParams,
                 max_members=2),
    FusionMethod("task-arithmetic", "weight", "base + scale * the weighted sum of task vectors",
                 TaskArithmeticParams, min_members=1, needs_base=True, normalize_weights=False, positive_sum=False),
    FusionMethod("ties", "weight", "TIES-merging: trimmed task vectors, elected signs, disjoint mean", TiesParams,
                 min_members=1, needs_base=True, normalize_weights=False),
):
    FUSION_METHODS.add(_method.name, _method)


def _refuse(message: str) -> ConfigError:
    return ConfigError(message, step="fuse")


def _check_params(method: FusionMethod, given: dict[str, Any]) -> dict[str, Any]:
    known = list(method.params.model_fields)
    for name in given:
        if name not in known:
            flag = FLAGS.get(name, name)
            takes = ", ".join(FLAGS.get(k, k) for k in known) or "none"
            raise _refuse(f"{method.name}: takes no {flag} (its parameters: {takes})")
    try:
        params = method.params.model_validate(given)
    except ValidationError as e:
        first = e.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "parameters"
        raise _refuse(f"{method.name}: {FLAGS.get(name, name)}: {first['msg']}") from None
    return params.model_dump()


def _check_weights(method: FusionMethod, weights: list[float] | None, members: int) -> list[float] | None:
    if weights is None:
        return None
    if len(weights) != members:
        raise _refuse(f"{method.name}: got {len(weights)} weights for {members} members")
    if not all(math.isfinite(w) for w in weights):
        raise _refuse(f"{method.name}: weights must be finite numbers, got {weights}")
    total = 0.0
    for w in weights:
        total += w
    if method.positive_sum and not total > 0:
        raise _refuse(f"{method.name}: weights must sum to a positive value, got sum {total!r}")
    return [w / total for w in weights] if method.normalize_weights else list(weights)


def validate_request(method_name: str, members: int, params: dict[str, Any], *, base: bool = False,
                     eval_data: bool = False, calibration: bool = False, finetune: bool = False
                     ) -> tuple[FusionMethod, dict[str, Any]]:
    """The method and its parameters as applied (defaults filled in, weights normalised where the method
    does), or a ConfigError that says exactly what is wrong with the request."""
    try:
        method = FUSION_METHODS.get(method_name)
    except UnknownNameError as e:
        raise e.at(step="fuse") from None
    if members < method.min_members or (method.max_members is not None and members > method.max_members):
        besides = " besides the base" if method.needs_base else ""
        raise _refuse(f"{method.name}: needs {method.member_rule}{besides}, got {members}")
    if method.needs_base and not base:
        raise _refuse(f"{method.name}: needs a base model (--base BASE) to compute task vectors")
    if base and not method.needs_base:
        raise _refuse(f"{method.name}: takes no --base (task-arithmetic and ties do)")
    if method.needs_eval_data and not eval_data:
        raise _refuse(f"{method.name}: needs --eval-data (an .npz of inputs and labels) to score the members")
    if calibration and method.space == "output":
        raise _refuse(f"{method.name}: takes no --calibration (BatchNorm statistics are recomputed by the "
                      "weight-space methods: " + ", ".join(n for n, m in FUSION_METHODS if m.space == "weight") + ")")
    if finetune and not method.trainable:
        raise _refuse(f"{method.name}: cannot be fine-tuned: its output (class indices) has no gradient; fine-tune "
                      "the members first, or use --method ensemble")
    applied = _check_params(method, params)
    if applied["metric"] is not None and not eval_data:
        raise _refuse(f"{method.name}: --metric needs --eval-data (the data it is measured on)")
    if method.name == "slerp" and not 0.0 <= applied["t"] <= 1.0:
        raise _refuse(f"slerp: --t must be in [0, 1], got {applied['t']!r}")
    if method.name == "ties" and not 0.0 < applied["density"] <= 1.0:
        raise _refuse(f"ties: --density must be in (0, 1], got {applied['density']!r}")
    if "weights" in applied:
        applied["weights"] = _check_weights(method, applied["weights"], members)
    return method, applied
