"""Model Breadcrumbs, the method added as one entry in `portq.tasks.fusion.methods` (the design's test: nothing
else was edited to add it), against an independent numpy computation and hand-worked masks, through the entry
itself (`FUSION_METHODS.get("breadcrumbs").fuse`), as the fuse builder and the reproduce scripts call it."""

import numpy as np
import pytest
import torch
from portq.tasks.fusion.methods import FUSION_METHODS, FusionInputs, breadcrumbs_mask, validate_request

from tests.tasks.fusion.helpers import mlp, np_sd, raises

DELTA = torch.tensor([5.0, -1.0, 3.0, 0.5, -4.0, 2.0, 0.1, -0.2, 1.5, 6.0], dtype=torch.float64)


@pytest.mark.parametrize("density, gamma, kept", [
    # 10 entries by magnitude: 6 (i9), 5 (i0), -4 (i4), 3 (i2), 2 (i5), 1.5 (i8), -1 (i1), 0.5 (i3), -0.2, 0.1
    (0.5, 0.1, [0, 2, 4, 5, 8]),  # keep 5 after the 1 largest: 5, -4, 3, 2, 1.5
    (0.5, 0.8, [1, 3, 6, 7, 8]),  # 8 outliers would leave fewer than 5: only 5 go, the 5 smallest stay
    (0.5, 0.01, [0, 2, 4, 5, 9]),  # int(0.01 * 10) = 0 outliers: the 5 largest (mergekit keeps none here)
    (0.3, 0.2, [2, 4, 5]),  # drop 6 and 5, keep the next 3
    (1.0, 0.5, list(range(10))),  # density 1 keeps the task vector as it is
])
def test_the_mask_keeps_the_middle_of_the_magnitudes(density, gamma, kept):
    expected = torch.zeros_like(DELTA)
    expected[kept] = DELTA[kept]
    assert torch.equal(breadcrumbs_mask(DELTA, density, gamma), expected)


def test_equal_magnitudes_keep_the_lower_index():
    assert breadcrumbs_mask(torch.tensor([1.0, -1.0, 1.0, 2.0]), 0.5, 0.25).tolist() == [1.0, -1.0, 0.0, 0.0]


def _ref_mask(d: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Written apart: rank by (-|d|, index) with numpy's lexsort, drop the outliers, keep the next k."""
    if density >= 1:
        return d
    n = d.size
    k = int(density * n)
    outliers = min(int(gamma * n), n - k)
    rank = np.lexsort((np.arange(n), -np.abs(d)))
    mask = np.zeros(n)
    mask[rank[outliers:outliers + k]] = 1.0
    return d * mask


@pytest.mark.parametrize("params", [{}, {"density": 0.5, "gamma": 0.1, "weights": [1.0, -0.5, 2.0], "scale": 0.7},
                                    {"density": 1.0, "scale": 0.5}, {"density": 0.3, "gamma": 0.6}])
def test_breadcrumbs_matches_numpy(params):
    base, members = mlp(0), [mlp(1), mlp(2), mlp(3)]
    method, applied = validate_request("breadcrumbs", 3, params, base=True)
    fused, facts = method.fuse(FusionInputs(names=["a", "b", "c"], modules=members, base=("b0", base)), applied)
    assert applied["density"] == params.get("density", 0.9) and applied["gamma"] == params.get("gamma", 0.01)
    sb = np_sd(base.state_dict())
    sm = [np_sd(m.state_dict()) for m in members]
    weights = params.get("weights", [1.0, 1.0, 1.0])
    for k, got in fused.state_dict().items():
        b = sb[k].ravel()
        total = sum(w * _ref_mask(s[k].ravel() - b, applied["density"], applied["gamma"]) for w, s in zip(weights, sm))
        np.testing.assert_allclose(got.numpy().ravel(), b + applied["scale"] * total, rtol=1e-5, atol=1e-6)
    assert fused is not base and not fused.training
    assert facts["method"] == "breadcrumbs" and facts["base"] == "b0" and facts["bn_stats"] == "none"


def test_its_request_rules_come_with_its_entry():
    method = FUSION_METHODS.get("breadcrumbs")
    assert method.space == "weight" and method.needs_base and method.params == [
        "metric", "weights", "scale", "density", "gamma"]
    assert validate_request("breadcrumbs", 1, {"weights": [-1.0]}, base=True)[1]["weights"] == [-1.0]
    with pytest.raises(Exception, match="breadcrumbs: --gamma must be in \\[0, 1\\), got 1.0"):
        validate_request("breadcrumbs", 2, {"gamma": 1.0}, base=True)
    with raises("breadcrumbs: needs a base model (base=...) to compute task vectors"):
        method.fuse(FusionInputs(names=["a"], modules=[mlp(1)]), {"metric": None, "weights": None, "scale": 1.0,
                                                                   "density": 0.9, "gamma": 0.01})
