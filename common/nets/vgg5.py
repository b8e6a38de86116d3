"""VGG-5 as in FedFly (layers numbered from 0 as in FedFly's code):

    0 conv 3->32 + BN + ReLU    1 max-pool 2    2 conv 32->64 + BN + ReLU    3 max-pool 2
    4 conv 64->64 + BN + ReLU   5 FC (64 * H/4 * W/4)->128 + ReLU    6 FC 128->classes

For the paper's 3x32x32 CIFAR input the first FC layer is 4096->128.
"""

from __future__ import annotations

import torch
from torch import nn

from common.nets import ModelSpec


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_relu(x))

    def pre_relu(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output before its ReLU (``common.nets.fused``: with the max-pool after it)."""
        return self.bn(self.pre_norm(x))

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output before ``self.bn``: ``self.conv(x)``, which ``common.nets.fused``
        runs itself (with this convolution's weights and settings) where this is defined."""
        return self.conv(x)


class Dense(nn.Module):
    def __init__(self, fin: int, fout: int, *, relu: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(fin, fout)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x.flatten(1))
        return torch.relu(x) if self.relu else x


def layers(spec: ModelSpec) -> list:
    flat = 64 * (spec.height // 4) * (spec.width // 4)
    if not flat:
        raise ValueError(f"vgg5 needs images of at least 4x4 (two 2x2 max-pools), got {spec.height}x{spec.width}")
    return [
        lambda: ConvBlock(spec.channels, 32),
        lambda: nn.MaxPool2d(2),
        lambda: ConvBlock(32, 64),
        lambda: nn.MaxPool2d(2),
        lambda: ConvBlock(64, 64),
        lambda: Dense(flat, 128, relu=True),
        lambda: Dense(128, spec.classes, relu=False),
    ]
