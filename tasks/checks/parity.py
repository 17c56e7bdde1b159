"""Parity: does the artifact compute the same function as the source model, on the same inputs?

Errors, per element, in float64: the absolute error is |artifact - source|; the relative error is
|artifact - source| / |source| where the source value is non-zero. Where the source value is exactly zero
the relative error is unbounded (infinite) unless the artifact is exactly zero too, so such an element is
judged on its absolute error alone. NaN matches NaN and Inf matches the same Inf; any other pairing with a
NaN or Inf is a *non-finite mismatch*, which fails the output in every mode. Non-finite pairs are left out
of the error statistics.

Statistics per output pool every element over every sample: max / mean / median / p99 of the absolute
error over the finite pairs, and of the relative error over the finite pairs with a non-zero source value.
How an output passes (elementwise, or on a statistic) and the defaults per precision are in
`portq.tasks.checks.tolerances`. Also per output: the cosine similarity of the two tensors (all finite pairs,
flattened; 1.0 when both are all zeros, 0.0 when only one is), NaN/Inf counts on each side, top-1/top-k
agreement for classifier-like outputs (floating, 2 or 3 dims, at least 2 classes on the last axis), and
the smallest `atol` (at the job's `rtol`) and `rtol` (at the job's `atol`) that would have passed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from portq.tasks.checks.output_check import OutputCheck
from portq.tasks.checks.runners import NamedArrays
from portq.tasks.checks.tolerances import ResolvedTolerance, resolve
from portq.tasks.core.contract import (
    AppliedTolerance,
    Histogram,
    OutputParity,
    ParityReport,
    Precision,
    Tolerance,
    ToleranceMode,
    json_float,
)

#: Decades of the absolute-error histogram: [1e-12, 1e-11), ..., [1e2, 1e3]; smaller non-zero errors count in
#: the first bin, larger ones in the last.
ERR_DECADES = (-12, 3)
TOPK = 5


@dataclass
class _Acc:
    """One output over all samples: the pass/fail rule's state (`OutputCheck`) plus the report's statistics."""

    name: str
    shape: list[int]
    dtype: str
    tol: ResolvedTolerance
    check: OutputCheck
    nan_src: int = 0
    inf_src: int = 0
    nan_art: int = 0
    inf_art: int = 0
    dot: float = 0.0
    norm_a: float = 0.0
    norm_r: float = 0.0
    rows: int = 0
    top1: int = 0
    topk: int = 0
    k: int | None = None
    need_atol: float = 0.0  # max abs err over elements whose rel err exceeds rtol
    need_rtol: float = 0.0  # max rel err over elements whose abs err exceeds atol (inf: no rtol will do)
    first_failing_sample: int | None = None
    worst_sample: int = 0
    worst_abs: float = -1.0


def output_check(tol: ResolvedTolerance) -> OutputCheck:
    """The rule (shared with the reproduce scripts) for a resolved tolerance."""
    return OutputCheck({"mode": tol.mode.value, "atol": tol.atol, "rtol": tol.rtol, "q": tol.q})


def is_classifier_like(array: np.ndarray) -> bool:
    """Logits-shaped: floating, (N, C) or (N, T, C), with C >= 2 classes on the last axis."""
    return array.dtype.kind == "f" and array.ndim in (2, 3) and array.shape[-1] >= 2 and array.size > 0


def topk_sets_equal(actual: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Per row (last axis = classes): do both sides rank the same k classes on top (in any order)?"""
    c = reference.shape[-1]
    a = actual.reshape(-1, c)
    r = reference.reshape(-1, c)
    top_a = np.sort(np.argsort(-a, axis=1, kind="stable")[:, :k], axis=1)
    top_r = np.sort(np.argsort(-r, axis=1, kind="stable")[:, :k], axis=1)
    return np.all(top_a == top_r, axis=1)


def error_histogram(abs_err: np.ndarray) -> Histogram:
    """Decade bins of the absolute error (exact zeros counted apart)."""
    lo, hi = ERR_DECADES
    nonzero = abs_err[abs_err > 0]
    logs = np.clip(np.log10(nonzero), lo, hi - 1e-9) if nonzero.size else nonzero
    counts, _ = np.histogram(logs, bins=np.arange(lo, hi + 1))
    return Histogram(scale="log10", edges=[float(10.0 ** e) for e in range(lo, hi + 1)],
                     counts=[int(c) for c in counts], zeros=int(abs_err.size - nonzero.size))


def _add_sample(acc: _Acc, s: int, ref: np.ndarray, act: np.ndarray) -> None:
    errs = acc.check.add(ref, act, s)
    if errs is None:  # shapes differ: the check records the problem, which fails the output
        if acc.first_failing_sample is None:
            acc.first_failing_sample = s
        return
    if ref.size == 0:
        return
    abs_err, rel_err, mismatched, finite = errs.abs_err, errs.rel_err, errs.mismatched, errs.finite
    ref_f, act_f = ref.astype(np.float64), act.astype(np.float64)
    acc.nan_src += int(np.isnan(ref_f).sum())
    acc.inf_src += int(np.isinf(ref_f).sum())
    acc.nan_art += int(np.isnan(act_f).sum())
    acc.inf_art += int(np.isinf(act_f).sum())
    a0, r0 = np.where(finite, act_f, 0.0), np.where(finite, ref_f, 0.0)
    acc.dot += float(np.sum(a0 * r0))
    acc.norm_a += float(np.sum(a0 * a0))
    acc.norm_r += float(np.sum(r0 * r0))

    fails_rtol = rel_err > acc.tol.rtol
    fails_atol = abs_err > acc.tol.atol
    if np.any(fails_rtol & finite):
        acc.need_atol = max(acc.need_atol, float(abs_err[fails_rtol & finite].max()))
    if np.any(fails_atol & finite):
        acc.need_rtol = max(acc.need_rtol, float(rel_err[fails_atol & finite].max()))
    if errs.failing.any() and acc.first_failing_sample is None:
        acc.first_failing_sample = s
    worst = float(abs_err.max()) if not mismatched.any() else float("inf")
    if worst > acc.worst_abs:
        acc.worst_abs, acc.worst_sample = worst, s

    if is_classifier_like(ref):
        c = ref.shape[-1]
        a2, r2 = act_f.reshape(-1, c), ref_f.reshape(-1, c)
        acc.rows += a2.shape[0]
        acc.top1 += int(np.sum(np.argmax(a2, axis=1) == np.argmax(r2, axis=1)))
        if c >= 3:
            acc.k = min(TOPK, c - 1)
            acc.topk += int(topk_sets_equal(act_f, ref_f, acc.k).sum())


def _finish(acc: _Acc) -> OutputParity:
    check, tol = acc.check, acc.tol
    abs_all, rel_all = check.pooled()
    shape_ok = not check.problems
    passed, _ = check.verdict()
    problems = list(check.problems)
    if check.mismatches:
        problems.append(f"{check.mismatches} NaN/Inf value(s) not matched by the source")
    max_abs = float(abs_all.max()) if abs_all.size else 0.0
    if check.mismatches or not shape_ok:
        max_abs = float("inf")
    stat_abs = stat_rel = None
    if tol.mode is ToleranceMode.elementwise:
        min_atol: float | None = acc.need_atol
        min_rtol: float | None = acc.need_rtol if np.isfinite(acc.need_rtol) else None
    else:
        stat_abs, stat_rel = check.statistics()
        min_atol = 0.0 if stat_rel <= tol.rtol else stat_abs
        min_rtol = 0.0 if stat_abs <= tol.atol else (stat_rel if np.isfinite(stat_rel) else None)
    if check.mismatches or not shape_ok:
        min_atol = min_rtol = None
    if stat_rel is not None and not np.isfinite(stat_rel):
        stat_rel = None
    if acc.norm_a == 0 and acc.norm_r == 0:
        cosine = 1.0 if abs_all.size else None
    elif acc.norm_a == 0 or acc.norm_r == 0:
        cosine = 0.0
    else:
        cosine = acc.dot / (np.sqrt(acc.norm_a) * np.sqrt(acc.norm_r))
    if not shape_ok:
        cosine = None
    return OutputParity(
        name=acc.name, shape=acc.shape, dtype=acc.dtype, passed=bool(passed),
        max_abs_err=json_float(max_abs),
        max_rel_err=float(rel_all.max()) if rel_all.size else 0.0,
        mean_abs_err=float(abs_all.mean()) if abs_all.size else 0.0,
        elements=check.elements, failing_elements=check.failing,
        mean_rel_err=float(rel_all.mean()) if rel_all.size else 0.0,
        median_abs_err=float(np.median(abs_all)) if abs_all.size else 0.0,
        median_rel_err=float(np.median(rel_all)) if rel_all.size else 0.0,
        p99_abs_err=float(np.quantile(abs_all, 0.99)) if abs_all.size else 0.0,
        p99_rel_err=float(np.quantile(rel_all, 0.99)) if rel_all.size else 0.0,
        cosine_similarity=None if cosine is None else float(np.clip(cosine, -1.0, 1.0)),
        nan_source=acc.nan_src, inf_source=acc.inf_src, nan_artifact=acc.nan_art, inf_artifact=acc.inf_art,
        nonfinite_mismatches=check.mismatches,
        top1_agreement=acc.top1 / acc.rows if acc.rows else None,
        topk=acc.k if acc.rows else None,
        topk_agreement=acc.topk / acc.rows if acc.rows and acc.k else None,
        tolerance=AppliedTolerance(mode=tol.mode, atol=tol.atol, rtol=tol.rtol, quantile=tol.q, origin=tol.origin),
        statistic_abs=stat_abs, statistic_rel=stat_rel,
        min_atol=None if min_atol is None else json_float(min_atol),
        min_rtol=None if min_rtol is None else json_float(min_rtol),
        first_failing_sample=(acc.first_failing_sample if acc.first_failing_sample is not None
                              else None if passed else acc.worst_sample),
        problems=problems,
        abs_err_histogram=error_histogram(abs_all) if abs_all.size else None,
    )


def compare(
    reference: list[NamedArrays],
    actual: list[NamedArrays],
    tol: Tolerance,
    *,
    seed: int,
    device: str,
    precision: Precision | str = Precision.fp32,
    user_samples: int = 0,
    sample_shapes: list[list[list[int]]] | None = None,
) -> ParityReport:
    """Compare per-sample outputs (same order); raises ValueError when the output structure differs."""
    if len(reference) != len(actual):
        raise ValueError(f"{len(actual)} artifact results for {len(reference)} samples")
    precision = Precision(precision)
    accs: list[_Acc] = []
    for s, (ref_outs, act_outs) in enumerate(zip(reference, actual)):
        if len(ref_outs) != len(act_outs):
            raise ValueError(
                f"the artifact returns {len(act_outs)} outputs, the source model {len(ref_outs)} "
                f"(source outputs: {', '.join(n for n, _ in ref_outs)})"
            )
        if s == 0:
            accs = []
            for n, a in ref_outs:
                resolved = resolve(tol, precision, n)
                accs.append(_Acc(n, list(a.shape), str(a.dtype), resolved, output_check(resolved)))
        for acc, (_, ref), (_, act) in zip(accs, ref_outs, act_outs):
            _add_sample(acc, s, ref, act)
    outputs = [_finish(a) for a in accs]
    job_tol = resolve(tol.model_copy(update={"outputs": {}}), precision, "")
    return ParityReport(
        passed=all(o.passed for o in outputs),
        atol=job_tol.atol,
        rtol=job_tol.rtol,
        mode=job_tol.mode,
        precision=precision,
        samples=len(reference),
        user_samples=min(user_samples, len(reference)),
        random_samples=len(reference) - min(user_samples, len(reference)),
        sample_shapes=sample_shapes or [],
        seed=seed,
        device=device,
        max_abs_err=max((o.max_abs_err for o in outputs), default=0.0),
        max_rel_err=max((o.max_rel_err for o in outputs), default=0.0),
        outputs=outputs,
    )


def failure_summary(report: ParityReport) -> str:
    """One sentence on why parity failed: the worst output, the tolerance that would pass, where it diverged."""
    bad = [o for o in report.outputs if not o.passed] or report.outputs
    worst = max(bad, key=lambda o: o.max_abs_err, default=None)
    text = f"parity failed at {report.mode.value} atol {report.atol:g} / rtol {report.rtol:g}"
    if worst is not None:
        text += f" (output {worst.name}: max abs err {worst.max_abs_err:.3g}, max rel err {worst.max_rel_err:.3g}"
        if worst.problems:
            text += "; " + "; ".join(worst.problems)
        elif worst.tolerance is not None:
            passes = []
            if worst.min_atol is not None:
                passes.append(f"atol {worst.min_atol:.3g} at rtol {worst.tolerance.rtol:g}")
            if worst.min_rtol is not None:
                passes.append(f"rtol {worst.min_rtol:.3g} at atol {worst.tolerance.atol:g}")
            if passes:
                text += "; would pass with " + " or ".join(passes)
        text += ")"
    d = report.first_divergence
    if d is not None:
        where = f"{d.node} ({d.op_type}"
        if d.module:
            where += f", module {d.module}" + (f": {d.module_class}" if d.module_class else "")
        where += ")"
        text += f"; first diverges at {where}, max abs err {d.max_abs_err:.3g}"
    return text
