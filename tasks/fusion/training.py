"""Scoring and fine-tuning fused models in plain torch: the metric greedy-soup chooses by, the scores the
report shows, and the fine-tune that may follow a fusion.

Metrics: `accuracy` (class labels against (N, C) scores, or against the class indices a vote returns;
higher is better) and `loss` (cross-entropy for class labels, mean squared error otherwise; lower is
better). The fine-tune is Adam on the same loss, deterministic for a given seed: mini-batches in an order
drawn from a generator seeded with it, and torch's global seed set to it first.

portq runs this code and every reproduce script of a fused artifact carries a copy, so it imports only
torch and numpy.
"""

from __future__ import annotations

from typing import Any

import torch
from portq.tasks.fusion.validation import FusionError, as_args, check_labels, is_class_labels, tensor_shape
from torch.nn import functional as F

METRICS = ("accuracy", "loss")
#: rows per forward pass when scoring: bounds memory on large eval sets, the same split everywhere
EVAL_BATCH = 256


def _device_of(module: Any) -> Any:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def set_training(module: Any, mode: bool) -> None:
    """Set every submodule's mode one by one: fused wrappers and ExportedProgram modules do not pass train()
    down (the latter refuse it), so nn.Module.train() cannot be relied on."""
    for m in module.modules():
        m.training = mode


def _is_class_task(outputs: Any, labels: Any) -> bool:
    return is_class_labels(labels) and isinstance(outputs, torch.Tensor) and outputs.dim() == 2


def pick_metric(metric: str | None, outputs: Any, labels: Any) -> str:
    """The metric to use: as asked, else accuracy for class labels with (N, C) outputs or with class indices,
    else loss."""
    if metric is not None:
        if metric not in METRICS:
            raise FusionError(f"metric must be one of {list(METRICS)}, got {metric!r}")
        return metric
    predicted = isinstance(outputs, torch.Tensor) and outputs.dim() == 1 and is_class_labels(outputs)
    return "accuracy" if _is_class_task(outputs, labels) or (predicted and is_class_labels(labels)) else "loss"


def task_loss(outputs: Any, labels: Any, where: str, reduction: str = "mean") -> Any:
    """Cross-entropy for integer class labels with (N, C) outputs, mean squared error otherwise."""
    if _is_class_task(outputs, labels):
        check_labels(outputs, labels, "class", where)
        return F.cross_entropy(outputs.float(), labels.long(), reduction=reduction)
    if isinstance(outputs, torch.Tensor) and not outputs.is_floating_point():
        raise FusionError(f"{where}: the model returns {outputs.dtype} values (class indices?), which have no loss; "
                          "use the accuracy metric")
    check_labels(outputs, labels, "regression", where)
    return F.mse_loss(outputs.float(), labels.to(outputs.device).float(), reduction=reduction)


def loss_name(outputs: Any, labels: Any) -> str:
    return "cross-entropy" if _is_class_task(outputs, labels) else "mse"


def evaluate(module: Any, inputs: Any, labels: Any, metric: str | None = None) -> tuple[str, float]:
    """(metric, value) of `module` on the data, in eval mode and without gradients; the mode is restored.

    accuracy: the share of rows whose argmax (or predicted index) equals the label; loss: the mean loss.
    """
    args = as_args(inputs, "eval inputs")
    n = int(labels.shape[0])
    if any(int(a.shape[0]) != n for a in args):
        raise FusionError(f"eval data: inputs and labels must have the same number of rows, got "
                          f"{[tensor_shape(a) for a in args]} and {tensor_shape(labels)}")
    device = _device_of(module)
    was_training = module.training
    set_training(module, False)
    total = 0.0
    mse = False
    try:
        with torch.no_grad():
            for start in range(0, n, EVAL_BATCH):
                out = module(*(a[start:start + EVAL_BATCH].to(device) for a in args))
                y = labels[start:start + EVAL_BATCH].to(device)
                metric = pick_metric(metric, out, y)
                if metric == "accuracy":
                    if isinstance(out, torch.Tensor) and out.dim() == 1 and is_class_labels(out):
                        if tensor_shape(out) != tensor_shape(y) or not is_class_labels(y):
                            raise FusionError(f"labels: got labels of shape {tensor_shape(y)} and dtype {y.dtype} "
                                              f"for class indices of shape {tensor_shape(out)}; need integers of "
                                              f"shape {tensor_shape(out)}")
                        total += float((out == y).sum())
                    else:
                        check_labels(out, y, "class")
                        total += float((out.argmax(dim=1) == y).sum())
                else:
                    mse = loss_name(out, y) == "mse"
                    total += float(task_loss(out, y, "labels", reduction="sum"))
    finally:
        set_training(module, was_training)
    if metric is None:
        raise FusionError("eval data: no rows to score on")
    # the mean loss: cross-entropy per row, squared error per element
    return metric, total / (labels.numel() if mse else n)


def as_score(metric: str, value: float) -> float:
    """Higher is better: accuracy as is, a loss negated."""
    return value if metric == "accuracy" else -value


def finetune(module: Any, inputs: Any, labels: Any, *, epochs: int = 5, lr: float = 1e-3, seed: int = 0,
             batch_size: int = 64, device: str = "cpu") -> tuple[str, list[float]]:
    """Fine-tune `module` in place with Adam; returns the loss used and the mean loss of each epoch.

    Labels are checked against the outputs before the first step. Deterministic for a seed: torch's
    global seed is set to it, and each epoch's mini-batch order comes from a generator seeded with it.
    On CUDA, deterministic algorithms are asked for (with a warning where an operation has none). The
    module is left in eval mode on `device`.
    """
    if int(epochs) != epochs or epochs < 1:
        raise FusionError(f"finetune: epochs must be a positive integer, got {epochs!r}")
    if not float(lr) > 0:
        raise FusionError(f"finetune: lr must be positive, got {lr!r}")
    if batch_size < 1:
        raise FusionError(f"finetune: batch_size must be at least 1, got {batch_size!r}")
    args = tuple(a.to(device) for a in as_args(inputs, "finetune inputs"))
    y = labels.to(device)
    n = int(y.shape[0])
    if n == 0 or any(int(a.shape[0]) != n for a in args):
        raise FusionError(f"finetune: inputs and labels must have the same number of rows (at least 1), got "
                          f"{[tensor_shape(a) for a in args]} and {tensor_shape(y)}")
    deterministic = torch.are_deterministic_algorithms_enabled()
    if str(device).startswith("cuda"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    module.to(device)
    params = [p for p in module.parameters() if p.is_floating_point()]
    trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=float(lr))
    set_training(module, True)
    kind = None
    curve = []
    try:
        with torch.enable_grad():
            for _ in range(int(epochs)):
                perm = torch.randperm(n, generator=order).to(device)
                total = 0.0
                for start in range(0, n, batch_size):
                    idx = perm[start:start + batch_size]
                    out = module(*(a[idx] for a in args))
                    if kind is None:
                        kind = loss_name(out, y)
                        if kind == "cross-entropy":  # every label, not only the first batch's
                            check_labels(torch.empty(n, out.shape[1]), y.cpu(), "class", "finetune labels")
                    loss = task_loss(out, y[idx], "finetune labels")
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * int(idx.shape[0])
                curve.append(total / n)
    finally:
        set_training(module, False)
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
        torch.use_deterministic_algorithms(deterministic)
    assert kind is not None
    return kind, curve
