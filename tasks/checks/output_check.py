"""The rule that judges one output of an artifact against the source: portq's parity report and every
reproduce script apply this same code (the scripts carry a copy of this file's source).

So this module stands alone: it imports numpy only, never portq.

Per element, in float64: the absolute error |a - r|; the relative error |a - r| / |r|, unbounded where
r == 0 and a != 0 (so such an element is judged on its absolute error alone). NaN matches NaN and Inf the
same Inf; any other pairing with a NaN or Inf is a non-finite mismatch, which fails the output in every
mode, and non-finite pairs are left out of the error statistics.

Mode `elementwise`: an element fails when its absolute error exceeds atol AND its relative error exceeds
rtol; the output passes when no element fails. Modes `max`, `mean`, `median`, `quantile` (q): the statistic
of the absolute errors and of the relative errors, pooled over every sample (the relative one leaving out
zero-reference elements); the output fails when the absolute statistic exceeds atol AND the relative one
exceeds rtol (an output whose reference is all zeros is judged on the absolute statistic alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class SampleErrors:
    """One sample's per-element errors (float64, same shape as the output)."""

    abs_err: np.ndarray  # 0 where the pair is not finite
    rel_err: np.ndarray  # inf where the reference is 0 and the artifact is not; 0 where not finite
    mismatched: np.ndarray  # a NaN/Inf on one side not matched on the other
    finite: np.ndarray  # both sides finite
    failing: np.ndarray  # over both atol and rtol, or mismatched (the elementwise rule)


def elementwise_errors(actual: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(abs_err, rel_err, mismatched_nonfinite) in float64; non-finite pairs get 0 in abs/rel."""
    a = actual.astype(np.float64)
    r = reference.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(r)
    same_nonfinite = (~np.isfinite(a) & ~np.isfinite(r)) & ((np.isnan(a) & np.isnan(r)) | (a == r))
    mismatched = ~finite & ~same_nonfinite
    abs_err = np.abs(np.where(finite, a, 0.0) - np.where(finite, r, 0.0))
    denom = np.abs(r)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_err = np.where(finite & (denom > 0), abs_err / np.where(denom > 0, denom, 1.0), 0.0)
    rel_err = np.where(finite & (denom == 0) & (abs_err > 0), np.inf, rel_err)
    return abs_err, rel_err, mismatched


def statistic(values: np.ndarray, mode: str, q: float) -> float:
    """The statistic a mode judges on (0 for no values)."""
    if values.size == 0:
        return 0.0
    if mode == "max":
        return float(values.max())
    if mode == "mean":
        return float(values.mean())
    if mode == "median":
        return float(np.median(values))
    return float(np.quantile(values, q))


class OutputCheck:
    """One output's check over every sample. `tol` is {"mode", "atol", "rtol", "q"} (q: for mode quantile)."""

    def __init__(self, tol: dict[str, Any]) -> None:
        self.mode = str(tol.get("mode") or "elementwise")
        self.atol, self.rtol = float(tol["atol"]), float(tol["rtol"])
        self.q = float(tol["q"]) if tol.get("q") is not None else 0.99
        self.abs_parts: list[np.ndarray] = []
        self.rel_parts: list[np.ndarray] = []
        self.elements = 0
        self.failing = 0
        self.mismatches = 0
        self.problems: list[str] = []

    def describe(self) -> str:
        stat = f"quantile q={self.q:g}" if self.mode == "quantile" else self.mode
        return f"{stat} atol {self.atol:g} / rtol {self.rtol:g}"

    def add(self, reference: np.ndarray, actual: np.ndarray, sample: int = 0) -> SampleErrors | None:
        """Add one sample; None when the shapes differ (recorded as a problem that fails the output)."""
        self.elements += int(reference.size)
        if tuple(reference.shape) != tuple(actual.shape):
            self.problems.append(f"sample {sample}: shape {list(actual.shape)} != source {list(reference.shape)}")
            return None
        abs_err, rel_err, mismatched = elementwise_errors(actual, reference)
        r, a = reference.astype(np.float64), actual.astype(np.float64)
        finite = np.isfinite(r) & np.isfinite(a)
        failing = ((abs_err > self.atol) & (rel_err > self.rtol)) | mismatched
        self.failing += int(failing.sum())
        self.mismatches += int(mismatched.sum())
        self.abs_parts.append(abs_err[finite].ravel())
        self.rel_parts.append(rel_err[finite & (r != 0)].ravel())
        return SampleErrors(abs_err, rel_err, mismatched, finite, failing)

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """Every finite absolute error, and every finite relative error with a non-zero reference."""
        abs_all = np.concatenate(self.abs_parts) if self.abs_parts else np.zeros(0)
        rel_all = np.concatenate(self.rel_parts) if self.rel_parts else np.zeros(0)
        return abs_all, rel_all

    def statistics(self) -> tuple[float, float]:
        """(absolute, relative) statistic of the mode; the relative one is inf for an all-zero reference
        with a non-zero absolute error, so that only atol can pass it."""
        abs_all, rel_all = self.pooled()
        stat_abs = statistic(abs_all, self.mode, self.q)
        stat_rel = statistic(rel_all, self.mode, self.q) if rel_all.size else (float("inf") if stat_abs > 0 else 0.0)
        return stat_abs, stat_rel

    def verdict(self) -> tuple[bool, str]:
        """(passed, why) over every sample added."""
        bad = self.problems + ([f"{self.mismatches} NaN/Inf value(s) not matched by the source"]
                               if self.mismatches else [])
        if self.mode == "elementwise":
            passed = self.failing == 0
            why = f"{self.failing} element(s) over both atol and rtol"
        else:
            stat_abs, stat_rel = self.statistics()
            passed = not (stat_abs > self.atol and stat_rel > self.rtol)
            stat = f"p{self.q * 100:g}" if self.mode == "quantile" else self.mode
            why = f"{stat} abs err {stat_abs:.3g}, {stat} rel err {stat_rel:.3g}"
        return passed and not bad, "; ".join([why, *bad])
