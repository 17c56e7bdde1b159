"""Weight-space merging in plain torch: models of one architecture merged parameter by parameter.

- soup: the uniform or weighted average of the parameters (Wortsman et al. 2022, "Model soups",
  arXiv:2203.05482; mergekit's `linear` with normalize=True);
- greedy_soup: the paper's Recipe 1: members sorted by their score, each added to the soup only if the
  uniform soup with it scores at least as well (>=, the paper's rule; `strict` gives the reference code's >);
- slerp: spherical interpolation of two models per tensor, as mergekit's `slerp` (t=0 is the first model;
  nearly colinear tensors fall back to linear interpolation);
- task_arithmetic: base + scale * sum_i w_i (member_i - base) (Ilharco et al. 2023, arXiv:2212.04089;
  mergekit's `task_arithmetic`: weights not normalised, negative weights negate a task);
- ties: TIES-merging (Yadav et al. 2023, arXiv:2306.01708) as mergekit's `ties`: each task vector trimmed
  to its top-`density` entries by magnitude per tensor, the sign elected by the sum, the agreeing entries
  averaged with their weights, then base + scale * that.

A method's tuning parameters (slerp's t, ties' density) have no default here: the defaults are its config's
in `portq.tasks.fusion.methods`; equal weights and scale 1 are the formulas' identity.

Every method is deterministic: float64 arithmetic in a fixed member order, cast back to the first member's
(or the base's) dtype; integer tensors (BatchNorm's num_batches_tracked) come from the first member, the
best-scoring one, or the base. BatchNorm running statistics are merged like the other tensors, or
recomputed on calibration data when it is given (only BatchNorm layers in train mode, cumulative average).
Each method returns (state_dict, facts); `load_merged` puts a state dict into a copy of a template member.

portq merges with this code and every reproduce script of a merged artifact carries a copy, so it imports
only torch, numpy and the standard library.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from portq.tasks.fusion.training import as_score, evaluate, set_training
from portq.tasks.fusion.validation import (
    FusionError,
    as_batches,
    check_same_architecture,
    check_weights,
    named_members,
    short_list,
)
from torch import nn

DOT_THRESHOLD = 0.9995  # mergekit/merge_methods/slerp.py
SLERP_EPS = 1e-8  # mergekit/merge_methods/slerp.py

StateDict = dict[str, Any]


def to_state_dict(obj: Any, method: str, name: str) -> StateDict:
    """A member's tensors, detached, on the CPU."""
    if isinstance(obj, nn.Module):
        sd = obj.state_dict()
    elif isinstance(obj, dict):
        sd = obj
    else:
        raise FusionError(f"{method}: {name!r} must be an nn.Module or a state dict, got {type(obj).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise FusionError(f"{method}: {name!r} entry {k!r} is not a tensor ({type(v).__name__})")
        out[k] = v.detach().cpu()
    return out


def _batch_norms(module: Any) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_running_keys(state_dict: StateDict, template: Any = None) -> list[str]:
    """Keys of BatchNorm running statistics: of the template's BatchNorm layers, else by their names."""
    if template is not None and _batch_norms(template):
        keys = [f"{n}.{stat}" if n else stat for n, _ in _batch_norms(template)
                for stat in ("running_mean", "running_var")]
        return [k for k in keys if k in state_dict]
    return [k for k in state_dict if k.endswith((".running_mean", ".running_var"))
            or k in ("running_mean", "running_var")]


def load_merged(template: Any, state_dict: StateDict) -> Any:
    """A deep copy of `template` holding `state_dict` (strictly), in eval mode."""
    if not isinstance(template, nn.Module):
        raise FusionError(f"template must be an nn.Module, got {type(template).__name__}")
    check_same_architecture([state_dict, to_state_dict(template, "load_merged", "template")],
                            ["merged", "template"], "load_merged")
    with torch.no_grad():  # a ScriptModule's copy would otherwise hold its weights as non-leaf clones
        module = copy.deepcopy(template)
    module.load_state_dict(state_dict, strict=True)
    set_training(module, False)
    return module


def recompute_bn_stats(module: Any, calibration_inputs: Any) -> list[str]:
    """Recompute the BatchNorm running statistics of `module` in place; returns the layers' names.

    Each tracking BatchNorm layer is reset and given momentum=None (a cumulative average over the batches);
    the batches run under no_grad with only the BatchNorm layers in train mode (dropout in train mode would
    distort the statistics); then the momenta are restored and the module is left in eval mode. With one
    batch the statistics are its mean and unbiased variance; with several, the average of the per-batch ones.
    """
    batches = as_batches(calibration_inputs)
    layers = _batch_norms(module)
    set_training(module, False)
    if not layers:
        return []
    momenta = [m.momentum for _, m in layers]
    for _, m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for b in batches:
                module(*b)
    finally:
        for (_, m), momentum in zip(layers, momenta):
            m.momentum = momentum
        set_training(module, False)
    return [n for n, _ in layers]


def _template(method: str, template: Any, items: list[Any], needed: bool, why: str) -> Any:
    if template is None and isinstance(items[0], nn.Module):
        template = items[0]
    if needed and template is None:
        raise FusionError(f"{method}: needs a template module (template=...) {why} when members are state dicts")
    if template is not None and not isinstance(template, nn.Module):
        raise FusionError(f"{method}: template must be an nn.Module, got {type(template).__name__}")
    return template


def _weighted_average(sds: list[StateDict], w: list[float], keys: list[str]) -> tuple[StateDict, list[str]]:
    """The float64 weighted sum in member order, cast to the first member's dtype; integer tensors from it."""
    out, non_float = {}, []
    for k in keys:
        t0 = sds[0][k]
        if not t0.is_floating_point():
            out[k] = t0.clone()
            non_float.append(k)
            continue
        acc = t0.to(torch.float64) * w[0]
        for wi, sd in zip(w[1:], sds[1:]):
            acc = acc + sd[k].to(torch.float64) * wi
        out[k] = acc.to(t0.dtype)
    return out, non_float


def _recalibrated(method: str, template: Any, merged: StateDict, calibration_inputs: Any,
                  template_name: str) -> tuple[StateDict, list[str]]:
    module = load_merged(template, merged)
    layers = recompute_bn_stats(module, calibration_inputs)
    if not layers and bn_running_keys(merged):
        raise FusionError(
            f"{method}: cannot recompute the BatchNorm statistics of {template_name!r}: its BatchNorm layers "
            f"({short_list(bn_running_keys(merged), 4)}) are compiled into a TorchScript or ExportedProgram graph, "
            "where train mode has no effect; give the members as state dicts with their --arch, or leave out the "
            "calibration data to merge the statistics like the other tensors")
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}, layers


def _finish(method: str, merged: StateDict, facts: dict[str, Any], template: Any, calibration_inputs: Any,
            merged_as: str, template_name: str) -> tuple[StateDict, dict[str, Any]]:
    """BatchNorm handling shared by every method: recompute on calibration data, or say how they were merged."""
    if calibration_inputs is not None:
        merged, layers = _recalibrated(method, template, merged, calibration_inputs, template_name)
        facts["bn_stats"] = "recomputed" if layers else "none"
        if layers:
            facts["notes"].append(
                f"BatchNorm running statistics of {len(layers)} layer(s) recomputed on "
                f"{len(as_batches(calibration_inputs))} calibration batch(es) (cumulative average)")
        else:
            facts["notes"].append("no BatchNorm layers: the calibration data was not needed")
    elif bn_running_keys(merged, template):
        facts["bn_stats"] = merged_as
        facts["notes"].append(f"BatchNorm running statistics {merged_as} like the other tensors (no calibration "
                              "data given): give calibration data to recompute them")
    else:
        facts["bn_stats"] = "none"
    return merged, facts


def _prepare(method: str, members: Any, names: list[str] | None) -> tuple[list[str], list[Any], list[StateDict]]:
    names, items = named_members(members, names, method)
    sds = [to_state_dict(m, method, n) for n, m in zip(names, items)]
    check_same_architecture(sds, names, method)
    return names, items, sds


def _non_float_note(facts: dict[str, Any], keys: list[str], source: str) -> None:
    facts["non_float_from"] = source
    if keys:
        facts["notes"].append(f"integer tensors taken from {source}: {short_list(keys)}")


# ----------------------------------------------------------------------------------------------- the methods


def soup(members: Any, *, weights: Any = None, calibration_inputs: Any = None, template: Any = None,
         names: list[str] | None = None) -> tuple[StateDict, dict[str, Any]]:
    """The uniform (or weighted, normalised) average of the members' parameters."""
    names, items, sds = _prepare("soup", members, names)
    w = check_weights(weights, len(sds), "soup")
    template = _template("soup", template, items, calibration_inputs is not None, "to recompute BatchNorm stats")
    merged, non_float = _weighted_average(sds, w, list(sds[0]))
    facts: dict[str, Any] = {"method": "soup", "names": names, "weights": w, "notes": []}
    _non_float_note(facts, non_float, f"the first member {names[0]!r}")
    return _finish("soup", merged, facts, template, calibration_inputs, "averaged", names[0])


def greedy_soup(members: Any, eval_inputs: Any = None, eval_labels: Any = None, *, metric: str | None = None,
                strict: bool = False, calibration_inputs: Any = None, template: Any = None,
                names: list[str] | None = None) -> tuple[StateDict, dict[str, Any]]:
    """Greedy soup (Model soups, Recipe 1): score each member; start from the best; add each next member (in
    order of score, ties in the given order) when the uniform soup with it scores >= the soup without it."""
    names, items, sds = _prepare("greedy-soup", members, names)
    if eval_inputs is None or eval_labels is None:
        raise FusionError("greedy-soup: needs eval data (inputs and labels) to score the members")
    template = _template("greedy-soup", template, items, True, "to evaluate the soups")
    keys = list(sds[0])

    def soup_of(chosen: list[int]) -> StateDict:
        merged, _ = _weighted_average([sds[i] for i in chosen], [1.0 / len(chosen)] * len(chosen), keys)
        if calibration_inputs is not None:
            merged, _ = _recalibrated("greedy-soup", template, merged, calibration_inputs, names[0])
        return merged

    # the metric, when not given, is decided once, on the first member's outputs
    metric, first = evaluate(load_merged(template, sds[0]), eval_inputs, eval_labels, metric)
    scores = [first, *(evaluate(load_merged(template, sd), eval_inputs, eval_labels, metric)[1] for sd in sds[1:])]
    order = sorted(range(len(sds)), key=lambda i: -as_score(metric, scores[i]))  # stable: ties keep input order
    chosen = [order[0]]
    current = soup_of(chosen)
    best = evaluate(load_merged(template, current), eval_inputs, eval_labels, metric)[1]
    steps = [{"candidate": names[order[0]], "score": best, "accepted": True}]
    for i in order[1:]:
        candidate = soup_of([*chosen, i])
        value = evaluate(load_merged(template, candidate), eval_inputs, eval_labels, metric)[1]
        gain = as_score(metric, value) - as_score(metric, best)
        accept = gain > 0 if strict else gain >= 0
        steps.append({"candidate": names[i], "score": value, "accepted": accept})
        if accept:
            chosen.append(i)
            current, best = candidate, value
    facts: dict[str, Any] = {
        "method": "greedy-soup", "names": names, "metric": metric, "rule": ">" if strict else ">=",
        "member_scores": {names[i]: scores[i] for i in range(len(sds))}, "order": [names[i] for i in order],
        "chosen": [names[i] for i in chosen], "soup_score": best, "steps": steps, "notes": [],
    }
    non_float = [k for k in keys if not sds[0][k].is_floating_point()]
    _non_float_note(facts, non_float, f"the best member {names[order[0]]!r}")
    if calibration_inputs is not None:
        facts["bn_stats"] = "recomputed" if bn_running_keys(current, template) else "none"
    elif bn_running_keys(current, template):
        facts["bn_stats"] = "averaged"
        facts["notes"].append("BatchNorm running statistics averaged like the other tensors (no calibration data "
                              "given): give calibration data to recompute them")
    else:
        facts["bn_stats"] = "none"
    return current, facts


def slerp_tensor(t: float, a: Any, b: Any, dot_threshold: float = DOT_THRESHOLD,
                 eps: float = SLERP_EPS) -> tuple[Any, bool]:
    """mergekit's slerp of one tensor (flattened), in float64 numpy: (result in a's dtype, used lerp).

    The angle comes from the normalised copies; the interpolation applies to the unnormalised tensors. A
    tensor with norm <= eps is left unnormalised (mergekit does the same), so its dot product is 0.
    """
    v0 = a.detach().cpu().to(torch.float64).numpy().reshape(-1)
    v1 = b.detach().cpu().to(torch.float64).numpy().reshape(-1)
    n0 = np.sqrt(np.sum(v0 * v0))
    n1 = np.sqrt(np.sum(v1 * v1))
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = np.sum(u0 * u1)
    if np.abs(dot) > dot_threshold:
        res, lerp = (1 - t) * v0 + t * v1, True
    else:
        theta_0 = np.arccos(dot)
        sin_theta_0 = np.sin(theta_0)
        theta_t = theta_0 * t
        res = np.sin(theta_0 - theta_t) / sin_theta_0 * v0 + np.sin(theta_t) / sin_theta_0 * v1
        lerp = False
    return torch.from_numpy(np.ascontiguousarray(res).reshape(tuple(a.shape))).to(a.dtype), lerp


def slerp(members: Any, t: float, *, dot_threshold: float = DOT_THRESHOLD, eps: float = SLERP_EPS,
          calibration_inputs: Any = None, template: Any = None,
          names: list[str] | None = None) -> tuple[StateDict, dict[str, Any]]:
    """Spherical interpolation of two models per tensor: t=0 gives the first, t=1 the second."""
    names, items = named_members(members, names, "slerp")
    if len(items) != 2:
        raise FusionError(f"slerp: needs exactly 2 models, got {len(items)}")
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise FusionError(f"slerp: t must be a number in [0, 1], got {t!r}") from None
    if not 0.0 <= t <= 1.0:
        raise FusionError(f"slerp: t must be in [0, 1], got {t!r}")
    names, items, sds = _prepare("slerp", items, names)
    template = _template("slerp", template, items, calibration_inputs is not None, "to recompute BatchNorm stats")
    merged, non_float, lerped = {}, [], []
    for k, a in sds[0].items():
        if not a.is_floating_point():
            merged[k] = a.clone()
            non_float.append(k)
            continue
        merged[k], used_lerp = slerp_tensor(t, a, sds[1][k], dot_threshold, eps)
        if used_lerp:
            lerped.append(k)
    facts: dict[str, Any] = {"method": "slerp", "names": names, "t": t, "lerp_fallback": lerped, "notes": []}
    _non_float_note(facts, non_float, f"the first member {names[0]!r}")
    if lerped:
        facts["notes"].append(f"{len(lerped)} tensor(s) nearly colinear (|cos| > {dot_threshold}): linear "
                              f"interpolation used for {short_list(lerped)}")
    return _finish("slerp", merged, facts, template, calibration_inputs, "interpolated", names[0])


def _task_setup(method: str, members: Any, base: Any, weights: Any, names: list[str] | None, base_name: str,
                positive_sum: bool) -> tuple[list[str], list[Any], StateDict, list[StateDict], list[float]]:
    if base is None:
        raise FusionError(f"{method}: needs a base model (base=...) to compute task vectors")
    names, items = named_members(members, names, method, min_count=1, what="fine-tuned member besides the base")
    base_sd = to_state_dict(base, method, base_name)
    sds = [to_state_dict(m, method, n) for n, m in zip(names, items)]
    check_same_architecture([base_sd, *sds], [base_name, *names], method)
    w = check_weights(weights, len(sds), method, normalize=False, require_positive_sum=positive_sum)
    return names, items, base_sd, sds, w


def add_task_vectors(base_sd: StateDict, sds: list[StateDict], weights: list[float], scale: float,
                     transform: Any = None) -> tuple[StateDict, list[str]]:
    """base + scale * sum_i weights[i] * transform(member_i - base), per floating tensor, in float64 (`transform`:
    what a method does to each task vector first, e.g. breadcrumbs' mask; None keeps it whole). Non-float
    tensors are the base's; their keys are returned beside the merged state."""
    def merge(k: str, b64: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(b64)
        for wi, sd in zip(weights, sds):
            vector = sd[k].to(torch.float64) - b64
            delta = delta + (transform(vector) if transform is not None else vector) * wi
        return b64 + delta * scale

    return merge_floats(base_sd, merge)


def merge_floats(base_sd: StateDict, merge: Any) -> tuple[StateDict, list[str]]:
    """Each floating tensor of the base replaced by `merge(key, base tensor in float64)`, cast back to its dtype;
    non-float tensors are the base's, and their keys are returned beside the merged state."""
    merged, non_float = {}, []
    for k, b in base_sd.items():
        if not b.is_floating_point():
            merged[k] = b.clone()
            non_float.append(k)
            continue
        merged[k] = merge(k, b.to(torch.float64)).to(b.dtype)
    return merged, non_float


def task_arithmetic(members: Any, *, base: Any = None, weights: Any = None, scale: float = 1.0,
                    calibration_inputs: Any = None, template: Any = None, names: list[str] | None = None,
                    base_name: str = "base") -> tuple[StateDict, dict[str, Any]]:
    """base + scale * sum_i weights[i] * (member_i - base); weights default to 1 and are not normalised."""
    names, items, base_sd, sds, w = _task_setup("task-arithmetic", members, base, weights, names, base_name, False)
    scale = float(scale)
    if not np.isfinite(scale):
        raise FusionError(f"task-arithmetic: scale must be finite, got {scale!r}")
    template = _template("task-arithmetic", template if template is not None else
                         (base if isinstance(base, nn.Module) else None), items, calibration_inputs is not None,
                         "to recompute BatchNorm stats")
    merged, non_float = add_task_vectors(base_sd, sds, w, scale)
    facts: dict[str, Any] = {"method": "task-arithmetic", "names": names, "base": base_name, "weights": w,
                             "scale": scale, "notes": []}
    _non_float_note(facts, non_float, "the base")
    return _finish("task-arithmetic", merged, facts, template, calibration_inputs, "merged", base_name)


def trim_magnitude(delta: Any, density: float) -> Any:
    """The top k = int(density * numel) entries by magnitude (at least 1); equal magnitudes keep the lower
    flat index (a stable sort, where mergekit's choice is implementation-defined)."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    idx = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    mask = torch.zeros_like(flat)
    mask[idx] = 1
    return (flat * mask).reshape(delta.shape)


def ties(members: Any, *, base: Any = None, density: float, weights: Any = None, scale: float = 1.0,
         calibration_inputs: Any = None, template: Any = None, names: list[str] | None = None,
         base_name: str = "base") -> tuple[StateDict, dict[str, Any]]:
    """TIES-merging with mergekit's semantics, per floating tensor: task vectors trimmed to their top
    `density`, weighted, the sign elected by their sum (+1 for 0), the agreeing entries averaged by weight
    (zeros never agree; no agreement gives 0), then base + scale * that."""
    try:
        density = float(density)
    except (TypeError, ValueError):
        raise FusionError(f"ties: density must be a number in (0, 1], got {density!r}") from None
    if not 0.0 < density <= 1.0:
        raise FusionError(f"ties: density must be in (0, 1], got {density!r}")
    names, items, base_sd, sds, w = _task_setup("ties", members, base, weights, names, base_name, True)
    scale = float(scale)
    if not np.isfinite(scale):
        raise FusionError(f"ties: scale must be finite, got {scale!r}")
    template = _template("ties", template if template is not None else
                         (base if isinstance(base, nn.Module) else None), items, calibration_inputs is not None,
                         "to recompute BatchNorm stats")
    def merge(k: str, b64: torch.Tensor) -> torch.Tensor:
        weighted = [trim_magnitude(sd[k].to(torch.float64) - b64, density) * wi for wi, sd in zip(w, sds)]
        total = weighted[0]
        for x in weighted[1:]:
            total = total + x
        elected = torch.where(total >= 0, 1.0, -1.0).to(torch.float64)
        num = torch.zeros_like(b64)
        den = torch.zeros_like(b64)
        for wi, x in zip(w, weighted):
            agree = (torch.sign(x) == elected).to(torch.float64)
            num = num + x * agree
            den = den + agree * wi
        den = torch.where(den == 0, torch.ones_like(den), den)
        return b64 + (num / den) * scale

    merged, non_float = merge_floats(base_sd, merge)
    facts: dict[str, Any] = {"method": "ties", "names": names, "base": base_name, "weights": w,
                             "density": density, "scale": scale, "notes": []}
    _non_float_note(facts, non_float, "the base")
    return _finish("ties", merged, facts, template, calibration_inputs, "merged", base_name)
