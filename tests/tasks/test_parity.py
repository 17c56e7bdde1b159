import numpy as np
import pytest
from portq.tasks.contract import Tolerance
from portq.tasks.parity import compare, elementwise_errors


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
