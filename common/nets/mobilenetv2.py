"""MobileNetV2, the CIFAR variant (Sandler et al. 2018 with a stride-1 stem and a stride-1
second stage, as is usual for 32x32 inputs), from torchvision's ``InvertedResidual`` and
``Conv2dNormActivation``. Twenty layers, cut at block boundaries: 0 stem, 1-17 the
inverted-residual blocks, 18 the 1x1 conv to 1280 channels, 19 head (global average pool
+ FC). No dropout before the classifier: dropout draws from the process's global RNG,
which a migrated session cannot carry, and exactness under moves is the testbed's test.
Any input size (the last stage is H/8 x W/8, at least 1x1).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

from common.nets import ModelSpec

# (expansion t, output channels c, repeats n, first stride s), torchvision's table with the
# CIFAR change: the second stage keeps stride 1.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1)]


def _blocks() -> list[tuple[int, int, int, int]]:
    out, cin = [], 32
    for t, c, n, s in SETTINGS:
        for i in range(n):
            out.append((cin, c, s if i == 0 else 1, t))
            cin = c
    return out


def layers(spec: ModelSpec) -> list:
    stem = lambda: Conv2dNormActivation(spec.channels, 32, stride=1, activation_layer=nn.ReLU6)  # noqa: E731
    blocks = [lambda b=b: InvertedResidual(b[0], b[1], b[2], b[3]) for b in _blocks()]
    last = lambda: Conv2dNormActivation(320, 1280, kernel_size=1, activation_layer=nn.ReLU6)  # noqa: E731
    head = lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, spec.classes))  # noqa: E731
    return [stem, *blocks, last, head]
