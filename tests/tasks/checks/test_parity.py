import math
import statistics

import numpy as np
import pytest
from portq.tasks.checks.output_check import elementwise_errors
from portq.tasks.checks.parity import compare, error_histogram, topk_sets_equal
from portq.tasks.core.contract import OutputTolerance, Tolerance, ToleranceMode


def one(name, arr):
    return [[(name, np.asarray(arr, dtype=np.float32))]]


def test_errors_against_hand_computed_values():
    ref = np.array([1.0, -2.0, 0.0, 4.0])
    act = np.array([1.1, -2.0, 0.001, 3.0])
    abs_err, rel_err, bad = elementwise_errors(act, ref)
    np.testing.assert_allclose(abs_err, [0.1, 0.0, 0.001, 1.0], rtol=1e-12)
    np.testing.assert_allclose(rel_err[[0, 1, 3]], [0.1, 0.0, 0.25], rtol=1e-12)
    assert np.isinf(rel_err[2])  # reference exactly zero, artifact not: unbounded relative error
    assert not bad.any()


def test_element_fails_only_when_both_tolerances_are_exceeded():
    tol = Tolerance(atol=1e-3, rtol=1e-2)
    # abs 0.05 > atol but rel 0.005 < rtol: passes
    assert compare(one("y", [10.0]), one("y", [10.05]), tol, seed=0, device="cpu").passed
    # abs 0.0005 < atol but rel 0.5 > rtol: passes
    assert compare(one("y", [0.001]), one("y", [0.0015]), tol, seed=0, device="cpu").passed
    # both exceeded: fails, with the numbers reported
    rep = compare(one("y", [1.0, 2.0]), one("y", [1.0, 2.5]), tol, seed=7, device="cpu")
    assert not rep.passed and rep.seed == 7
    assert rep.outputs[0].max_abs_err == pytest.approx(0.5)
    assert rep.outputs[0].max_rel_err == pytest.approx(0.25)
    assert rep.outputs[0].mean_abs_err == pytest.approx(0.25)


def test_zero_reference_is_judged_on_absolute_error():
    tol = Tolerance(atol=1e-4, rtol=1e-3)
    assert compare(one("y", [0.0]), one("y", [5e-5]), tol, seed=0, device="cpu").passed
    assert not compare(one("y", [0.0]), one("y", [5e-3]), tol, seed=0, device="cpu").passed


def test_nan_and_inf_must_match():
    tol = Tolerance()
    assert compare(one("y", [np.nan, np.inf]), one("y", [np.nan, np.inf]), tol, seed=0, device="cpu").passed
    assert not compare(one("y", [np.nan]), one("y", [1.0]), tol, seed=0, device="cpu").passed
    assert not compare(one("y", [np.inf]), one("y", [-np.inf]), tol, seed=0, device="cpu").passed


def test_structure_mismatches_are_reported():
    tol = Tolerance()
    rep = compare(one("y", [[1.0, 2.0]]), one("y", [1.0, 2.0]), tol, seed=0, device="cpu")
    assert not rep.passed
    with pytest.raises(ValueError, match="returns 2 outputs, the source model 1"):
        compare(one("y", [1.0]), [[("a", np.zeros(1)), ("b", np.zeros(1))]], tol, seed=0, device="cpu")


def test_worst_output_over_all_samples():
    tol = Tolerance(atol=1.0, rtol=1.0)
    ref = [[("a", np.array([1.0])), ("b", np.array([2.0]))], [("a", np.array([1.0])), ("b", np.array([2.0]))]]
    act = [[("a", np.array([1.25])), ("b", np.array([2.0]))], [("a", np.array([1.5])), ("b", np.array([2.125]))]]
    rep = compare(ref, act, tol, seed=0, device="cpu")
    assert rep.samples == 2
    assert rep.outputs[0].max_abs_err == pytest.approx(0.5)
    assert rep.outputs[1].max_abs_err == pytest.approx(0.125)
    assert rep.max_abs_err == pytest.approx(0.5)


# ------------------------------------------------------------------ statistics against independent computations


def _pct_inclusive(values, q):
    """The q-th percentile by the stdlib (inclusive method = linear interpolation between order statistics)."""
    if q == 100:
        return max(values)
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def test_statistics_match_the_stdlib_over_all_samples():
    rng = np.random.default_rng(11)
    ref = [rng.standard_normal((3, 7)) for _ in range(3)]
    act = [r + rng.standard_normal(r.shape) * 1e-3 for r in ref]
    ref[1][0, 0] = 0.0  # a zero reference: out of the relative statistics
    rep = compare([[("y", r)] for r in ref], [[("y", a)] for a in act], Tolerance(), seed=0, device="cpu")
    (o,) = rep.outputs
    abs_errs = [abs(float(a) - float(r)) for ra, aa in zip(ref, act) for r, a in zip(ra.ravel(), aa.ravel())]
    rel_errs = [abs(float(a) - float(r)) / abs(float(r)) for ra, aa in zip(ref, act)
                for r, a in zip(ra.ravel(), aa.ravel()) if r != 0]
    assert o.elements == 63 and len(rel_errs) == 62
    assert o.max_abs_err == pytest.approx(max(abs_errs), rel=1e-12)
    assert o.mean_abs_err == pytest.approx(math.fsum(abs_errs) / 63, rel=1e-12)
    assert o.median_abs_err == pytest.approx(statistics.median(abs_errs), rel=1e-12)
    assert o.p99_abs_err == pytest.approx(_pct_inclusive(abs_errs, 99), rel=1e-12)
    assert o.max_rel_err == pytest.approx(max(rel_errs), rel=1e-12)
    assert o.mean_rel_err == pytest.approx(math.fsum(rel_errs) / 62, rel=1e-12)
    assert o.median_rel_err == pytest.approx(statistics.median(rel_errs), rel=1e-12)
    assert o.p99_rel_err == pytest.approx(_pct_inclusive(rel_errs, 99), rel=1e-12)
    a_all = [float(x) for aa in act for x in aa.ravel()]
    r_all = [float(x) for ra in ref for x in ra.ravel()]
    cos = math.fsum(x * y for x, y in zip(a_all, r_all)) / (
        math.sqrt(math.fsum(x * x for x in a_all)) * math.sqrt(math.fsum(y * y for y in r_all)))
    assert o.cosine_similarity == pytest.approx(cos, rel=1e-12)
    assert sum(o.abs_err_histogram.counts) + o.abs_err_histogram.zeros == 63


def test_percentile_by_hand():
    ref = np.zeros(100)
    act = np.arange(100, dtype=np.float64)  # abs errors 0..99
    (o,) = compare([[("y", ref)]], [[("y", act)]], Tolerance(), seed=0, device="cpu").outputs
    assert o.p99_abs_err == pytest.approx(98.01)  # position 0.99 * 99 = 98.01 between 98 and 99
    assert o.median_abs_err == pytest.approx(49.5)
    assert o.mean_abs_err == pytest.approx(49.5)
    assert o.max_rel_err == 0.0 and o.median_rel_err == 0.0  # every reference is zero: no relative error
    assert o.cosine_similarity == 0.0  # one side is all zeros


def test_cosine_by_hand():
    (o,) = compare([[("y", np.array([1.0, 1.0]))]], [[("y", np.array([1.0, 0.0]))]], Tolerance(atol=10),
                   seed=0, device="cpu").outputs
    assert o.cosine_similarity == pytest.approx(1 / math.sqrt(2))
    (z,) = compare([[("y", np.zeros(3))]], [[("y", np.zeros(3))]], Tolerance(), seed=0, device="cpu").outputs
    assert z.cosine_similarity == 1.0 and z.passed


def test_nan_and_inf_are_counted_on_each_side():
    ref = np.array([np.nan, np.inf, 1.0, -np.inf, 2.0])
    act = np.array([np.nan, np.inf, np.nan, np.inf, 2.0])
    (o,) = compare([[("y", ref)]], [[("y", act)]], Tolerance(), seed=0, device="cpu").outputs
    assert (o.nan_source, o.inf_source, o.nan_artifact, o.inf_artifact) == (1, 2, 2, 2)
    assert o.nonfinite_mismatches == 2 and not o.passed
    assert o.min_atol is None and o.min_rtol is None  # no tolerance makes a NaN match a number


def test_top1_and_topk_agreement_by_hand():
    ref = np.array([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3, 0.4],    # top-1: 3; top-5: {3,1,6,5,2}
                    [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])   # top-1: 0; top-5: {0,6,5,4,3}
    act = np.array([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3, 0.4],    # same
                    [0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.6]])   # top-1: 1; top-5: {1,6,5,4,3}
    (o,) = compare([[("logits", ref)]], [[("logits", act)]], Tolerance(atol=1.0), seed=0, device="cpu").outputs
    assert o.top1_agreement == 0.5 and o.topk == 5 and o.topk_agreement == 0.5
    assert topk_sets_equal(act, ref, 3).tolist() == [True, False]
    # not classifier-like: a vector, or integer outputs
    (v,) = compare([[("y", np.ones(4))]], [[("y", np.ones(4))]], Tolerance(), seed=0, device="cpu").outputs
    assert v.top1_agreement is None and v.topk_agreement is None


def test_minimum_tolerances_by_hand_and_they_really_pass():
    ref = np.array([1.0, 10.0, 0.0, 100.0])
    act = np.array([1.1, 10.5, 0.02, 100.0])  # abs: .1, .5, .02, 0   rel: .1, .05, inf, 0
    tol = Tolerance(atol=1e-3, rtol=1e-3)
    (o,) = compare([[("y", ref)]], [[("y", act)]], tol, seed=0, device="cpu").outputs
    assert not o.passed and o.failing_elements == 3
    assert o.min_atol == pytest.approx(0.5)  # every element with rel > 1e-3 must fit under atol
    assert o.min_rtol is None  # the zero-reference element needs atol >= 0.02 whatever the rtol
    assert compare([[("y", ref)]], [[("y", act)]], Tolerance(atol=o.min_atol, rtol=1e-3), seed=0, device="cpu").passed
    assert not compare([[("y", ref)]], [[("y", act)]], Tolerance(atol=0.499, rtol=1e-3), seed=0,
                       device="cpu").passed
    (p,) = compare([[("y", ref)]], [[("y", act)]], Tolerance(atol=0.03, rtol=1e-3), seed=0, device="cpu").outputs
    assert p.min_rtol == pytest.approx(0.1)  # elements over atol 0.03: rel .1 and .05
    assert compare([[("y", ref)]], [[("y", act)]], Tolerance(atol=0.03, rtol=p.min_rtol), seed=0, device="cpu").passed
    assert not compare([[("y", ref)]], [[("y", act)]], Tolerance(atol=0.03, rtol=0.0999), seed=0,
                       device="cpu").passed


@pytest.mark.parametrize("mode, q, stat_abs, stat_rel", [
    ("max", None, 0.5, 0.5),
    ("mean", None, (0.0 + 0.1 + 0.2 + 0.5) / 4, (0.0 + 0.05 + 0.1 + 0.5) / 4),
    ("median", None, 0.15, 0.075),
    ("quantile", 0.5, 0.15, 0.075),
    ("quantile", 0.75, 0.275, 0.2),  # position 2.25: 0.2 + 0.25 * (0.5 - 0.2); rel: 0.1 + 0.25 * 0.4
])
def test_statistic_modes_by_hand(mode, q, stat_abs, stat_rel):
    ref = np.array([1.0, 2.0, 2.0, 1.0])
    act = np.array([1.0, 2.1, 2.2, 1.5])  # abs 0, .1, .2, .5; rel 0, .05, .1, .5
    tol = Tolerance(mode=mode, quantile=q, atol=stat_abs * 0.999, rtol=stat_rel * 0.999)
    (o,) = compare([[("y", ref)]], [[("y", act)]], tol, seed=0, device="cpu").outputs
    assert o.statistic_abs == pytest.approx(stat_abs) and o.statistic_rel == pytest.approx(stat_rel)
    assert not o.passed and o.tolerance.mode == ToleranceMode(mode)
    # either statistic within its tolerance passes (an element-style OR of the two)
    for loose in ({"atol": o.statistic_abs}, {"rtol": o.statistic_rel}):
        assert compare([[("y", ref)]], [[("y", act)]], tol.model_copy(update=loose), seed=0, device="cpu").passed
    assert o.min_atol == pytest.approx(stat_abs) and o.min_rtol == pytest.approx(stat_rel)


def test_per_output_overrides():
    ref = [[("logits", np.array([1.0])), ("aux", np.array([1.0]))]]
    act = [[("logits", np.array([1.01])), ("aux", np.array([1.01]))]]
    tol = Tolerance(outputs={"log*": OutputTolerance(atol=0.05)})
    rep = compare(ref, act, tol, seed=0, device="cpu")
    logits, aux = rep.outputs
    assert logits.passed and logits.tolerance.atol == 0.05 and "override 'log*'" in logits.tolerance.origin
    assert not aux.passed and aux.tolerance.atol == 1e-4
    assert not rep.passed


def test_precision_picks_the_default_tolerance():
    ref, act = [[("y", np.array([1.0]))]], [[("y", np.array([1.005]))]]
    assert not compare(ref, act, Tolerance(), seed=0, device="cpu").passed
    rep = compare(ref, act, Tolerance(), seed=0, device="cpu", precision="fp16")
    assert rep.passed and rep.precision.value == "fp16" and rep.atol == 1e-2


def test_error_histogram_decades_by_hand():
    h = error_histogram(np.array([0.0, 0.0, 3e-7, 5e-7, 2e-3, 1e-20, 1e9]))
    assert h.zeros == 2 and h.edges[0] == 1e-12 and h.edges[-1] == 1e3
    by_decade = dict(zip(range(-12, 3), h.counts))
    assert by_decade[-7] == 2 and by_decade[-3] == 1
    assert by_decade[-12] == 1 and by_decade[2] == 1  # out of range: clamped into the end bins
    assert sum(h.counts) == 5


def test_failed_sample_is_recorded():
    ref = [[("y", np.array([1.0]))], [("y", np.array([1.0]))]]
    act = [[("y", np.array([1.0]))], [("y", np.array([2.0]))]]
    (o,) = compare(ref, act, Tolerance(), seed=0, device="cpu").outputs
    assert o.first_failing_sample == 1
