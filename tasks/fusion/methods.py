"""The fusion methods portq knows, each one entry that carries everything its dispatch needs, and the checks a
fusion request passes before anything runs.

A method is a `FusionMethod` in `FUSION_METHODS`, keyed by the CLI name (`--method`; an unknown name fails
with the known ones): its space (output or weight), its one-line summary (the CLI's help), its parameters as
a frozen config dataclass whose field defaults are the only place a default is written (the fusion report
records the config as applied, in `params`), the member rules, and its `apply` function, which fuses loaded
members into one module. Nothing else dispatches on a method's name: the fuse builder, the reproduce
scripts (`portq.tasks.fusion.recipe`), the report and the CLI all read the entry. Adding a method is adding
one entry here (its config, its apply function, its `FusionMethod`), as `breadcrumbs` below shows.

`validate_request` checks a request as the client has it (member count, base, data, parameters) and returns
the method with its parameters, defaults filled in; the client calls it before uploading anything, and the
fuse builder again when the job starts, so a message from elsewhere is held to the same rules. Every
refusal is a `ConfigError` whose message says exactly what is wrong.

This module imports neither torch, numpy nor pydantic when it loads: the CLI loads it, and every reproduce
script of a fused artifact carries a copy (apply functions import the plain fusion modules, torch and numpy
when they run; in a script those modules sit in the same file).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from portq.tasks.core.errors import ConfigError, UnknownNameError
from portq.tasks.core.registry import Registry

Space = Literal["output", "weight"]


def _param(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


# ------------------------------------------------------------------------------------------ parameter configs


@dataclass(frozen=True)
class FusionConfig:
    """Every method's parameters: a frozen dataclass; its field defaults are the method's defaults."""

    metric: Literal["accuracy", "loss"] | None = _param(
        None, "how members and the fused model are scored on --eval-data: accuracy (classifiers) or the loss "
              "(cross-entropy for class labels, else MSE); default: accuracy for class labels")

    def problem(self) -> str | None:
        """What is wrong with values the types allow (a range), or None."""
        return None


@dataclass(frozen=True)
class WeightedConfig(FusionConfig):
    weights: list[float] | None = _param(None, "one weight per member (default: equal weights)")


@dataclass(frozen=True)
class ScaledConfig(WeightedConfig):
    scale: float = _param(1.0, "lambda: the merged task vector is scaled by it")

    def problem(self) -> str | None:
        return None if math.isfinite(self.scale) else "--scale: Input should be a finite number"


@dataclass(frozen=True)
class EnsembleConfig(WeightedConfig):
    pass


@dataclass(frozen=True)
class VoteConfig(WeightedConfig):
    tie_break: Literal["probability", "lowest-index"] = _param(
        "probability", "tied classes: the highest summed member probability wins, or the lowest index")


@dataclass(frozen=True)
class NoConfig(FusionConfig):
    pass


@dataclass(frozen=True)
class StackConfig(FusionConfig):
    dim: Literal[0, 1] = _param(1, "the new dim: 1 gives (N, members, ...), 0 (members, N, ...)")


@dataclass(frozen=True)
class SoupConfig(WeightedConfig):
    pass


@dataclass(frozen=True)
class GreedySoupConfig(FusionConfig):
    strict: bool = _param(False, "keep a member only if the soup improves (>), not if it stays (>=)")


@dataclass(frozen=True)
class SlerpConfig(FusionConfig):
    t: float = _param(0.5, "0 gives the first model, 1 the second")

    def problem(self) -> str | None:
        return None if 0.0 <= self.t <= 1.0 else f"--t must be in [0, 1], got {self.t!r}"


@dataclass(frozen=True)
class TaskArithmeticConfig(ScaledConfig):
    pass


@dataclass(frozen=True)
class TiesConfig(ScaledConfig):
    density: float = _param(0.2, "the share of each task vector's entries kept (by magnitude)")

    def problem(self) -> str | None:
        if not 0.0 < self.density <= 1.0:
            return f"--density must be in (0, 1], got {self.density!r}"
        return super().problem()


# ------------------------------------------------------------------------------------------------ the entry


@dataclass
class FusionInputs:
    """What an apply function fuses: the loaded members (and base), and the data the method may use."""

    names: list[str]
    modules: list[Any]
    base: tuple[str, Any] | None = None
    #: (input tensors, label tensor) to score with (greedy-soup)
    eval_data: tuple[Any, Any] | None = None
    #: batches of input tensors to recompute BatchNorm statistics on (weight space)
    calibration: list[tuple[Any, ...]] | None = None
    #: one call's inputs that check the members' outputs combine (output space)
    example: tuple[Any, ...] | None = None
    #: the members' input names: the fused forward's parameters (output space)
    input_names: list[str] | None = None

    @property
    def base_module(self) -> Any:
        return self.base[1] if self.base is not None else None

    @property
    def base_name(self) -> str:
        return self.base[0] if self.base is not None else "base"


#: an apply function: (the method, what it fuses, its config) -> (the fused module in eval mode on the CPU,
#: the method's facts for the report)
Apply = Callable[["FusionMethod", FusionInputs, Any], tuple[Any, dict[str, Any]]]


@dataclass(frozen=True)
class FusionMethod:
    """A fusion method: what it combines, its parameters, what it needs, and how it is applied."""

    name: str
    space: Space
    summary: str
    config: type[FusionConfig]
    apply: Apply
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

    @property
    def params(self) -> list[str]:
        """The parameters' names, in order."""
        return [f.name for f in dataclasses.fields(self.config)]

    def configure(self, params: dict[str, Any]) -> Any:
        """The config from parameters as applied (`validate_request`'s, or a reproduce script's settings)."""
        return self.config(**params)

    def fuse(self, inputs: FusionInputs, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The fused module (eval mode, on the CPU) and the method's facts."""
        return self.apply(self, inputs, self.configure(params))


FUSION_METHODS: Registry[FusionMethod] = Registry("fusion method")


# --------------------------------------------------------------------------------- how each space is applied


def _apply_outputs(method: FusionMethod, inputs: FusionInputs, config: Any) -> tuple[Any, dict[str, Any]]:
    """Output space: one module holding the members; `example` checks first that their outputs combine."""
    from portq.tasks.fusion.output_space import build_output_fusion, check_outputs, with_input_names

    params = dataclasses.asdict(config)
    if inputs.example is not None:
        check_outputs(method.name, inputs.modules, inputs.example, params, inputs.names)
    module = build_output_fusion(method.name, inputs.modules, params, inputs.names)
    module = with_input_names(module, inputs.input_names or [])
    facts: dict[str, Any] = {"method": method.name, "names": inputs.names, "notes": []}
    if hasattr(module, "weights"):
        facts["weights"] = list(module.weights)
    return module, facts


def _merged(template: Any, merged: tuple[Any, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    from portq.tasks.fusion.weight_space import load_merged

    state, facts = merged
    return load_merged(template, state), facts


def _apply_soup(method: FusionMethod, inputs: FusionInputs, config: SoupConfig) -> tuple[Any, dict[str, Any]]:
    from portq.tasks.fusion.weight_space import soup

    return _merged(inputs.modules[0], soup(inputs.modules, weights=config.weights,
                                           calibration_inputs=inputs.calibration, names=inputs.names))


def _apply_greedy_soup(method: FusionMethod, inputs: FusionInputs,
                       config: GreedySoupConfig) -> tuple[Any, dict[str, Any]]:
    from portq.tasks.fusion.weight_space import greedy_soup

    data, labels = inputs.eval_data if inputs.eval_data is not None else (None, None)
    return _merged(inputs.modules[0], greedy_soup(inputs.modules, data, labels, metric=config.metric,
                                                  strict=config.strict, calibration_inputs=inputs.calibration,
                                                  names=inputs.names))


def _apply_slerp(method: FusionMethod, inputs: FusionInputs, config: SlerpConfig) -> tuple[Any, dict[str, Any]]:
    from portq.tasks.fusion.weight_space import slerp

    return _merged(inputs.modules[0], slerp(inputs.modules, config.t, calibration_inputs=inputs.calibration,
                                            names=inputs.names))


def _apply_task_arithmetic(method: FusionMethod, inputs: FusionInputs,
                           config: TaskArithmeticConfig) -> tuple[Any, dict[str, Any]]:
    from portq.tasks.fusion.weight_space import task_arithmetic

    return _merged(inputs.base_module, task_arithmetic(
        inputs.modules, base=inputs.base_module, base_name=inputs.base_name, weights=config.weights,
        scale=config.scale, calibration_inputs=inputs.calibration, names=inputs.names))


def _apply_ties(method: FusionMethod, inputs: FusionInputs, config: TiesConfig) -> tuple[Any, dict[str, Any]]:
    from portq.tasks.fusion.weight_space import ties

    return _merged(inputs.base_module, ties(
        inputs.modules, base=inputs.base_module, base_name=inputs.base_name, density=config.density,
        weights=config.weights, scale=config.scale, calibration_inputs=inputs.calibration, names=inputs.names))


for _method in (
    FusionMethod("ensemble", "output", "the weighted mean of the members' outputs", EnsembleConfig, _apply_outputs),
    FusionMethod("vote", "output", "a majority vote of classifiers (argmax), as int64 class indices", VoteConfig,
                 _apply_outputs, trainable=False, exact_outputs=True),
    FusionMethod("concat", "output", "the members' outputs concatenated along the last dim", NoConfig,
                 _apply_outputs),
    FusionMethod("stack", "output", "the members' outputs stacked along a new dim", StackConfig, _apply_outputs),
    FusionMethod("chain", "output", "each member's output fed to the next member", NoConfig, _apply_outputs),
    FusionMethod("soup", "weight", "the uniform or weighted average of the parameters", SoupConfig, _apply_soup),
    FusionMethod("greedy-soup", "weight", "members added by score while the soup does not get worse",
                 GreedySoupConfig, _apply_greedy_soup, needs_eval_data=True),
    FusionMethod("slerp", "weight", "spherical interpolation of two models' parameters", SlerpConfig, _apply_slerp,
                 max_members=2),
    FusionMethod("task-arithmetic", "weight", "base + scale * the weighted sum of task vectors",
                 TaskArithmeticConfig, _apply_task_arithmetic, min_members=1, needs_base=True,
                 normalize_weights=False, positive_sum=False),
    FusionMethod("ties", "weight", "TIES-merging: trimmed task vectors, elected signs, disjoint mean", TiesConfig,
                 _apply_ties, min_members=1, needs_base=True, normalize_weights=False),
):
    FUSION_METHODS.add(_method.name, _method)


# ---------------------------------------------------------------------------------------- Model Breadcrumbs
# Added as this one entry (its config, its mask, its apply function, its FusionMethod): nothing else in portq
# was edited to add it. The fuse builder, the reproduce scripts, the report and the CLI's --method, --density,
# --scale and --weights take it from here (its gamma keeps its default until the CLI reads flags from configs).


@dataclass(frozen=True)
class BreadcrumbsConfig(ScaledConfig):
    density: float = _param(0.9, "the share of each task vector's entries kept once the outliers are dropped")
    gamma: float = _param(0.01, "the share of each task vector's largest-magnitude entries dropped as outliers")

    def problem(self) -> str | None:
        if not 0.0 < self.density <= 1.0:
            return f"--density must be in (0, 1], got {self.density!r}"
        if not 0.0 <= self.gamma < 1.0:
            return f"--gamma must be in [0, 1), got {self.gamma!r}"
        return super().problem()


def breadcrumbs_mask(delta: Any, density: float, gamma: float) -> Any:
    """A task vector with its outliers and its smallest entries zeroed, as mergekit's `magnitude_outliers`:
    of n entries, k = int(density * n) are kept, after the int(gamma * n) largest by magnitude (fewer where
    k and they would pass n). Two differences, both where mergekit's own result is an accident: equal
    magnitudes keep the lower flat index (a stable sort), and when int(gamma * n) is 0 the k largest are kept
    (mergekit's slice `[n_bot:-0]` keeps nothing, so a tensor under 1/gamma entries lost its whole delta).
    density >= 1 keeps everything (as mergekit: no outliers are dropped either)."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    n = flat.numel()
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    order = flat.abs().sort(descending=True, stable=True).indices
    mask = flat.new_zeros(n)
    mask[order[top:top + keep]] = 1
    return (flat * mask).reshape(delta.shape)


def _apply_breadcrumbs(method: FusionMethod, inputs: FusionInputs,
                       config: BreadcrumbsConfig) -> tuple[Any, dict[str, Any]]:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795) as mergekit's `breadcrumbs`, per floating
    tensor: base + scale * sum_i weights[i] * breadcrumbs_mask(member_i - base); weights default to 1 and are
    not normalised, no sign election (mergekit's `breadcrumbs_ties` adds TIES's)."""
    from portq.tasks.fusion.weight_space import (
        _finish,
        _non_float_note,
        _task_setup,
        _template,
        add_task_vectors,
        load_merged,
    )

    names, items, base_sd, sds, w = _task_setup(method.name, inputs.modules, inputs.base_module, config.weights,
                                                inputs.names, inputs.base_name, False)
    template = _template(method.name, inputs.base_module, items, inputs.calibration is not None,
                         "to recompute BatchNorm stats")
    merged, non_float = add_task_vectors(base_sd, sds, w, config.scale,
                                         lambda vector: breadcrumbs_mask(vector, config.density, config.gamma))
    facts: dict[str, Any] = {"method": method.name, "names": names, "base": inputs.base_name, "weights": w,
                             "density": config.density, "gamma": config.gamma, "scale": config.scale, "notes": []}
    _non_float_note(facts, non_float, "the base")
    state, facts = _finish(method.name, merged, facts, template, inputs.calibration, "merged", inputs.base_name)
    return load_merged(inputs.base_module, state), facts


FUSION_METHODS.add("breadcrumbs", FusionMethod(
    "breadcrumbs", "weight", "Model Breadcrumbs: task vectors without their smallest and largest entries, summed",
    BreadcrumbsConfig, _apply_breadcrumbs, min_members=1, needs_base=True, normalize_weights=False,
    positive_sum=False))


# ------------------------------------------------------------------------------------------ request checks


def flag(param: str) -> str:
    """A parameter's command-line flag: `tie_break` -> `--tie-break`."""
    return "--" + param.replace("_", "-")


def _refuse(message: str) -> ConfigError:
    return ConfigError(message, step="fuse")


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@cache
def _adapter(config: type[FusionConfig]) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(config)


def _check_params(method: FusionMethod, given: dict[str, Any]) -> Any:
    known = method.params
    for name in given:
        if name not in known:
            takes = ", ".join(flag(k) for k in known) or "none"
            raise _refuse(f"{method.name}: takes no {flag(name)} (its parameters: {takes})")
    from pydantic import ValidationError

    try:
        config = _adapter(method.config).validate_python(given)
    except ValidationError as e:
        first = e.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "parameters"
        raise _refuse(f"{method.name}: {flag(name) if name in known else name}: {first['msg']}") from None
    return config


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
        raise _refuse(f"{method.name}: takes no --base ("
                      + _listed([n for n, m in FUSION_METHODS if m.needs_base]) + " do)")
    if method.needs_eval_data and not eval_data:
        raise _refuse(f"{method.name}: needs --eval-data (an .npz of inputs and labels) to score the members")
    if calibration and method.space == "output":
        raise _refuse(f"{method.name}: takes no --calibration (BatchNorm statistics are recomputed by the "
                      "weight-space methods: " + ", ".join(n for n, m in FUSION_METHODS if m.space == "weight") + ")")
    if finetune and not method.trainable:
        raise _refuse(f"{method.name}: cannot be fine-tuned: its output (class indices) has no gradient; fine-tune "
                      "the members first, or use --method ensemble")
    config = _check_params(method, params)
    if config.metric is not None and not eval_data:
        raise _refuse(f"{method.name}: --metric needs --eval-data (the data it is measured on)")
    problem = config.problem()
    if problem is not None:
        raise _refuse(f"{method.name}: {problem}")
    applied = dataclasses.asdict(config)
    if "weights" in applied:
        applied["weights"] = _check_weights(method, applied["weights"], members)
    return method, applied
