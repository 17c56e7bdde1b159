"""Weight-space merging against independent computations: numpy on flattened parameters, hand-worked values."""

import copy

import numpy as np
import pytest
import torch
from portq.tasks.fusion import weight_space as W
from portq.tasks.fusion.training import evaluate
from torch import nn

from tests.tasks.fusion.helpers import (
    bn_net,
    linear,
    mlp,
    np_accuracy,
    np_sd,
    raises,
    ref_slerp,
    ref_ties,
    separable_data,
)

# ---------------------------------------------------------------------------------------------------- soup


def test_soup_hand_example_weighted_and_int_buffer():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    sd, facts = W.soup([a, b], weights=[1, 3])
    assert torch.equal(sd["w"], torch.tensor([2.5, 5.0]))
    assert int(sd["n"]) == 3 and facts["weights"] == [0.25, 0.75]
    assert "integer tensors taken from the first member 'member0': ['n']" in facts["notes"]
    assert a["w"].tolist() == [1.0, 2.0]  # inputs untouched


@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 0.3], [2.0, 1.0, 1.0]])
def test_soup_matches_numpy(weights):
    members = [mlp(s) for s in range(3)]
    sd, facts = W.soup(members, weights=weights)
    w = np.ones(3) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    sds = [np_sd(m.state_dict()) for m in members]
    for k in sd:
        expected = sum(wi * s[k].ravel() for wi, s in zip(w, sds))
        np.testing.assert_allclose(sd[k].numpy().ravel(), expected, rtol=1e-6, atol=1e-7)
    assert facts["bn_stats"] == "none"
    assert W.load_merged(members[0], sd)(torch.randn(3, 4)).shape == (3, 3)


def test_soup_averages_bn_statistics_without_calibration():
    a, b = bn_net(0), bn_net(1)
    sd, facts = W.soup([a, b])
    for k in ("2.running_mean", "2.running_var"):
        expected = (a.state_dict()[k] + b.state_dict()[k]).double().numpy() / 2
        np.testing.assert_allclose(sd[k].numpy(), expected, rtol=1e-6)
    assert int(sd["2.num_batches_tracked"]) == 10  # from the first member
    assert facts["bn_stats"] == "averaged" and any("averaged like the other tensors" in n for n in facts["notes"])


def test_soup_recomputes_bn_statistics_on_calibration_data():
    a, b = bn_net(0), bn_net(1)
    before = copy.deepcopy(a.state_dict())
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(32, 4, generator=g)
    x2 = torch.randn(32, 4, generator=g) * 2 + 1
    sd, facts = W.soup([a, b], calibration_inputs=x1)  # one batch: its mean and unbiased variance
    weight = (a[0].weight + b[0].weight).double().detach().numpy() / 2
    bias = (a[0].bias + b[0].bias).double().detach().numpy() / 2
    h1 = x1.double().numpy() @ weight.T + bias  # dropout must be off
    np.testing.assert_allclose(sd["2.running_mean"].numpy(), h1.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sd["2.running_var"].numpy(), h1.var(0, ddof=1), rtol=1e-5, atol=1e-6)
    assert int(sd["2.num_batches_tracked"]) == 1 and facts["bn_stats"] == "recomputed"
    sd2, _ = W.soup([a, b], calibration_inputs=[x1, x2])  # two batches: the average of their statistics
    h2 = x2.double().numpy() @ weight.T + bias
    np.testing.assert_allclose(sd2["2.running_mean"].numpy(), (h1.mean(0) + h2.mean(0)) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sd2["2.running_var"].numpy(), (h1.var(0, ddof=1) + h2.var(0, ddof=1)) / 2,
                               rtol=1e-5, atol=1e-6)
    for k, v in a.state_dict().items():  # members untouched, still in eval mode
        assert torch.equal(v, before[k])
    assert not a.training
    np.testing.assert_allclose(sd["0.weight"].double().numpy(), weight, rtol=1e-6)


def test_recompute_bn_stats_restores_momentum():
    m = bn_net(0)
    assert W.recompute_bn_stats(m, torch.randn(16, 4)) == ["2"] and m[2].momentum == 0.1 and not m.training


def test_compiled_bn_layers_cannot_be_recomputed(tmp_path):
    a, b = (torch.jit.trace(bn_net(s), torch.randn(4, 4)) for s in (0, 1))
    with raises("soup: cannot recompute the BatchNorm statistics of 'a.pt': its BatchNorm layers "
                "(['2.running_mean', '2.running_var']) are compiled into a TorchScript or ExportedProgram graph, "
                "where train mode has no effect; give the members as state dicts with their --arch, or leave out "
                "the calibration data to merge the statistics like the other tensors"):
        W.soup([a, b], calibration_inputs=torch.randn(8, 4), names=["a.pt", "b.pt"])


# --------------------------------------------------------------------------------------------------- slerp


def test_slerp_hand_examples():
    a = {"v": torch.tensor([1.0, 0.0]), "c": torch.tensor([1.0, 2.0]), "z": torch.zeros(2), "n": torch.tensor(7)}
    b = {"v": torch.tensor([0.0, 1.0]), "c": torch.tensor([2.0, 4.0]), "z": torch.tensor([1.0, 1.0]),
         "n": torch.tensor(9)}
    sd, facts = W.slerp([a, b], 0.5)
    h = np.sqrt(0.5)
    np.testing.assert_allclose(sd["v"].numpy(), [h, h], rtol=1e-6)  # on the unit circle
    np.testing.assert_allclose(sd["c"].numpy(), [1.5, 3.0], rtol=1e-6)  # colinear: lerp
    # a zero vector stays unnormalised (as in mergekit): dot 0, theta pi/2, sin(pi/4) * b
    np.testing.assert_allclose(sd["z"].numpy(), [h, h], rtol=1e-6)
    assert int(sd["n"]) == 7 and facts["lerp_fallback"] == ["c"]
    assert torch.allclose(W.slerp([a, b], 0.0)[0]["v"], a["v"])
    assert torch.allclose(W.slerp([a, b], 1.0)[0]["v"], b["v"], atol=1e-7)
    np.testing.assert_allclose(W.slerp([a, b], 0.25)[0]["v"].numpy(), [np.cos(np.pi / 8), np.sin(np.pi / 8)],
                               rtol=1e-6)
    # antiparallel (|cos| above the threshold) falls back to lerp as well
    sd, _ = W.slerp([{"v": torch.tensor([1.0, 1.0])}, {"v": torch.tensor([-2.0, -2.0])}], 0.5)
    np.testing.assert_allclose(sd["v"].numpy(), [-0.5, -0.5])


@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 1.0])
def test_slerp_matches_numpy(t):
    a, b = mlp(0), mlp(1)
    sd, _ = W.slerp({"a": a, "b": b}, t)
    sa, sb = np_sd(a.state_dict()), np_sd(b.state_dict())
    for k in sd:
        np.testing.assert_allclose(sd[k].numpy().ravel(), ref_slerp(t, sa[k], sb[k]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_hand_example():
    base = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(4)}
    m1 = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(0)}
    m2 = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(0)}
    sd, _ = W.task_arithmetic([m1, m2], base=base, scale=0.5)
    assert torch.allclose(sd["w"], torch.tensor([1.5, 1.5])) and int(sd["n"]) == 4
    sd, _ = W.task_arithmetic([m1, m2], base=base, weights=[2.0, -1.0])  # negation is allowed
    assert torch.allclose(sd["w"], torch.tensor([3.0, -3.0]))


def test_task_arithmetic_matches_numpy():
    base, members = mlp(0), [mlp(1), mlp(2), mlp(3)]
    w, lam = [0.5, 1.0, 0.25], 0.8
    sd, _ = W.task_arithmetic(members, base=base, weights=w, scale=lam)
    sb = np_sd(base.state_dict())
    sm = [np_sd(m.state_dict()) for m in members]
    for k in sd:
        expected = sb[k] + lam * sum(wi * (s[k] - sb[k]) for wi, s in zip(w, sm))
        np.testing.assert_allclose(sd[k].numpy(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- TIES


def test_ties_hand_example():
    base = {"a": torch.ones(5), "b": torch.zeros(1)}
    tvs = [[3.0, -1.0, 0.5, -2.0, 1.0], [-1.0, -4.0, 2.0, 1.0, 0.1], [2.0, 1.0, -3.0, 0.2, -0.3]]
    tb = [[1.0], [-1.0], [0.0]]
    members = [{"a": torch.ones(5) + torch.tensor(t), "b": torch.tensor(u)} for t, u in zip(tvs, tb)]
    # density 0.6: k = int(0.6 * 5) = 3 per tensor; equal magnitudes keep the lower index:
    #   tv1 -> [3, -1, 0, -2, 0]; tv2 -> [-1, -4, 2, 0, 0]; tv3 -> [2, 1, -3, 0, 0]
    #   sums [4, -4, -1, -2, 0] -> signs [+, -, -, -, + (0)]; disjoint means [2.5, -2.5, -3, -2, 0]
    # "b" (k = max(1, 0) = 1): [1, -1, 0] sums to 0 -> +1 -> mean(1) = 1
    sd, facts = W.ties(members, base=base, density=0.6)
    np.testing.assert_allclose(sd["a"].numpy(), 1 + np.array([2.5, -2.5, -3.0, -2.0, 0.0]), rtol=1e-6)
    np.testing.assert_allclose(sd["b"].numpy(), [1.0])
    sd, _ = W.ties(members, base=base, density=1.0, scale=0.5)  # no trimming: signs of [4, -4, -0.5, -0.8, 0.8]
    expected = np.array([(3 + 2) / 2, (-1 - 4) / 2, -3.0, -2.0, (1 + 0.1) / 2])
    np.testing.assert_allclose(sd["a"].numpy(), 1 + 0.5 * expected, rtol=1e-6)
    assert facts["density"] == 0.6


@pytest.mark.parametrize("density,weights,scale", [(0.2, None, 1.0), (0.5, [1.0, 0.5, 2.0], 0.7), (1.0, None, 1.0)])
def test_ties_matches_numpy(density, weights, scale):
    base, members = mlp(0), [mlp(1), mlp(2), mlp(3)]
    sd, _ = W.ties(members, base=base, density=density, weights=weights, scale=scale)
    sb = np_sd(base.state_dict())
    sm = [np_sd(m.state_dict()) for m in members]
    for k in sd:
        expected = ref_ties(sb[k], [s[k] for s in sm], density, [1.0] * 3 if weights is None else weights, scale)
        np.testing.assert_allclose(sd[k].numpy().ravel(), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- greedy soup


def test_greedy_soup_leaves_out_the_member_that_hurts():
    x, y = separable_data()
    ws = [[-1.0, -1.0], [1.0, 1.0]]
    good = linear(ws)
    # its boundary sits at x0 + x1 = 0.5, so it is wrong on the points with 0.3 < x0 + x1 < 0.5; averaged with
    # `good` the boundary moves by 0.25, less than the data's margin of 0.3, so the soup loses nothing
    okay = linear(ws, (0.5, -0.5))
    bad = linear([[5.0, 5.0], [-5.0, -5.0]])  # negated and scaled: wrong everywhere, and it drags any soup
    members = {"okay": okay, "bad": bad, "good": good}
    sd, facts = W.greedy_soup(members, x, y, metric="accuracy")
    scores = {k: np_accuracy(m, x, y) for k, m in members.items()}
    assert facts["member_scores"] == pytest.approx(scores)
    assert scores["good"] == 1.0 and scores["okay"] < 1.0 and scores["bad"] == 0.0
    assert facts["order"] == ["good", "okay", "bad"] and facts["chosen"] == ["good", "okay"]
    assert [s["accepted"] for s in facts["steps"]] == [True, True, False]
    assert torch.allclose(sd["weight"], (good.weight + okay.weight).detach() / 2)
    assert facts["soup_score"] == pytest.approx(np_accuracy(W.load_merged(good, sd), x, y)) == 1.0


def test_greedy_soup_keeps_an_equal_soup_unless_strict():
    x, y = separable_data()
    good = linear([[-1.0, -1.0], [1.0, 1.0]])
    twin = copy.deepcopy(good)  # a soup with a twin scores exactly the same
    bad = linear([[5.0, 5.0], [-5.0, -5.0]])
    _, facts = W.greedy_soup([good, twin, bad], x, y)
    assert facts["chosen"] == ["member0", "member1"] and facts["rule"] == ">=" and facts["metric"] == "accuracy"
    _, facts = W.greedy_soup([good, twin, bad], x, y, strict=True)
    assert facts["chosen"] == ["member0"] and facts["rule"] == ">"
    _, facts = W.greedy_soup([good, twin, bad], x, y, metric="loss")
    assert facts["metric"] == "loss" and facts["chosen"][0] == "member0" and "bad" not in facts["chosen"]


def test_greedy_soup_with_bn_calibration():
    members = [bn_net(0), bn_net(1), bn_net(2)]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(48, 4, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    sd, facts = W.greedy_soup(members, x, y, calibration_inputs=x)
    assert facts["bn_stats"] == "recomputed" and int(sd["2.num_batches_tracked"]) == 1
    chosen = [members[int(n[len("member"):])] for n in facts["chosen"]]
    weight = sum(m[0].weight.double() for m in chosen).detach().numpy() / len(chosen)
    bias = sum(m[0].bias.double() for m in chosen).detach().numpy() / len(chosen)
    h = x.double().numpy() @ weight.T + bias
    np.testing.assert_allclose(sd["2.running_mean"].numpy(), h.mean(0), rtol=1e-5, atol=1e-6)
    assert facts["soup_score"] == pytest.approx(evaluate(W.load_merged(members[0], sd), x, y)[1])


# ---------------------------------------------------------------------------------------------- bad input


def test_architecture_mismatch_names_the_parameter_and_both_shapes():
    a = {"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}
    b = {"fc.weight": torch.zeros(3, 5), "fc.bias": torch.zeros(3)}
    c = {"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3), "extra": torch.zeros(1)}
    with raises("soup: architecture mismatch: parameter 'fc.weight' has shape (3, 4) in 'A' but (3, 5) in 'B'"):
        W.soup({"A": a, "B": b})
    with raises("soup: architecture mismatch between 'A' and 'C': only in 'A': []; only in 'C': ['extra']"):
        W.soup({"A": a, "C": c})
    with raises("ties: architecture mismatch: parameter 'fc.weight' has shape (3, 4) in 'base' but (3, 5) in "
                "'member1'"):
        W.ties([a, b], base=a, density=0.2)
    with raises("slerp: architecture mismatch: parameter 'weight' has shape (3, 4) in 'member0' but (2, 4) in "
                "'member1'"):
        W.slerp([nn.Linear(4, 3), nn.Linear(4, 2)], 0.5)


def test_counts_weights_and_ranges():
    a, b, c = mlp(0), mlp(1), mlp(2)
    with raises("soup: needs at least 2 models, got 1"):
        W.soup([a])
    with raises("slerp: needs exactly 2 models, got 3"):
        W.slerp([a, b, c], 0.5)
    with raises("ties: needs at least 1 fine-tuned member besides the base, got 0"):
        W.ties([], base=a, density=0.2)
    with raises("soup: got 3 weights for 2 members"):
        W.soup([a, b], weights=[1, 1, 1])
    with raises("soup: weights must sum to a positive value, got sum 0.0"):
        W.soup([a, b], weights=[1, -1])
    with raises("ties: weights must sum to a positive value, got sum 0.0"):
        W.ties([b, c], base=a, density=0.2, weights=[0, 0])
    with raises("greedy-soup: needs eval data (inputs and labels) to score the members"):
        W.greedy_soup([a, b])
    with raises("ties: needs a base model (base=...) to compute task vectors"):
        W.ties([a, b], density=0.2)
    with raises("task-arithmetic: needs a base model (base=...) to compute task vectors"):
        W.task_arithmetic([a, b])
    with raises("slerp: t must be in [0, 1], got 1.5"):
        W.slerp([a, b], 1.5)
    with raises("ties: density must be in (0, 1], got 0.0"):
        W.ties([b], base=a, density=0)
    with raises("soup: members must be a list (or a dict name -> model) of models, got a single state dict"):
        W.soup(a.state_dict())
    with raises("labels: label 7 is out of range for 3 classes (valid 0..2)"):
        W.greedy_soup([a, b], torch.randn(6, 4), torch.tensor([7, 0, 0, 0, 0, 0]))


def test_a_merged_torchscript_model_is_its_own_model_and_can_be_fine_tuned():
    from portq.tasks.fusion.training import finetune

    members = [torch.jit.trace(mlp(s), torch.randn(2, 4)) for s in range(2)]
    merged = W.load_merged(members[0], W.soup(members)[0])
    assert isinstance(merged, torch.jit.ScriptModule)
    before = [p.clone() for p in members[0].parameters()]
    _, curve = finetune(merged, torch.randn(32, 4), torch.randint(0, 3, (32,)), epochs=3, lr=0.05)
    assert len(curve) == 3 and all(torch.equal(a, b) for a, b in zip(before, members[0].parameters()))
