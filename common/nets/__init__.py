"""The registry of splittable models: a model is a list of layers, and every boundary
between two layers but the last is a cut point.

This module is torch-free on purpose (the config checks a cut against it without loading
torch). Each entry names the module that builds the layers and the name of every layer,
so a wrong ``split_layer`` can be answered with the valid ones. To add a model, write a
module with ``layers(spec) -> list[factory]`` (one zero-argument factory per layer, so a
part builds only its own layers) and add one ``Net`` line to ``NETS``.

A model is identified everywhere (sessions, snapshots, updates) by its *key*: the name
alone for the paper's input (3x32x32 images, 10 classes), otherwise
``name/CxHxW/classes``, e.g. ``resnet18/1x28x28/10``; ``ModelSpec.parse`` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Net:
    name: str
    module: str               # imported on first build; has layers(spec)
    layers: tuple[str, ...]   # the name of every layer, in order
    about: str = ""

    @property
    def cuts(self) -> range:
        """Valid split layers: the device runs layers 0..s, the edge s+1..last."""
        return range(len(self.layers) - 1)

    def describe_cuts(self) -> str:
        return ", ".join(f"{i} ({self.layers[i]})" for i in self.cuts)


_RESNET_BLOCKS = tuple(f"layer{s}.{b}" for s in range(1, 5) for b in range(2))
_MOBILENET_BLOCKS = tuple(f"block{i}" for i in range(1, 18))

NETS: dict[str, Net] = {n.name: n for n in (
    Net("vgg5", "common.nets.vgg5", ("conv1", "pool1", "conv2", "pool2", "conv3", "fc1", "fc2"),
        "FedFly's VGG-5: 3 conv blocks, 2 max-pools, 2 fully connected layers"),
    Net("resnet18", "common.nets.resnet18", ("stem",) + _RESNET_BLOCKS + ("head",),
        "ResNet-18, CIFAR variant (3x3 stem, no max-pool), torchvision BasicBlocks"),
    Net("mobilenetv2", "common.nets.mobilenetv2", ("stem",) + _MOBILENET_BLOCKS + ("conv_last", "head"),
        "MobileNetV2, CIFAR variant (stride-1 stem and first stage), torchvision InvertedResiduals"),
)}


def net(name: str) -> Net:
    """The registry entry of ``name``. Raises ``KeyError`` naming the known models."""
    try:
        return NETS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(NETS)}") from None


@dataclass(frozen=True)
class ModelSpec:
    """A model built for one input: ``channels`` x ``height`` x ``width`` images, ``classes`` outputs."""
    name: str
    channels: int = 3
    height: int = 32
    width: int = 32
    classes: int = 10

    def __post_init__(self) -> None:
        net(self.name)
        if min(self.channels, self.height, self.width) < 1 or self.classes < 2:
            raise ValueError(f"model input {self.channels}x{self.height}x{self.width} with "
                             f"{self.classes} classes is not a usable shape")

    @property
    def key(self) -> str:
        if (self.channels, self.height, self.width, self.classes) == (3, 32, 32, 10):
            return self.name
        return f"{self.name}/{self.channels}x{self.height}x{self.width}/{self.classes}"

    @classmethod
    def parse(cls, key: str) -> "ModelSpec":
        """The spec a ``key`` names. Raises ``ValueError`` (or ``KeyError``, unknown model)."""
        parts = key.split("/")
        if len(parts) == 1:
            return cls(parts[0])
        try:
            name, shape, classes = parts
            c, h, w = (int(v) for v in shape.split("x"))
            return cls(name, c, h, w, int(classes))
        except ValueError:
            raise ValueError(f"model key {key!r} is not name or name/CxHxW/classes") from None
