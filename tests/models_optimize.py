"""Small models for the optimization tests and benchmark, built in code: a ResNet-style CNN, a transformer
encoder, and a model whose activations overflow float16 (importable by benchmarks/ too)."""

from __future__ import annotations

import torch
from torch import nn


class ResidualCNN(nn.Module):
    """A small ResNet-style CNN (conv-BN-ReLU stem, residual blocks, pooled linear head)."""

    def __init__(self, width: int = 16, blocks: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
            for _ in range(blocks))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = torch.relu(h + block(h))
        return self.head(h.mean((2, 3)))


class Encoder(nn.Module):
    """A transformer encoder (batch first, GELU), as nn.TransformerEncoder builds one."""

    def __init__(self, d: int = 128, heads: int = 4, layers: int = 2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class Fp16Overflow(nn.Module):
    """Fine in float32, overflows float16: an up-projection whose activations reach ~1e5 (fp16's largest is
    65504), a channel shuffle (data movement keeps fp16 tensors even on a CPU), then a LayerNorm that brings
    them back to O(1). Plain fp16 gives inf and NaN; keeping those nodes in float32 repairs it."""

    def __init__(self, d: int = 32, gain: float = 1e5):
        super().__init__()
        self.d = d
        self.inp = nn.Linear(d, d)
        self.up = nn.Linear(d, 4 * d)
        with torch.no_grad():
            self.up.weight.mul_(gain)
        self.ln = nn.LayerNorm(4 * d)
        self.head = nn.Sequential(nn.Linear(4 * d, d), nn.GELU(), nn.Linear(d, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(torch.relu(self.inp(x)) + x)
        b = h.shape[0]
        h = h.view(b, 4, self.d).transpose(1, 2).reshape(b, 4 * self.d)
        return self.head(self.ln(h))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, as a trained model has (fresh ones make BN an identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def benchmark_cnn(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The ResNet-style CNN the latency benchmarks time (3 blocks, width 32, as `benchmarks/optimize.py`'s), with
    trained-like BatchNorm statistics, and its 8x3x64x64 input, both drawn after seeding torch with `seed`."""
    torch.manual_seed(seed)
    return randomize_batchnorm(ResidualCNN(width=32, blocks=3)), torch.randn(8, 3, 64, 64)
