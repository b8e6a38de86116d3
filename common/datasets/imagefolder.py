"""``imagefolder``: ``root/train/<class>/*.png|jpg`` and ``root/test/<class>/...``
(torchvision's ImageFolder layout), at most 10 classes, decoded as RGB and resized to 32x32.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from common.datasets import DataError
from common.datasets.pixels import normalize

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's


def labels(spec, split: str, num_devices: int | None) -> np.ndarray:
    return _listing(spec.root, split)[1]


def samples(spec, split: str, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    paths, labels_, _ = _listing(spec.root, split)
    return _decode_images([paths[i] for i in idx]), torch.from_numpy(labels_[idx].copy())


def _listing(root: str, split: str):
    _, class_to_idx = _imagefolder_classes(root)
    return _imagefolder_listing(root, split, class_to_idx)


def _imagefolder_classes(root: str) -> tuple[list[str], dict[str, int]]:
    """Class names (sorted folder names under root/train) and their indices."""
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise DataError(
            f"data.root {root!r} has no train/ folder; an imagefolder dataset needs "
            "root/train/<class>/*.png|jpg and root/test/<class>/..., one sub-folder per class"
        )
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise DataError(f"{train_dir!r} has no class sub-folders; put each class's images in train/<class>/")
    if len(classes) > NUM_CLASSES:
        raise DataError(
            f"{train_dir!r} has {len(classes)} class folders but the models have "
            f"{NUM_CLASSES} outputs; use at most {NUM_CLASSES} classes"
        )
    return classes, {name: i for i, name in enumerate(classes)}


def _imagefolder_listing(
    root: str, split: str, class_to_idx: dict[str, int] | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """(file paths, int64 labels, class names) of root/<split>, in ImageFolder's order.

    Classes are always those of root/train, so train and test indices agree.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if class_to_idx is None:
        _, class_to_idx = _imagefolder_classes(root)
    classes = sorted(class_to_idx, key=class_to_idx.get)
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(f"data.root {root!r} has no {split}/ folder; create {split}/<class>/ with images")
    unknown = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and e.name not in class_to_idx)
    if unknown:
        raise DataError(f"{split_dir!r} has class folders {unknown} that train/ does not have")
    present = [c for c in classes if os.path.isdir(os.path.join(split_dir, c))]
    samples = make_dataset(split_dir, {c: class_to_idx[c] for c in present}, IMG_EXTENSIONS, allow_empty=True)
    found = {label for _, label in samples}
    empty = [c for c in present if class_to_idx[c] not in found]  # train: present == classes
    if empty:
        raise DataError(
            f"class folders {empty} under {split_dir!r} contain no images "
            f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folders"
        )
    paths = [p for p, _ in samples]
    labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
    return paths, labels, classes


def _decode_images(paths: list[str]) -> torch.Tensor:
    """Decode image files to normalized float32 [n,3,32,32], resizing any that are not 32x32."""
    from PIL import Image

    size = IMAGE_SHAPE[1:]
    out = np.empty((len(paths), *size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im.draft("RGB", size)  # JPEG only: decode at reduced scale, much faster
                im = im.convert("RGB")
                if im.size != size:
                    im = im.resize(size, Image.BILINEAR)
                out[i] = np.asarray(im)
        except OSError as exc:
            raise DataError(f"cannot read image {path!r} ({exc}); delete or replace the file") from exc
    return normalize(out, MEAN, STD)
