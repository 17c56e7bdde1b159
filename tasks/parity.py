"""Parity: does the artifact compute the same function as the source model, on the same inputs?

Semantics (elementwise, as Polygraphy's): an element fails when its absolute error exceeds `atol` AND
its relative error exceeds `rtol`; an output passes when no element fails; the artifact passes when
every output passes on every sample. Relative error is |a - b| / |ref| where ref != 0; where the
reference is exactly zero only the absolute error counts. NaN matches NaN and Inf matches the same Inf;
anything else against NaN/Inf fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from portq.tasks.contract import OutputParity, ParityReport, Tolerance
from portq.tasks.runners import NamedArrays


@dataclass
class _Acc:
    name: str
    shape: list[int]
    dtype: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    sum_abs: float = 0.0
    count: int = 0
    passed: bool = True
    problems: list[str] = field(default_factory=list)


def elementwise_errors(actual: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(abs_err, rel_err, mismatched_nonfinite) in float64; non-finite pairs are excluded from abs/rel."""
    a = actual.astype(np.float64)
    r = reference.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(r)
    same_nonfinite = (~np.isfinite(a) & ~np.isfinite(r)) & ((np.isnan(a) & np.isnan(r)) | (a == r))
    mismatched = ~finite & ~same_nonfinite
    abs_err = np.abs(np.where(finite, a, 0.0) - np.where(finite, r, 0.0))
    denom = np.abs(r)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_err = np.where(finite & (denom > 0), abs_err / np.where(denom > 0, denom, 1.0), 0.0)
    # where the reference is exactly zero and the artifact is not, relative error is unbounded
    rel_err = np.where(finite & (denom == 0) & (abs_err > 0), np.inf, rel_err)
    return abs_err, rel_err, mismatched


def compare(
    reference: list[NamedArrays], actual: list[NamedArrays], tol: Tolerance, *, seed: int, device: str
) -> ParityReport:
    """Compare per-sample outputs (same order); raises ValueError when the output structure differs."""
    if len(reference) != len(actual):
        raise ValueError(f"{len(actual)} artifact results for {len(reference)} samples")
    accs: list[_Acc] = []
    for s, (ref_outs, act_outs) in enumerate(zip(reference, actual)):
        if len(ref_outs) != len(act_outs):
            raise ValueError(
                f"the artifact returns {len(act_outs)} outputs, the source model {len(ref_outs)} "
                f"(source outputs: {', '.join(n for n, _ in ref_outs)})"
            )
        if s == 0:
            accs = [_Acc(n, list(a.shape), str(a.dtype)) for n, a in ref_outs]
        for acc, (_, ref), (_, act) in zip(accs, ref_outs, act_outs):
            if tuple(ref.shape) != tuple(act.shape):
                acc.passed = False
                acc.problems.append(f"shape {list(act.shape)} != {list(ref.shape)}")
                acc.max_abs = acc.max_rel = float("inf")
                continue
            if ref.size == 0:
                continue
            abs_err, rel_err, mismatched = elementwise_errors(act, ref)
            failing = ((abs_err > tol.atol) & (rel_err > tol.rtol)) | mismatched
            acc.passed &= not bool(failing.any())
            acc.max_abs = max(acc.max_abs, float(abs_err.max()) if not mismatched.any() else float("inf"))
            finite_rel = rel_err[np.isfinite(rel_err)]
            acc.max_rel = max(acc.max_rel, float(finite_rel.max()) if finite_rel.size else 0.0)
            acc.sum_abs += float(abs_err.sum())
            acc.count += abs_err.size
    outputs = [
        OutputParity(
            name=a.name, shape=a.shape, dtype=a.dtype, max_abs_err=_finite(a.max_abs), max_rel_err=_finite(a.max_rel),
            mean_abs_err=a.sum_abs / a.count if a.count else 0.0, passed=a.passed,
        )
        for a in accs
    ]
    return ParityReport(
        passed=all(o.passed for o in outputs),
        atol=tol.atol,
        rtol=tol.rtol,
        samples=len(reference),
        seed=seed,
        device=device,
        max_abs_err=max((o.max_abs_err for o in outputs), default=0.0),
        max_rel_err=max((o.max_rel_err for o in outputs), default=0.0),
        outputs=outputs,
    )


def _finite(x: float) -> float:
    # JSON has no Infinity: report the largest float instead, which still fails any tolerance.
    return x if np.isfinite(x) else float(np.finfo(np.float64).max)
