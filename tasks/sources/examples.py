"""Example models for a new user (`portq examples DIR`): built in code with seeded weights, nothing downloaded."""

from __future__ import annotations

from pathlib import Path


def write_examples(directory: Path, seed: int = 0) -> list[Path]:
    """Write three small models covering the input kinds portq reads without extra flags:

    - mlp.pt         TorchScript archive, float input, with a sidecar mlp.npz sample
    - convnet.pt2    ExportedProgram; carries its own example inputs
    - textcls.pt     TorchScript archive with integer token ids and a mask, sidecar textcls.npz
    """
    import warnings

    import numpy as np
    import torch
    from torch import nn

    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    torch.manual_seed(seed)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".portq-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        from portq.tasks.core.errors import ConfigError

        raise ConfigError(f"cannot write the example models to {directory}: {e.strerror or e}", step="examples",
                          hint="give a folder you can write to, e.g. `portq examples models`") from e
    written: list[Path] = []

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
            )
            self.head = nn.Linear(32, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(image).flatten(1))

    class TextClassifier(nn.Module):
        """Token embedding, one masked self-attention block, masked mean pooling, a 3-way head."""

        def __init__(self, vocab: int = 1000, dim: int = 32, heads: int = 4) -> None:
            super().__init__()
            self.heads = heads
            self.embed = nn.Embedding(vocab, dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 3)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.embed(ids)
            b, t, d = h.shape
            q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
            scores = scores.masked_fill(mask[:, None, None, :] == 0, -1e4)
            attn = scores.softmax(-1) @ v
            h = self.norm(h + self.proj(attn.transpose(1, 2).reshape(b, t, d)))
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            return self.head(pooled)

    mlp = MLP().eval()
    x = torch.randn(4, 64)
    torch.jit.save(torch.jit.trace(mlp, x), str(directory / "mlp.pt"))
    np.savez(directory / "mlp.npz", x=x.numpy())
    written.append(directory / "mlp.pt")

    conv = ConvNet().eval()
    image = torch.randn(2, 3, 32, 32)
    torch.export.save(torch.export.export(conv, (image,)), str(directory / "convnet.pt2"))
    written.append(directory / "convnet.pt2")

    text = TextClassifier().eval()
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 10:] = 0
    torch.jit.save(torch.jit.trace(text, (ids, mask)), str(directory / "textcls.pt"))
    np.savez(directory / "textcls.npz", ids=ids.numpy(), mask=mask.numpy())
    written.append(directory / "textcls.pt")
    return written
