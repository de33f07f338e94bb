"""A model with a custom op no backend has a kernel for."""

from __future__ import annotations

import torch
from torch import nn


@torch.library.custom_op("edgeship_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


@mystery.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class WithCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mystery(self.fc(x))


def build():
    torch.manual_seed(0)
    return WithCustomOp(), (torch.randn(2, 32),)
