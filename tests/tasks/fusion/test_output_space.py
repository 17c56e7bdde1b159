"""Output-space fusion against running the members one by one; one graph in torch.export, TorchScript and ONNX."""

import copy
import dataclasses
import inspect
import re

import numpy as np
import pytest
import torch
from portq.tasks.fusion.methods import FUSION_METHODS
from portq.tasks.fusion.output_space import build_output_fusion, check_outputs, with_input_names
from portq.tasks.fusion.validation import FusionError
from torch import nn

from tests.tasks.fusion.helpers import Slice, TwoHead, X, bn_net, mlp, raises, ref_vote


def fuse(method, members, example=X, names=None, **given):
    params = dataclasses.asdict(FUSION_METHODS.get(method).configure(given))  # the method's defaults filled in
    check_outputs(method, members, example, params, names)
    return build_output_fusion(method, members, params, names)


def test_ensemble_is_the_weighted_mean_of_the_members():
    members = [mlp(s) for s in range(3)]
    outs = [m(X).detach().numpy() for m in members]
    np.testing.assert_allclose(fuse("ensemble", members)(X).detach().numpy(), np.mean(outs, 0), rtol=1e-5,
                               atol=1e-6)
    fused = fuse("ensemble", members, weights=[1, 2, 1])
    np.testing.assert_allclose(fused(X).detach().numpy(), (outs[0] + 2 * outs[1] + outs[2]) / 4, rtol=1e-5,
                               atol=1e-6)
    assert not fused.training


def test_ensemble_keeps_nested_outputs():
    members = [TwoHead(0), TwoHead(1)]
    logits, d = fuse("ensemble", members, weights=[3, 1])(X)
    (l0, d0), (l1, d1) = members[0](X), members[1](X)
    assert torch.allclose(logits, 0.75 * l0 + 0.25 * l1, atol=1e-6)
    assert set(d) == {"emb"} and torch.allclose(d["emb"], 0.75 * d0["emb"] + 0.25 * d1["emb"], atol=1e-6)


def test_vote_is_the_majority_of_the_members_argmax():
    members = [mlp(s, d_out=4) for s in range(5)]
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    got = fuse("vote", members, x)(x)
    assert got.dtype == torch.int64 and got.shape == (64,)
    np.testing.assert_array_equal(got.numpy(), ref_vote([m(x).detach().numpy() for m in members]))


def test_vote_tie_rules():
    members = [Slice(0, 3), Slice(1, 3)]
    # row 0: member 0 says class 0 (weakly), member 1 class 2 (strongly): a 1-1 tie; row 1: both say 1
    x = torch.tensor([[2.0, 0.0, 1.0, 0.0, 0.5, 3.0], [0.0, 5.0, 0.0, 0.0, 5.0, 0.0]])
    assert fuse("vote", members, x)(x).tolist() == [2, 1]  # the higher summed probability wins the tie
    np.testing.assert_array_equal(fuse("vote", members, x)(x).numpy(), ref_vote([x[:, :3].numpy(), x[:, 3:].numpy()]))
    assert fuse("vote", members, x, tie_break="lowest-index")(x).tolist() == [0, 1]
    even = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 1.0]])  # equal votes and probabilities: the lowest index
    assert fuse("vote", members, even)(even).tolist() == [1]
    three = [Slice(0, 3), Slice(1, 3), Slice(2, 3)]  # two weak votes for 1 beat one confident vote for 0
    x3 = torch.tensor([[0.0, 0.1, 0.0, 0.0, 0.1, 0.0, 9.0, 0.0, 0.0]])
    assert fuse("vote", three, x3)(x3).tolist() == [1]
    assert fuse("vote", members, x, weights=[1, 2], tie_break="lowest-index")(x).tolist() == [2, 1]


def test_concat_and_stack_match_the_members():
    a, b, c = mlp(0), mlp(1, d_out=5), mlp(2)
    assert torch.allclose(fuse("concat", [a, b])(X), torch.cat([a(X), b(X)], dim=-1))
    assert torch.equal(fuse("stack", [a, c])(X), torch.stack([a(X), c(X)], 1))
    assert fuse("stack", [a, c], dim=0)(X).shape == (2, 6, 3)
    nested = fuse("concat", [TwoHead(0), TwoHead(1)])(X)
    assert nested[0].shape == (6, 6) and nested[1]["emb"].shape == (6, 10)


def test_chain_feeds_each_member_the_previous_output():
    torch.manual_seed(0)
    a, b, c = nn.Linear(4, 7), nn.Sequential(nn.ReLU(), nn.Linear(7, 2)), nn.Linear(2, 3)
    assert torch.allclose(fuse("chain", [a, b, c])(X), c(b(a(X))))


def test_checking_a_member_in_train_mode_leaves_its_statistics_alone():
    m = bn_net(0).train()
    before = copy.deepcopy(m.state_dict())
    fuse("ensemble", [m, bn_net(1)], torch.randn(8, 4))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_the_fused_forward_takes_the_members_input_names():
    fused = with_input_names(build_output_fusion("ensemble", [mlp(0), mlp(1)]), ["ids", "not a name", "ids"])
    assert str(inspect.signature(fused.forward)) == "(ids, x1, x2)"
    assert torch.allclose(fused(X), (mlp(0)(X) + mlp(1)(X)) / 2, atol=1e-6)


@pytest.mark.parametrize("method", ["ensemble", "vote", "concat", "stack", "chain"])
def test_each_method_exports_as_one_graph_with_a_dynamic_batch(method, tmp_path):
    import onnxruntime as ort

    if method == "chain":
        members = [nn.Linear(4, 7).eval(), nn.Sequential(nn.ReLU(), nn.Linear(7, 3)).eval()]
    else:
        members = [mlp(0), mlp(1, d_out=5 if method == "concat" else 3)]
    fused = with_input_names(fuse(method, members), ["x"])
    reference = fused(X).detach()
    batch = torch.export.Dim("batch")
    program = torch.export.export(fused, (X,), dynamic_shapes=({0: batch},))  # the spec of a one-input forward
    assert list(program.graph_signature.user_inputs) == ["x"]
    assert torch.allclose(program.module()(X).double(), reference.double(), atol=1e-6)
    assert torch.allclose(torch.jit.trace(fused, (X,))(X).double(), reference.double(), atol=1e-6)
    path = str(tmp_path / f"{method}.onnx")
    torch.onnx.export(fused, (X,), path, dynamo=True, verbose=False, dynamic_shapes=({0: batch},))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for x in (X, torch.randn(11, 4)):
        got = session.run(None, {"x": x.numpy()})[0]
        expected = fused(x).detach().numpy()
        if method == "vote":
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, expected)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input


def test_incompatible_outputs_name_the_members_and_shapes():
    a, b = mlp(0), mlp(1, d_out=4)
    with raises("ensemble: member 'b' output has shape (6, 4) but member 'a' output has shape (6, 3); "
                "ensemble needs identical output shapes"):
        fuse("ensemble", [a, b], names=["a", "b"])
    with raises("stack: member 'b' output has shape (6, 4) but member 'a' output has shape (6, 3); "
                "stack needs identical output shapes"):
        fuse("stack", {"a": a, "b": b})
    with raises("vote: member 'b' output has shape (6, 4) but member 'a' output has shape (6, 3); "
                "vote needs the same (N, C) output shape from every member"):
        fuse("vote", {"a": a, "b": b})
    with raises("vote: member 'a' returns tuple(Tensor, dict('emb': Tensor)); vote needs a single (N, C) tensor"):
        fuse("vote", {"a": TwoHead(0), "b": TwoHead(1)})

    class Flat(nn.Module):
        def forward(self, x):
            return x.reshape(-1)

    with raises("concat: member 'f' output has shape (24,) but member 'a' output has shape (6, 3); "
                "concat along the last dim needs the same rank and all other dims equal"):
        fuse("concat", {"a": a, "f": Flat()})
    with raises("ensemble: member 'h' returns tuple(Tensor, dict('emb': Tensor)) but member 'a' returns Tensor; "
                "members must return the same output structure"):
        fuse("ensemble", {"a": a, "h": TwoHead(0)})


def test_a_chain_that_does_not_fit_names_both_members():
    with pytest.raises(FusionError) as e:
        fuse("chain", {"enc": nn.Linear(4, 5), "head": nn.Linear(4, 3)})
    assert str(e.value).startswith("chain: output of member 'enc' has shape (6, 5), which member 'head' cannot "
                                   "accept: RuntimeError: ") and "6x5" in str(e.value)
    with pytest.raises(FusionError, match=re.escape("chain: member 'enc' failed on the example inputs with "
                                                    "shapes ((6, 4),): ")):
        fuse("chain", {"enc": nn.Linear(3, 5), "head": nn.Linear(5, 3)})


def test_counts_weights_and_parameters():
    a, b = mlp(0), mlp(1)
    with raises("ensemble: needs at least 2 models, got 1"):
        fuse("ensemble", [a])
    with raises("ensemble: got 1 weights for 2 members"):
        fuse("ensemble", [a, b], weights=[1])
    with raises("vote: weights must sum to a positive value, got sum -2.0"):
        fuse("vote", [a, b], weights=[-1, -1])
    with raises("stack: dim must be 0 or 1, got 2"):
        build_output_fusion("stack", [a, b], {"dim": 2})
