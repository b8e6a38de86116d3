"""The registry of data sets: name -> where it is implemented, its image shape and classes.

Torch-free on purpose (the config sizes the model from it without loading torch). An
implementation module has two functions (``common/datasets/synthetic.py`` is the
simplest):

    labels(spec, split, num_devices) -> int64 array: one label per sample, in set order
    samples(spec, split, indices) -> (x float32 [n,C,H,W] normalized, y int64 [n])

and may have ``test_indices(spec)`` (which samples form the test set; default: a seeded
subset of ``data.test_samples``). ``split`` is "train" or "test"; ``spec`` is a
``common.data.DataSpec``. Adding a data set is one such module, or one line in a module
that already serves several (``tvsets.SETS``), and one ``DatasetInfo`` line below;
sharding (balanced or Dirichlet label skew, for any class count), the test subset,
resizing (``data.image_size``) and the checks are common (``common/data.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import TestbedError


class DataError(TestbedError, ValueError):
    """The data configuration or the files on disk are unusable; the message says how to fix it."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    module: str
    shape: tuple[int, int, int]   # channels, height, width as loaded
    classes: int                   # labels are 0..classes-1
    about: str = ""


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("synthetic", "common.datasets.synthetic", (3, 32, 32), 10,
                "deterministic CIFAR-shaped images, generated per sample (no files)"),
    DatasetInfo("cifar10", "common.datasets.tvsets", (3, 32, 32), 10, "torchvision CIFAR10 (cifar-10-batches-py/)"),
    DatasetInfo("cifar100", "common.datasets.tvsets", (3, 32, 32), 100, "torchvision CIFAR100 (cifar-100-python/)"),
    DatasetInfo("mnist", "common.datasets.tvsets", (1, 28, 28), 10, "torchvision MNIST (MNIST/raw/)"),
    DatasetInfo("fashionmnist", "common.datasets.tvsets", (1, 28, 28), 10,
                "torchvision FashionMNIST (FashionMNIST/raw/)"),
    DatasetInfo("imagefolder", "common.datasets.imagefolder", (3, 32, 32), 10,
                "root/train/<class>/*.png|jpg and root/test/<class>/..., at most 10 classes"),
)}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None
