"""Small real conv nets and a toy paired data set for the core tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


def weighted_squared_error(prediction: Tensor, sources: Sequence[Tensor], weights: Tensor) -> Tensor:
    """mean over pixels of sum_k w_k (prediction - source_k)^2 (smooth; the paper's eq. 2)."""
    stacked = torch.stack(list(sources), dim=1)  # (B, K, C, H, W)
    return (weights.unsqueeze(2) * (prediction.unsqueeze(1) - stacked) ** 2).sum(1).mean()


class SmallFusion(nn.Module):
    """F: 2 sources concatenated -> 1 channel (conv, BatchNorm, smooth activations)."""

    def __init__(self, k: int = 2, width: int = 8, batchnorm: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(k, width, 3, padding=1),
            nn.BatchNorm2d(width) if batchnorm else nn.Identity(),
            nn.Tanh(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class SmallGenerator(nn.Module):
    """G: K sources -> K-channel logits."""

    def __init__(self, k: int = 2, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(k, width, 3, padding=1), nn.Softplus(), nn.Conv2d(width, k, 3, padding=1))

    def forward(self, *sources: Tensor) -> Tensor:
        return self.body(torch.cat(sources, dim=1))


class SmallSegmenter(nn.Module):
    """T: 1 channel -> class logits (conv, BatchNorm, smooth activations)."""

    def __init__(self, classes: int = 2, width: int = 8, batchnorm: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width) if batchnorm else nn.Identity(),
            nn.Softplus(),
            nn.Conv2d(width, classes, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def central_difference(
    fn: Callable[[], Tensor], params: Sequence[Tensor], direction: Sequence[Tensor], eps: float
) -> float:
    """Five-point central difference of ``fn`` along ``direction`` (truncation error O(eps^4))."""

    def at(scale: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(scale * d)
        try:
            return fn().item()
        finally:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(scale * d)

    return (-at(2 * eps) + 8 * at(eps) - 8 * at(-eps) + at(-2 * eps)) / (12 * eps)


def toy_batch(seed: int) -> dict[str, Tensor]:
    """A float64 batch of two 8x8 sources and a two-class target, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64),
        "b": torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64),
        "target": torch.randint(0, 2, (2, 8, 8), generator=g),
    }


def seg_loss(output: Tensor, batch: dict[str, Tensor]) -> Tensor:
    return nn.functional.cross_entropy(output, batch["target"])


class InformativeSource(Dataset[dict[str, Tensor]]):
    """Pairs where the segmentation target is visible only in one source.

    The informative source shows a bright square (the target) on a dim background; the other
    source is random texture that says nothing about it. ``informative`` picks ``"a"`` or ``"b"``.
    A random horizontal flip (global RNG) makes resume tests sensitive to RNG state.
    """

    def __init__(self, n: int = 32, size: int = 16, informative: str = "b", seed: int = 0, flip: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            target = torch.zeros(size, size, dtype=torch.long)
            y, x = torch.randint(0, size - 6, (2,), generator=g).tolist()
            h, w = torch.randint(3, 7, (2,), generator=g).tolist()
            target[y : y + h, x : x + w] = 1
            good = 0.2 + 0.6 * target.float()[None] + 0.05 * torch.randn(1, size, size, generator=g)
            noise = torch.rand(1, size, size, generator=g)
            a, b = (good, noise) if informative == "a" else (noise, good)
            self.items.append({"a": a, "b": b, "target": target})
        self.flip = flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = self.items[i]
        if self.flip and bool(torch.rand(()) < 0.5):
            return {k: v.flip(-1) for k, v in item.items()}
        return item
