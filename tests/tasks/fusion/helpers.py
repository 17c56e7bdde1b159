"""Small models and independent reference computations shared by the fusion tests."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

X = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))


def mlp(seed: int, d_in: int = 4, hidden: int = 8, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)).eval()


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():  # running statistics that differ between members
        m[2].running_mean.uniform_(-1, 1)
        m[2].running_var.uniform_(0.5, 2)
        m[2].num_batches_tracked.fill_(seed + 10)
    return m.eval()


class TwoHead(nn.Module):
    """A nested output: (logits, {"emb": embedding})."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        e = torch.tanh(self.body(x))
        return self.head(e), {"emb": e}


class Slice(nn.Module):
    """Columns [i*C, (i+1)*C) of the input: lets a test dictate each member's logits."""

    def __init__(self, i: int, c: int) -> None:
        super().__init__()
        self.i, self.c = i, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.i * self.c:(self.i + 1) * self.c] * 1.0


def np_sd(sd: dict) -> dict:
    return {k: v.detach().double().numpy() for k, v in sd.items()}


def ref_slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Independent formulation: the angle from the cosine of the flattened vectors."""
    a, b = a.ravel(), b.ravel()
    cos = float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    om = np.arccos(cos)
    return (np.sin((1 - t) * om) * a + np.sin(t * om) * b) / np.sin(om)


def ref_ties(base: np.ndarray, members: list[np.ndarray], density: float, weights: list[float],
             scale: float) -> np.ndarray:
    """numpy TIES on one flattened tensor (mergekit's semantics)."""
    base = base.ravel()
    trimmed = []
    for m in members:
        d = m.ravel() - base
        if density < 1:
            k = max(1, int(density * d.size))
            keep = np.argsort(-np.abs(d), kind="stable")[:k]
            dd = np.zeros_like(d)
            dd[keep] = d[keep]
            d = dd
        trimmed.append(d)
    w = np.asarray(weights, dtype=np.float64)
    tv = np.stack(trimmed) * w[:, None]
    elected = np.where(tv.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(tv) == elected[None, :]
    num = (tv * agree).sum(0)
    den = (w[:, None] * agree).sum(0)
    den[den == 0] = 1.0
    return base + scale * num / den


def ref_vote(logit_list: list[np.ndarray], tie_break: str = "probability") -> np.ndarray:
    """A plain-loop majority vote with the documented tie rule."""
    n, c = logit_list[0].shape
    res = []
    for r in range(n):
        counts = np.zeros(c)
        probs = np.zeros(c)
        for lg in logit_list:
            row = lg[r].astype(np.float64)
            counts[int(np.argmax(row))] += 1
            e = np.exp(row - row.max())
            probs += e / e.sum()
        tied = [j for j in range(c) if counts[j] == counts.max()]
        if tie_break == "probability":
            best = max(probs[j] for j in tied)
            tied = [j for j in tied if probs[j] == best]
        res.append(min(tied))
    return np.array(res)


def separable_data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes split by x0 + x1 = 0, with a margin of 0.3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * 2, 2, generator=g)
    x = x[(x[:, 0] + x[:, 1]).abs() > 0.3][:n]
    return x, (x[:, 0] + x[:, 1] > 0).long()


def linear(w: list[list[float]], b: tuple[float, float] = (0.0, 0.0)) -> nn.Module:
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(w))
        m.bias.copy_(torch.tensor(b))
    return m.eval()


def np_accuracy(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = x.numpy() @ m.weight.detach().numpy().T + m.bias.detach().numpy()
    return float((logits.argmax(1) == y.numpy()).mean())


def raises(message: str):
    """pytest.raises for a FusionError whose message is exactly `message`."""
    from portq.tasks.fusion.validation import FusionError

    return pytest.raises(FusionError, match="^" + re.escape(message) + "$")


# ------------------------------------------------------------------------------- model files and fuse jobs


class SmallNet(nn.Module):
    """A classifier small enough to fuse, convert and time in a second: (N, 4) -> (N, 3) logits."""

    def __init__(self, d_in: int = 4, hidden: int = 8, d_out: int = 3, bn: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.BatchNorm1d(hidden) if bn else nn.Identity()
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


ARCH = f"{__name__}:SmallNet"


def fine_tunes(base: nn.Module, n: int, scale: float = 0.05, seed: int = 1) -> list[nn.Module]:
    """`n` copies of `base` with small seeded changes to every weight: fine-tunes of one model."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        out.append(m.eval())
    return out


def save_state_dicts(directory, modules: list[nn.Module], stem: str = "m") -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, m in enumerate(modules):
        path = directory / f"{stem}{i}.pt"
        torch.save(m.state_dict(), path)
        paths.append(str(path))
    return paths


def save_scripts(directory, modules: list[nn.Module], example: torch.Tensor, stem: str = "ts") -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, m in enumerate(modules):
        path = directory / f"{stem}{i}.pt"
        torch.jit.save(torch.jit.trace(m.eval(), example), str(path))
        paths.append(str(path))
    return paths


def save_data(path, x: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    arrays = {"x": x.numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez(path, **arrays)
    return str(path)


def fuse_spec(store, members: list[str], method: str, *, params: dict | None = None,
              base: str | None = None, eval_data: str | None = None, calibration: str | None = None,
              finetune: dict | None = None, formats: list[str] | None = None, arch: bool = True,
              load: dict | None = None, options: dict | None = None, batch: str = "f"):
    """One fuse job, as `portq fuse` would submit it (the request checked by validate_request first)."""
    from portq.client.fuse import exact_output_tolerance
    from portq.tasks.fusion.methods import validate_request
    from portq.tasks.state.submission import FusionRequest, prepare_fusion

    from tests.jobs import artifacts

    fusion, applied = validate_request(method, len(members), params or {}, base=base is not None,
                                       eval_data=eval_data is not None, calibration=calibration is not None,
                                       finetune=finetune is not None)
    opts = {"inputs": [{"name": "x", "dtype": "float32", "shape": [6, 4], "dynamic": {0: "batch"}}],
            "dynamic": ["batch"], "artifacts": artifacts(formats or ["onnx"]),
            "latency": {"warmup": 0, "runs": 1, "min_window_ms": 0, "sweep": False}, **(options or {})}
    exact_output_tolerance(fusion, opts, user_overrides=False)
    request = FusionRequest(members=members, method=method, params=applied, base=base, eval_data=eval_data,
                            calibration=calibration, finetune=finetune)
    load = load if load is not None else {"arch": ARCH} if arch else {}
    (spec,) = prepare_fusion(request, store, batch=batch, options=opts, load=load, max_bytes=1 << 30).specs
    return spec
