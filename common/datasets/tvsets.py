"""torchvision's file-based image sets: CIFAR-10, CIFAR-100, MNIST and FashionMNIST.

Each is read from torchvision's own on-disk layout under ``data.root`` (or downloaded
there with ``data.download = true``) and normalized with its usual per-channel mean and
std. A set is one ``TvSet`` line below (plus its ``DatasetInfo`` line in the registry).
Pixels are indexed straight from the decoded uint8 array: no per-sample PIL round trip,
no augmentation.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch

from common.datasets import DataError
from common.datasets.pixels import normalize


@dataclass(frozen=True)
class TvSet:
    title: str
    cls: str                      # the torchvision.datasets class
    folder: str                   # under data.root
    files: tuple[str, ...]        # what must be in that folder without a download
    mean: tuple[float, ...]
    std: tuple[float, ...]


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
SETS = {
    "cifar10": TvSet("CIFAR-10", "CIFAR10", "cifar-10-batches-py",
                     tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
                     (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": TvSet("CIFAR-100", "CIFAR100", "cifar-100-python", ("train", "test", "meta"),
                      (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": TvSet("MNIST", "MNIST", os.path.join("MNIST", "raw"), _MNIST_FILES, (0.1307,), (0.3081,)),
    "fashionmnist": TvSet("FashionMNIST", "FashionMNIST", os.path.join("FashionMNIST", "raw"), _MNIST_FILES,
                          (0.2860,), (0.3530,)),
}


def labels(spec, split: str, num_devices: int | None) -> np.ndarray:
    return _load(spec.dataset, spec.root, spec.download, split == "train")[1]


def samples(spec, split: str, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    s = SETS[spec.dataset]
    pixels, labels_ = _load(spec.dataset, spec.root, spec.download, split == "train")
    return normalize(pixels[idx], s.mean, s.std), torch.from_numpy(labels_[idx].copy())


@functools.lru_cache(maxsize=2)  # labels, then the shard's pixels, from one read of the files
def _load(name: str, root: str, download: bool, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 pixels [n,H,W(,C)], int64 labels [n]) of one split, with missing or broken
    files turned into DataError."""
    import torchvision.datasets as tvd  # imported lazily: synthetic runs do not need it

    s = SETS[name]
    folder = os.path.join(root, s.folder)
    if not download:
        missing = [f for f in s.files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise DataError(
                f"data.root {root!r} has no complete {s.folder}/ folder (missing: {', '.join(missing)}); "
                f"set data.download = true to fetch {s.title}, or point data.root at a folder that "
                f"contains {s.folder}/")
    try:
        ds = getattr(tvd, s.cls)(root, train=train, download=download)
    except RuntimeError as exc:  # torchvision's "not found or corrupted" (md5 mismatch)
        raise DataError(
            f"{s.title} files under {folder!r} failed torchvision's integrity check ({exc}); "
            "delete the folder and set data.download = true, or point data.root at an intact copy") from exc
    except OSError as exc:  # download failure (no network, ...)
        raise DataError(
            f"could not download {s.title} into {root!r} ({exc}); download it elsewhere and "
            f"point data.root at the folder that contains {s.folder}/") from exc
    pixels = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    targets = ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else ds.targets
    return pixels, np.asarray(targets, dtype=np.int64)
