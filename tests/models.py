"""Tiny models the tests export, as factories (``tests/models.py:build_mlp``)."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """Linear layers of several widths, one of them (10) not a multiple of any group size."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(64, 128)
        self.block = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 96))
        self.head = nn.Linear(96, 10)
        self.odd = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.odd(self.head(self.block(torch.relu(self.embed(x)))))


def build_mlp():
    torch.manual_seed(0)
    return Mlp(), (torch.randn(4, 64),)


def build_sparse_mlp():
    """The MLP after unstructured magnitude pruning: the smaller half of block.0's weights set to zero."""
    model, inputs = build_mlp()
    weight = model.block[0].weight.data
    weight[weight.abs() < weight.abs().median()] = 0
    return model, inputs


class Classifier(nn.Module):
    """Keyword inputs and a dict output with logits: the shape of a HF model."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 32)
        self.mix = nn.Linear(32, 64)
        self.classifier = nn.Linear(64, 5)

    def forward(self, tokens: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.tanh(self.mix(self.embedding(tokens).mean(1))) * scale
        return {"logits": self.classifier(hidden), "hidden": hidden}


def build_classifier():
    torch.manual_seed(0)
    return Classifier(), {"tokens": torch.randint(0, 50, (3, 7)), "scale": torch.ones(3, 1)}


class Spectral(nn.Module):
    """Uses an FFT: LiteRT lowers it, ExecuTorch does not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(self.fc(x)).abs()


def build_spectral():
    torch.manual_seed(0)
    return Spectral(), (torch.randn(2, 16),)


class Wide(nn.Module):
    """Four million parameters (16 MB in fp32): too big for a 1 MB disk."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2048, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def build_wide():
    return Wide(), (torch.randn(1, 2048),)


def build_raises():
    raise RuntimeError("weights server unreachable")


def build_model_only():
    return Mlp()


def build_not_a_module():
    return "a string", (torch.randn(1),)


def build_fails_on_inputs():
    return Mlp(), (torch.randn(4, 3),)


class DepthwiseSeparable(nn.Module):
    """The classic edge vision shape (MobileNet's blocks): depthwise 3x3 then pointwise 1x1 convolutions."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU6()]
        for channels_in, channels_out, stride in ((16, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2)):
            layers += [nn.Conv2d(channels_in, channels_in, 3, stride=stride, padding=1, groups=channels_in),
                       nn.BatchNorm2d(channels_in), nn.ReLU6(),
                       nn.Conv2d(channels_in, channels_out, 1), nn.BatchNorm2d(channels_out), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def build_depthwise_cnn():
    torch.manual_seed(0)
    return DepthwiseSeparable().eval(), (torch.randn(1, 3, 96, 96),)
