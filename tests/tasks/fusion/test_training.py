"""Scores against numpy, a fine-tune that lowers the loss and repeats exactly, and labels that do not fit."""

import copy

import numpy as np
import pytest
import torch
from portq.tasks.fusion.training import evaluate, finetune
from torch import nn

from tests.tasks.fusion.helpers import X, linear, mlp, np_accuracy, raises, separable_data


def test_scores_match_numpy():
    x, y = separable_data()
    m = linear([[-1.0, -0.4], [1.0, 0.4]])
    assert evaluate(m, x, y) == ("accuracy", pytest.approx(np_accuracy(m, x, y)))
    logits = m(x).detach().double().numpy()
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = -logp[np.arange(len(y)), y.numpy()].mean()
    assert evaluate(m, x, y, "loss") == ("loss", pytest.approx(ce, rel=1e-5))
    t = torch.randn(len(y), 2)
    assert evaluate(m, x, t) == ("loss", pytest.approx(((logits - t.numpy()) ** 2).mean(), rel=1e-5))
    predicted = torch.tensor([0, 1, 1, 0])  # a vote's class indices are scored against the labels directly

    class Predict(nn.Module):
        def forward(self, x):
            return predicted

    assert evaluate(Predict(), torch.zeros(4, 1), torch.tensor([0, 1, 0, 0])) == ("accuracy", 0.75)


def test_evaluation_in_batches_equals_one_pass():
    m = mlp(0)
    x = torch.randn(600, 4, generator=torch.Generator().manual_seed(0))  # three batches of 256 rows at most
    y = torch.randint(0, 3, (600,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ce = nn.functional.cross_entropy(m(x), y).item()
    assert evaluate(m, x, y, "loss")[1] == pytest.approx(ce, rel=1e-5)


def test_finetune_lowers_the_loss_and_repeats_exactly():
    x, y = separable_data()
    m0 = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    m1, m2 = copy.deepcopy(m0), copy.deepcopy(m0)
    kind, c1 = finetune(m1, x, y, epochs=20, lr=5e-2)
    _, c2 = finetune(m2, x, y, epochs=20, lr=5e-2)
    assert kind == "cross-entropy" and len(c1) == 20 and c1[-1] < 0.5 * c1[0]
    assert c1 == c2 and all(torch.equal(p1, p2) for p1, p2 in zip(m1.parameters(), m2.parameters()))
    assert evaluate(m1, x, y)[1] > 0.95 and not m1.training
    t = (x @ torch.tensor([[1.0], [-2.0]])) + 0.5  # regression: mean squared error
    r = nn.Linear(2, 1)
    kind, curve = finetune(copy.deepcopy(r), x, t, epochs=10, lr=5e-2, batch_size=32, seed=3)
    assert kind == "mse" and curve[-1] < 0.2 * curve[0]
    assert curve == finetune(copy.deepcopy(r), x, t, epochs=10, lr=5e-2, batch_size=32, seed=3)[1]
    assert curve != finetune(copy.deepcopy(r), x, t, epochs=10, lr=5e-2, batch_size=32, seed=4)[1]


def test_labels_that_do_not_fit_the_outputs():
    a = mlp(0)
    with raises("labels: label 3 is out of range for 3 classes (valid 0..2)"):
        evaluate(a, X, torch.tensor([0, 1, 2, 3, 0, 1]))
    with raises("labels: label -1 is out of range for 3 classes (valid 0..2)"):
        evaluate(a, X, torch.tensor([0, 1, 2, -1, 0, 1]))
    with raises("eval data: inputs and labels must have the same number of rows, got [(6, 4)] and (5,)"):
        evaluate(a, X, torch.zeros(5, dtype=torch.long), "accuracy")
    with raises("labels: class labels must be integers, got dtype torch.float32"):
        evaluate(a, X, torch.zeros(6), "accuracy")
    with raises("labels: target shape (6,) does not match output shape (6, 3)"):
        evaluate(a, X, torch.zeros(6))
    with raises("finetune labels: label 4 is out of range for 3 classes (valid 0..2)"):
        finetune(copy.deepcopy(a), X, torch.tensor([4, 0, 0, 0, 0, 0]), epochs=1)
