"""The registry of fusion methods and the checks a request passes before anything runs."""

import pytest
from portq.tasks.core.errors import ConfigError, UnknownNameError
from portq.tasks.fusion.methods import FUSION_METHODS, validate_request

from tests.tasks.fusion import test_builder


def test_every_registered_method_has_a_small_model_job():
    assert set(FUSION_METHODS.names()) == set(test_builder.CASES) | {"chain"}


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(UnknownNameError) as e:
        validate_request("blend", 2, {})
    assert e.value.message == ("[step fuse] unknown fusion method 'blend'; known: breadcrumbs, chain, concat, "
                               "ensemble, greedy-soup, slerp, soup, stack, task-arithmetic, ties, vote")


def test_defaults_are_filled_in_and_weights_normalised_where_the_method_does():
    assert validate_request("slerp", 2, {})[1] == {"metric": None, "t": 0.5}
    assert validate_request("ensemble", 2, {"weights": [1, 3]})[1]["weights"] == [0.25, 0.75]
    assert validate_request("ties", 2, {"weights": [1, 3]}, base=True)[1] == {
        "metric": None, "weights": [1.0, 3.0], "density": 0.2, "scale": 1.0}
    assert validate_request("task-arithmetic", 1, {"weights": [-1.0]}, base=True)[1]["weights"] == [-1.0]
    assert validate_request("vote", 2, {})[0].exact_outputs


@pytest.mark.parametrize("method, members, params, flags, message", [
    ("soup", 1, {}, {}, "soup: needs at least 2 models, got 1"),
    ("ensemble", 1, {}, {}, "ensemble: needs at least 2 models, got 1"),
    ("slerp", 3, {}, {}, "slerp: needs exactly 2 models, got 3"),
    ("ties", 0, {}, {"base": True}, "ties: needs at least 1 model besides the base, got 0"),
    ("soup", 2, {"weights": [1, 1, 1]}, {}, "soup: got 3 weights for 2 members"),
    ("ensemble", 2, {"weights": [1, -1]}, {}, "ensemble: weights must sum to a positive value, got sum 0.0"),
    ("ties", 2, {"weights": [0, 0]}, {"base": True}, "ties: weights must sum to a positive value, got sum 0.0"),
    ("concat", 2, {"weights": [1, 1]}, {}, "concat: takes no --weights (its parameters: --metric)"),
    ("soup", 2, {"t": 0.5}, {}, "soup: takes no --t (its parameters: --metric, --weights)"),
    ("greedy-soup", 2, {}, {}, "greedy-soup: needs --eval-data (an .npz of inputs and labels) to score the members"),
    ("ties", 2, {}, {}, "ties: needs a base model (--base BASE) to compute task vectors"),
    ("task-arithmetic", 2, {}, {}, "task-arithmetic: needs a base model (--base BASE) to compute task vectors"),
    ("soup", 2, {}, {"base": True}, "soup: takes no --base (task-arithmetic, ties and breadcrumbs do)"),
    ("slerp", 2, {"t": 1.5}, {}, "slerp: --t must be in [0, 1], got 1.5"),
    ("ties", 2, {"density": 0.0}, {"base": True}, "ties: --density must be in (0, 1], got 0.0"),
    ("ties", 2, {"density": 1.2}, {"base": True}, "ties: --density must be in (0, 1], got 1.2"),
    ("stack", 2, {"dim": 2}, {}, "stack: --dim: Input should be 0 or 1"),
    ("soup", 2, {"metric": "accuracy"}, {}, "soup: --metric needs --eval-data (the data it is measured on)"),
    ("ensemble", 2, {}, {"calibration": True}, "ensemble: takes no --calibration (BatchNorm statistics are "
     "recomputed by the weight-space methods: soup, greedy-soup, slerp, task-arithmetic, ties, breadcrumbs)"),
    ("vote", 2, {}, {"finetune": True}, "vote: cannot be fine-tuned: its output (class indices) has no gradient; "
     "fine-tune the members first, or use --method ensemble"),
])
def test_bad_requests_are_refused_with_what_is_wrong(method, members, params, flags, message):
    with pytest.raises(ConfigError) as e:
        validate_request(method, members, params, **flags)
    assert e.value.cause == message and e.value.step == "fuse"
