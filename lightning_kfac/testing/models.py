"""Small models and data shared by the tests."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two convolutions and three linear layers on 1x6x6 inputs: five K-FAC layers of mixed shape."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, kernel_size=3, bias=False)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.tanh(self.fc1(x.flatten(1)))
        x = torch.tanh(self.fc2(x))
        return self.head(x)


def cnn_batches(steps: int, global_batch: int, dtype: torch.dtype, seed: int = 1234, classes: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(global_batch, 1, 6, 6, generator=generator).to(dtype),
            torch.randint(0, classes, (global_batch,), generator=generator),
        )
        for _ in range(steps)
    ]


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (64, 32, 32, 10)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(pairwise(sizes)):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
