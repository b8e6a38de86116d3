"""The registry of data sets: name -> its image shape and classes.

Torch-free on purpose: the config sizes the model from it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    shape: tuple[int, int, int]   # channels, height, width as stored
    classes: int                   # labels are 0..classes-1
    about: str = ""


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("synthetic", (3, 32, 32), 10,
                "deterministic CIFAR-shaped images, generated per sample (no files)"),
    DatasetInfo("cifar10", (3, 32, 32), 10, "torchvision CIFAR10 (cifar-10-batches-py/)"),
    DatasetInfo("imagefolder", (3, 32, 32), 10,
                "root/train/<class>/*.png|jpg and root/test/<class>/..., at most 10 classes"),
)}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None
