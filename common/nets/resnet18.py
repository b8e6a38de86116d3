"""ResNet-18, the CIFAR variant (He et al. 2016 as adapted for 32x32 inputs: a 3x3 stride-1
stem and no max-pool), from torchvision's ``BasicBlock``. Ten layers, cut at block
boundaries: 0 stem, 1-8 the eight basic blocks (layer1.0 .. layer4.1), 9 head (global
average pool + FC). Global pooling makes it take any input size (the last stage is
H/8 x W/8, at least 1x1).

Batch norm in training mode needs more than one value per channel: with inputs of 8x8 or
less, the last stage is 1x1, so a batch must hold at least 2 samples.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock

from common.nets import ModelSpec

# (in channels, out channels, stride) of the eight blocks
BLOCKS = [(64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
          (256, 512, 2), (512, 512, 1)]


def _block(cin: int, cout: int, stride: int) -> nn.Module:
    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
    return BasicBlock(cin, cout, stride, down)


def layers(spec: ModelSpec) -> list:
    stem = lambda: nn.Sequential(nn.Conv2d(spec.channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),  # noqa: E731
                                 nn.ReLU(inplace=True))
    blocks = [lambda b=b: _block(*b) for b in BLOCKS]
    head = lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, spec.classes))  # noqa: E731
    return [stem, *blocks, head]
